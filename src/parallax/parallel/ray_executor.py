"""Ranks as Ray actors: ``RayExecutor``, the Ray twin of the launcher's ``WorkerPool``.

One actor per rank, each in its own bundle of a Ray placement group, so a replica's
``tp * pp`` ranks can sit on several nodes of a Ray cluster. Same surface as ``WorkerPool``
(``call``, ``submit``, ``collect``, ``close``, ``alive``, ``driver_rank``), so the engine
reaches it through the same ``PoolExecutor``. Design choices:

* **Placement**: inside a Ray Serve replica the ranks take the replica's own placement group
  (bundle 0 is the replica, bundles 1..world the ranks; Serve owns and removes it). Anywhere
  else the executor makes one (``STRICT_PACK`` by default: tp ranks talk every layer, so
  they belong on one node) and removes it on ``close``.
* **Rendezvous on the actors' node IPs**: rank 0 hosts the ``TCPStore`` on port 0 of its
  node's IP (the OS picks a free port); the other ranks join through it; then
  ``torch.distributed`` as everywhere else (gloo on CPU, NCCL on GPU) via ``ParallelContext``.
* **SPMD commands**: ``call(method, ...)`` runs ``engine.method(...)`` on every rank as one
  Ray actor call each; only the driver rank returns its result. ``submit`` / ``collect``
  keep several in flight (each actor runs them in order), as the pool's do.
* **Failures**: a dead actor (``RayActorError``: killed, OOM, its node gone) or any
  unexpected error kills every rank (the others may be stuck in a collective) and raises
  ``WorkerError`` naming the rank and its node; later calls raise "closed because ...".
  A ``ParallaxError`` raised by every rank alike (input validation) keeps its type and
  leaves the executor usable, as with the worker pool.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from typing import Any, Callable

from ..errors import ParallaxError, WorkerError

logger = logging.getLogger(__name__)

_ERROR_GRACE_S = 1.0     # after one rank fails, how long the others get to answer
_POLL_S = 0.5


class _Rank:
    """One rank of a replica: a ModelRunner (or any ``factory(ctx, *args)``) in a Ray actor."""

    def __init__(self, rank: int, tp_size: int, pp_size: int, device: str, timeout_s: float,
                 threads: int):
        import torch
        self.rank, self.tp_size, self.pp_size = rank, tp_size, pp_size
        self.device, self.timeout_s = device, timeout_s
        self.store = self.ctx = self.engine = None
        if device.startswith("cuda"):
            os.environ["LOCAL_RANK"] = "0"          # Ray shows each actor only its own GPU
        torch.set_num_threads(threads)

    def where(self) -> dict:
        import ray
        return {"ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}

    def host_store(self) -> tuple[str, int]:
        """Rank 0: host the rendezvous store on this node's IP and a free port."""
        import datetime

        import torch.distributed as dist
        ip = self.where()["ip"]
        self.store = dist.TCPStore(ip, 0, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=self.timeout_s))
        return ip, self.store.port

    def start(self, ip: str, port: int, factory: Callable[..., Any], factory_args: tuple) -> None:
        import datetime

        import torch.distributed as dist

        from .context import ParallelContext
        if not self.device.startswith("cuda") and ip.startswith("127.") \
                and "GLOO_SOCKET_IFNAME" not in os.environ:
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # all ranks on loopback (one machine)
        store = self.store if self.rank == 0 else dist.TCPStore(
            ip, port, is_master=False, timeout=datetime.timedelta(seconds=self.timeout_s))
        self.ctx = ParallelContext.initialize(rank=self.rank, tp_size=self.tp_size,
                                              pp_size=self.pp_size, device=self.device,
                                              timeout_s=self.timeout_s, store=store)
        self.engine = factory(self.ctx, *factory_args)

    def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        result = getattr(self.engine, method)(*args, **kwargs)
        return result if self.ctx.is_driver else None


def rank_bundle(device: str, threads: int) -> dict:
    """The resources of one rank's bundle: a GPU (and a CPU) on CUDA, ``threads`` CPUs else."""
    return {"GPU": 1, "CPU": 1} if device.startswith("cuda") else {"CPU": threads}


class RayExecutor:
    """``tp_size * pp_size`` Ray actors, each holding ``factory(ctx, *factory_args)``.

    Args:
        factory, factory_args: what each rank builds (parallax passes ``ModelRunner``).
        tp_size, pp_size, device, timeout_s: the layout, as for ``WorkerPool``.
        threads_per_rank: torch threads (and Ray CPUs) per rank (default 1).
        placement_group: the group whose bundles hold the ranks; default: the current one
            (a Serve replica's), else a new one made with ``strategy``.
        strategy: placement strategy of a group made here (``STRICT_PACK``: one node).

    Raises:
        WorkerError: the cluster cannot place the ranks within ``timeout_s``, or a rank
        failed to start; a ``ParallaxError`` raised by the factory keeps its type.
    """

    def __init__(self, factory: Callable[..., Any], factory_args: tuple = (), *, tp_size: int,
                 pp_size: int, device: str = "cpu", timeout_s: float = 60.0,
                 threads_per_rank: int | None = None, placement_group=None,
                 strategy: str = "STRICT_PACK") -> None:
        import ray
        from ray.util.placement_group import get_current_placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.tp_size, self.pp_size = tp_size, pp_size
        self.world_size = world = tp_size * pp_size
        self.driver_rank = (pp_size - 1) * tp_size
        self.device = str(device)
        self.timeout_s = float(timeout_s)
        threads = threads_per_rank or 1
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False,
                     log_to_driver=False)
        self._closed_reason: str | None = None
        self._lock = threading.Lock()
        self._uncollected: collections.deque = collections.deque()   # (what, refs) submitted
        self._own_pg = None
        self.actors: list = []
        pg, offset = placement_group, 0
        if pg is None:
            pg = get_current_placement_group()
            if pg is not None:       # a Serve replica's group: bundle 0 is the replica itself
                offset = len(pg.bundle_specs) - world
                if offset < 0:
                    raise WorkerError(f"the current placement group has "
                                      f"{len(pg.bundle_specs)} bundles, fewer than the "
                                      f"{world} ranks of tp={tp_size} x pp={pp_size}")
        if pg is None:
            pg = self._own_pg = ray.util.placement_group(
                [rank_bundle(self.device, threads)] * world, strategy=strategy,
                name=f"parallax-tp{tp_size}-pp{pp_size}-{os.getpid()}-{id(self)}")
            ready, _ = ray.wait([pg.ready()], timeout=self.timeout_s)
            if not ready:
                remove_placement_group(pg)
                raise WorkerError(
                    f"Ray could not place {world} ranks of {rank_bundle(self.device, threads)} "
                    f"({strategy}) within {self.timeout_s:g} s; add nodes or resources, or "
                    f"lower tp/pp")
        self.placement_group, self.bundle_offset = pg, offset
        gpu = 1 if self.device.startswith("cuda") else 0
        actor_cls = ray.remote(_Rank)
        try:
            for rank in range(world):
                strategy_r = PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=offset + rank,
                    placement_group_capture_child_tasks=False)
                self.actors.append(actor_cls.options(
                    num_cpus=1 if gpu else threads, num_gpus=gpu, max_restarts=0,
                    scheduling_strategy=strategy_r, name=None,
                ).remote(rank, tp_size, pp_size, self.device, self.timeout_s, threads))
            deadline = time.monotonic() + self.timeout_s
            self.where = self._gather([a.where.remote() for a in self.actors],
                                      "start-up (placing the rank actors)", deadline)
            ip, port = self._gather([self.actors[0].host_store.remote()],
                                    "start-up (rendezvous store)", deadline)[0]
            self._gather([a.start.remote(ip, port, factory, tuple(factory_args))
                          for a in self.actors], "start-up (process group and engine factory)")
        except BaseException as exc:
            self._shutdown(f"start-up failed: {exc}")
            raise
        logger.info("Ray ranks up: tp=%d pp=%d on %s", tp_size, pp_size,
                    [(w["ip"], w["node_id"][:8]) for w in self.where])

    # ------------------------------------------------------------------ public surface
    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``engine.method(*args, **kwargs)`` on every rank; the driver rank's result."""
        with self._lock:
            self._check_open()
            if self._uncollected:
                raise RuntimeError(f"RayExecutor: {method}() while submitted commands are "
                                   f"uncollected")
            results = self._gather([a.call.remote(method, args, kwargs) for a in self.actors],
                                   f"{method}()")
        return results[self.driver_rank]

    def submit(self, method: str, *args: Any) -> None:
        """Start ``engine.method(*args)`` on every rank without waiting for it. A Ray actor
        runs one caller's calls in the order made, so several can be in flight (pipeline
        stages work on different ones at once); ``collect`` returns their results, oldest
        first. ``call`` refuses while any is uncollected."""
        with self._lock:
            self._check_open()
            self._uncollected.append((f"{method}()", [a.call.remote(method, args, {})
                                                      for a in self.actors]))

    def collect(self) -> Any:
        """The driver rank's result of the oldest ``submit``ted command (errors as ``call``)."""
        with self._lock:
            if not self._uncollected:
                raise RuntimeError("RayExecutor.collect: no submitted command to collect")
            what, refs = self._uncollected.popleft()
            self._check_open()
            return self._gather(refs, what)[self.driver_rank]

    def ping(self, timeout_s: float = 10.0) -> None:
        """Raise WorkerError (and shut down) if a rank's actor is dead or does not answer
        within ``timeout_s`` (a health check: a rank can die while no request runs)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError
        self._check_open()
        refs = [a.where.remote() for a in self.actors]
        for rank, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=timeout_s)
            except (RayActorError, GetTimeoutError) as exc:
                line = (f"rank {rank} (Ray actor on {self.where[rank]['ip']}) "
                        f"{'did not answer a ping' if isinstance(exc, GetTimeoutError) else 'died'}"
                        f": {exc}")
                self._shutdown(line)
                raise WorkerError(line + "; the replica's ranks were shut down") from exc

    def close(self) -> None:
        """Kill every rank's actor and remove a placement group made here. Idempotent."""
        self._shutdown("close() was called")

    @property
    def alive(self) -> bool:
        return self._closed_reason is None

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        status = "alive" if self.alive else f"closed ({self._closed_reason})"
        return f"RayExecutor(tp={self.tp_size}, pp={self.pp_size}, {status})"

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed_reason is not None:
            raise WorkerError(f"the Ray ranks are closed because {self._closed_reason}")

    def _gather(self, refs: list, what: str, deadline: float | None = None) -> list:
        """Every rank's answer, in rank order; on failure or past ``deadline`` (monotonic)
        shut down (unless every rank raised a ParallaxError) and raise."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        rank_of = {r: i for i, r in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        errors: dict[int, BaseException] = {}
        pending, failed_at = list(refs), None
        while pending:
            timeout = _POLL_S
            if failed_at is not None:
                timeout = failed_at + _ERROR_GRACE_S - time.monotonic()
                if timeout <= 0:
                    break
            if deadline is not None and time.monotonic() > deadline:
                line = (f"ranks {sorted(rank_of[r] for r in pending)} did not answer within "
                        f"{self.timeout_s:g} s during {what} (not enough free resources for "
                        f"their bundles?)")
                self._shutdown(line)
                raise WorkerError(line)
            ready, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            for ref in ready:
                rank = rank_of[ref]
                try:
                    results[rank] = ray.get(ref)
                except (RayActorError, RayTaskError) as exc:
                    errors[rank] = exc
                    failed_at = failed_at or time.monotonic()
        if not errors and not pending:
            return results
        causes = {r: (e.cause if isinstance(e, RayTaskError) else e) for r, e in errors.items()}
        if not pending and all(isinstance(c, ParallaxError) and not isinstance(c, WorkerError)
                               for c in causes.values()):
            raise causes.get(self.driver_rank, next(iter(causes.values())))
        rank = min(causes)
        cause = causes[rank]
        node = self.where[rank]["ip"] if getattr(self, "where", None) else "?"
        if isinstance(errors[rank], RayActorError):
            line = f"rank {rank} (Ray actor on {node}) died during {what}: {cause}"
        else:
            line = f"rank {rank} (Ray actor on {node}) raised {type(cause).__name__}: {cause}"
        if pending:
            line += f"; ranks {sorted(rank_of[r] for r in pending)} did not answer"
        self._shutdown(line)
        if isinstance(cause, ParallaxError) and not isinstance(cause, WorkerError) \
                and what.startswith("start-up"):
            raise cause
        raise WorkerError(line + "; the replica's ranks were shut down") from cause

    def _shutdown(self, reason: str) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group
        if self._closed_reason is not None:
            return
        self._closed_reason = reason
        logger.debug("shutting down %d Ray ranks: %s", len(self.actors), reason)
        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)
        if self._own_pg is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(self._own_pg)
            self._own_pg = None


def inside_ray_worker() -> bool:
    """True in a Ray actor (e.g. a Ray Serve replica) or in a task placed in a placement
    group, not in a driver; never imports Ray itself. Public API only: ``get_actor_id()``
    is None outside an actor, ``get_current_placement_group()`` None outside a group."""
    import sys
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    with contextlib.suppress(Exception):
        from ray.util import get_current_placement_group
        return (ray.get_runtime_context().get_actor_id() is not None
                or get_current_placement_group() is not None)
    return False

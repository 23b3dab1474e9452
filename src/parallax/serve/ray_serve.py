"""The OpenAI app (serve/app.py) as a Ray Serve deployment: replicas of one tp x pp layout,
load balanced and autoscaled by Ray Serve.

    from ray import serve
    from parallax.serve.ray_serve import build_app
    serve.run(build_app("smollm2-135m", tp=2, min_replicas=1, max_replicas=4))

Design choices:

* **One route implementation**: each replica builds a ``parallax.LLM`` and serves
  ``serve.app.build_app(llm, ...)`` through ``@serve.ingress`` (late-bound, so the app is
  built on the replica, after its engine). A response header ``x-parallax-replica`` names
  the replica that answered; ``/health`` and ``/metrics`` are the replica's own.
* **Placement**: each replica has its own placement group. tp * pp == 1: one bundle, the
  replica is the rank. Otherwise bundle 0 holds the replica (HTTP app, scheduler) and
  bundles 1..world the ranks, Ray actors started by ``RayExecutor`` (parallel/ray_executor.py);
  ``STRICT_PACK`` (one node) by default, ``PACK``/``SPREAD`` let a replica span nodes.
* **Health**: Serve's health check asks the app's engine monitor; a dead rank or a stuck
  engine fails it, and Serve replaces the replica.
* **Front**: the HTTP ingress is a light front deployment (serve/front.py) that forwards
  each request to a replica through a handle: a request a dying replica took before
  answering is retried on another, and what cannot be retried ends in OpenAI's error body
  instead of the Serve proxy's plain 500.
* **Routing**: Serve's default (power of two choices on queue length), or with
  ``prefix_routing=True`` the front routes by the prompt's prefix, so requests sharing a
  prefix go to the same replica (serve/prefix_router.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Any

from ..errors import ParallaxError

logger = logging.getLogger("parallax.serve")

REPLICA_HEADER = "x-parallax-replica"
APP_NAME = "parallax"         # the Serve application `parallax serve --replicas` deploys
ENGINE_CPUS = 0.5            # bundle 0 of a tp * pp > 1 replica: HTTP app and scheduler


class _ReplicaHeader:
    """ASGI middleware: every HTTP response says which replica produced it."""

    def __init__(self, app, replica: str):
        self.app, self.value = app, replica.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + \
                    [(REPLICA_HEADER.encode(), self.value)]
            await send(message)

        await self.app(scope, receive, tagged)


class ParallaxReplica:
    """One Serve replica: a ``parallax.LLM`` and the OpenAI app on it."""

    def __init__(self, model: str, llm_kwargs: dict, app_kwargs: dict, threads: int):
        import torch
        from ray import serve

        from ..api import LLM
        torch.set_num_threads(threads)
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        self.llm = LLM(model, **llm_kwargs)      # tp * pp > 1 inside an actor: RayExecutor
        self.app_kwargs = app_kwargs
        self.http_app = None
        logger.info("replica %s up (pid %d)", self.replica_id, os.getpid())

    async def __serve_build_asgi_app__(self):
        from .app import build_app
        self.http_app = build_app(self.llm, **self.app_kwargs)
        self.http_app.add_middleware(_ReplicaHeader, replica=self.replica_id)
        return self.http_app

    async def check_health(self) -> None:
        """Serve's health check: raise when the engine is dead or stuck (Serve replaces us)."""
        import asyncio
        if self.http_app is None:
            return
        pool = getattr(self.llm, "_pool", None)
        if pool is not None and hasattr(pool, "ping"):     # RayExecutor: ranks alive?
            try:
                await asyncio.to_thread(pool.ping)          # blocking Ray calls: off the loop
            except ParallaxError as e:
                self.http_app.state.serve.monitor.mark_dead(str(e))
                raise
        problem = self.http_app.state.serve.monitor.problem()
        if problem is not None:
            raise ParallaxError(f"replica {self.replica_id}: {problem}")

    async def forward(self, key: str, method: str, path: str, query: str,
                      headers: list[tuple[bytes, bytes]], body: bytes):
        """One HTTP request forwarded by the prefix router's front (``key`` is for the
        router): run it through this replica's app; yield (status, headers), then the
        body's chunks. Closing the generator (the client left) cancels the request."""
        import asyncio
        queue: asyncio.Queue = asyncio.Queue()
        delivered = False

        async def receive():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()       # the client stays until we are cancelled

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "root_path": "",
                 "raw_path": path.encode(), "query_string": query.encode(),
                 "headers": headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}
        task = asyncio.ensure_future(self.http_app(scope, receive, queue.put))
        try:
            while not (task.done() and queue.empty()):
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                msg = getter.result()
                if msg["type"] == "http.response.start":
                    yield msg["status"], list(msg.get("headers", []))
                elif msg["type"] == "http.response.body":
                    if msg.get("body"):
                        yield msg["body"]
                    if not msg.get("more_body"):
                        break
            if task.done():
                task.result()
        finally:
            task.cancel()

    def replica_info(self) -> dict:
        """The replica id, its process id and its ranks' (diagnostics, tests)."""
        pool = getattr(self.llm, "_pool", None)
        return {"replica": self.replica_id, "pid": os.getpid(),
                "ranks": list(getattr(pool, "where", []))}

    def __del__(self):
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()


def replica_bundles(tp: int, pp: int, device: str, threads: int) -> tuple[list[dict], dict]:
    """(placement group bundles, the replica actor's own resources) for one replica."""
    from ..parallel.ray_executor import rank_bundle
    if tp * pp == 1:
        bundle = rank_bundle(device, threads)
        return [bundle], {"num_cpus": bundle["CPU"], "num_gpus": bundle.get("GPU", 0)}
    return [{"CPU": ENGINE_CPUS}] + [rank_bundle(device, threads)] * (tp * pp), \
        {"num_cpus": ENGINE_CPUS, "num_gpus": 0}


def build_app(model: str, tp: int = 1, pp: int = 1, *, num_replicas: int | None = None,
              min_replicas: int | None = None, max_replicas: int | None = None,
              target_ongoing_requests: float = 16, model_name: str | None = None,
              api_key: str | None = None, max_queue: int | None = None,
              health_timeout_s: float = 30.0, device: str = "cpu", threads_per_rank: int = 1,
              placement_strategy: str = "STRICT_PACK", max_ongoing_requests: int | None = None,
              upscale_delay_s: float = 30.0, downscale_delay_s: float = 600.0,
              prefix_routing: bool = False, prefix_chars: int = 256, prefix_imbalance: int = 8,
              retries: int = 3, **llm_kwargs: Any):
    """The Ray Serve application for ``serve.run``: replicas of ``LLM(model, tp, pp, ...)``.

    Args:
        model, tp, pp, device: as for ``parallax.LLM``; extra keywords (max_num_seqs,
            kv_cache_tokens, dtype, layer_split, ...) go to ``LLM`` too.
        num_replicas: a fixed number of replicas (default 1) -- or ``min_replicas`` and
            ``max_replicas`` for autoscaling on ongoing requests per replica
            (``target_ongoing_requests``; ``upscale_delay_s`` / ``downscale_delay_s``).
        model_name, api_key, max_queue, health_timeout_s: as for serve/app.py's build_app.
        threads_per_rank: CPUs (torch threads) per rank.
        placement_strategy: of each replica's placement group (STRICT_PACK: one node).
        max_ongoing_requests: requests Serve sends one replica at once (default 2 x
            max_num_seqs); more wait in Serve's queue.
        prefix_routing: put a router in front that sends requests sharing their first
            ``prefix_chars`` prompt characters to the same replica unless its queue is
            longer than the shortest by more than ``prefix_imbalance`` (serve/prefix_router.py).
        retries: times the front re-sends a request whose replica died before answering
            it (serve/front.py); 0: such requests get a 503 error body at once.
    """
    from ray import serve

    if num_replicas is not None and (min_replicas is not None or max_replicas is not None):
        raise ParallaxError("give either num_replicas (fixed) or min_replicas/max_replicas "
                            "(autoscaling), not both")
    if min_replicas is not None or max_replicas is not None:
        lo, hi = min_replicas or 1, max_replicas or max(min_replicas or 1, 1)
        if not 0 <= lo <= hi or hi < 1:
            raise ParallaxError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                                f"got {lo} and {hi}")
        scaling: dict[str, Any] = {"autoscaling_config": {
            "min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
            "target_ongoing_requests": target_ongoing_requests,
            "upscale_delay_s": upscale_delay_s, "downscale_delay_s": downscale_delay_s,
            "metrics_interval_s": min(10.0, max(0.5, upscale_delay_s / 2)),
            "look_back_period_s": min(30.0, max(1.0, upscale_delay_s))}}
    else:
        n = 1 if num_replicas is None else num_replicas
        if n < 1:
            raise ParallaxError(f"num_replicas must be >= 1, got {n}")
        scaling = {"num_replicas": n}
    if retries < 0:
        raise ParallaxError(f"retries must be >= 0, got {retries}")
    if threads_per_rank < 1:
        raise ParallaxError(f"threads_per_rank must be >= 1, got {threads_per_rank}")
    bundles, actor_resources = replica_bundles(tp, pp, device, threads_per_rank)
    llm_kwargs = dict(llm_kwargs, tp=tp, pp=pp, device=device,
                      threads_per_rank=threads_per_rank)
    if tp * pp > 1:
        llm_kwargs["executor"] = "ray"
    app_kwargs = {"model_name": model_name or model, "api_key": api_key,
                  "max_queue": max_queue, "health_timeout_s": health_timeout_s}
    ongoing = max_ongoing_requests or 2 * llm_kwargs.get("max_num_seqs", 64)
    routing = {}
    if prefix_routing:
        from ray.serve.config import RequestRouterConfig

        from .prefix_router import PrefixAffinityRouter
        routing["request_router_config"] = RequestRouterConfig(
            request_router_class=PrefixAffinityRouter,
            request_router_kwargs={"imbalance": prefix_imbalance})
    deployment = serve.deployment(serve.ingress()(ParallaxReplica), name="parallax",
                                  ray_actor_options=actor_resources,
                                  placement_group_bundles=bundles,
                                  placement_group_strategy=placement_strategy,
                                  max_ongoing_requests=ongoing,
                                  health_check_period_s=2.0,
                                  health_check_timeout_s=max(10.0, health_timeout_s),
                                  graceful_shutdown_timeout_s=30.0, **scaling, **routing)
    engines = deployment.bind(model, llm_kwargs, app_kwargs, threads_per_rank)
    from .front import front_app
    return front_app(engines, prefix_chars if prefix_routing else None, retries)


# ---------------------------------------------------------------------- parallax serve
def main(a: argparse.Namespace) -> int:
    """``parallax serve MODEL --replicas N | --min-replicas A --max-replicas B``: start (or
    join ``--ray-address``) Ray and Serve, run the app, wait for SIGTERM/SIGINT."""
    import ray
    from ray import serve

    from .server import cli_options

    api_key, llm_kw = cli_options(a)
    name = a.served_model_name or a.model
    # Replicas may run in other working directories: a local path travels absolute.
    app = build_app(os.path.abspath(a.model) if os.path.exists(a.model) else a.model,
                    num_replicas=a.replicas, min_replicas=a.min_replicas,
                    max_replicas=a.max_replicas,
                    target_ongoing_requests=a.target_ongoing_requests, model_name=name,
                    api_key=api_key, max_queue=a.max_queue, health_timeout_s=a.health_timeout,
                    threads_per_rank=a.threads_per_rank, prefix_routing=a.prefix_routing,
                    **llm_kw)
    if a.ray_address:
        ray.init(address=a.ray_address, log_to_driver=False)
    else:   # a local Ray of our own: on loopback too when serving only this machine
        local = a.host in ("127.0.0.1", "localhost", "::1")
        ray.init(include_dashboard=False, log_to_driver=False,
                 **({"_node_ip_address": "127.0.0.1"} if local else {}))
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    try:
        # On a cluster where Serve already runs, its proxy keeps its own host and port.
        serve.start(http_options={"host": a.host, "port": a.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        host, port = _proxy_address(a.host, a.port)
        print(f"parallax serve: {name} at http://{host}:{port} on Ray Serve "
              f"(tp={a.tp} pp={a.pp} ep={a.ep}, replicas "
              f"{a.replicas or f'{a.min_replicas}..{a.max_replicas}'})",
              file=sys.stderr, flush=True)
        done.wait()
        logger.info("stopping the Serve application")
    finally:
        if a.ray_address:              # a shared cluster: remove only what we deployed
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray.shutdown()
    return 0


def _proxy_address(host: str, port: int) -> tuple[str, int]:
    """Serve's HTTP host and port as running (they differ from ours when Serve ran before)."""
    try:
        # Private, and kept to this one place: Ray 2.60 has no public accessor for the
        # running proxy's HTTP options (serve.status() lists proxies without addresses),
        # and only the log line below needs them. Any failure falls back to ours.
        from ray.serve.context import _get_global_client
        opts = _get_global_client().http_config
        return opts.host, opts.port
    except Exception:
        return host, port


def app_builder(args: dict):
    """Serve config entry point: ``import_path: parallax.serve.ray_serve:app_builder`` with
    ``args`` = build_app's keywords, ``model`` included (deploy/rayservice.yaml)."""
    return build_app(**args)

"""ParallelContext: the one object that says where this rank sits in the tp x pp mesh.

Built once per process (from torchrun's environment or by parallax's own launcher) and
passed into every constructor that needs it; there are no module-level process groups.
Layout: world = pp * tp ranks, pp outer and tp inner, so the tp ranks of one pipeline
stage are neighbours: ``rank = pp_rank * tp_size + tp_rank``.
A size-1 context (``ParallelContext.single()``) makes every parallel layer a plain one.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0


@dataclass
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    tp_size: int = 1
    pp_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None                     # "gloo" | "nccl" | None (single process)
    timeout_s: float = DEFAULT_TIMEOUT_S
    tp_group: dist.ProcessGroup | None = None
    owns_process_group: bool = False               # we called init_process_group
    tp_shm: "ShmGroup | None" = None               # shared-memory tp collectives (CPU, one host)
    p2p_shm: "ShmMailbox | None" = None            # shared-memory stage-to-stage messages

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def stage_rank(self, pp_rank: int, tp_rank: int | None = None) -> int:
        """Global rank of ``tp_rank`` (default: ours) in pipeline stage ``pp_rank``."""
        return pp_rank * self.tp_size + (self.tp_rank if tp_rank is None else tp_rank)

    @property
    def driver_rank(self) -> int:
        """The rank that samples and owns request state: tp rank 0 of the last stage."""
        return self.stage_rank(self.pp_size - 1, 0)

    @property
    def is_driver(self) -> bool:
        return self.rank == self.driver_rank

    # ------------------------------------------------------------------ constructors
    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> "ParallelContext":
        return cls(device=torch.device(device))

    @classmethod
    def initialize(cls, *, rank: int, tp_size: int, pp_size: int, device: str | torch.device,
                   master_addr: str = "127.0.0.1", master_port: int | None = None,
                   timeout_s: float = DEFAULT_TIMEOUT_S,
                   store: dist.Store | None = None) -> "ParallelContext":
        """Join (or create) the default process group and build the tp groups.

        Rendezvous, first match wins: ``store`` (an already connected ``dist.Store``, e.g.
        the launcher's TCPStore client from ``connect_store``), then
        ``tcp://master_addr:master_port``, then the environment (torchrun) when
        ``master_port=None``. NCCL on CUDA devices, gloo otherwise.
        """
        world = tp_size * pp_size
        launched = os.environ.get("WORLD_SIZE") if store is None and master_port is None else None
        if launched is not None and int(launched) != world and not dist.is_initialized():
            # Check before the rendezvous: env:// would wait out the timeout for ranks that
            # the launcher never started.
            _raise_world_mismatch(world, int(launched))
        device = torch.device(device)
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", rank)) % max(torch.cuda.device_count(), 1)
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        owns = False
        if world > 1 and not dist.is_initialized():
            if store is not None:
                dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                        timeout=timeout)
            else:
                init = "env://" if master_port is None else f"tcp://{master_addr}:{master_port}"
                dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                                        timeout=timeout)
            owns = True
        if world > 1 and dist.get_world_size() != world:
            _raise_world_mismatch(world, dist.get_world_size())
        tp_group = None
        if world > 1:
            # Every rank must create every group, in the same order.
            for stage in range(pp_size):
                ranks = list(range(stage * tp_size, (stage + 1) * tp_size))
                group = dist.new_group(ranks, timeout=timeout) if tp_size > 1 else None
                if rank in ranks:
                    tp_group = group
        ctx = cls(rank=rank, world_size=world, tp_size=tp_size, pp_size=pp_size, device=device,
                  backend=backend if world > 1 else None, timeout_s=timeout_s,
                  tp_group=tp_group, owns_process_group=owns)
        if tp_group is not None and backend == "gloo":
            ctx.tp_shm = _local_shm_group(ctx)
        if pp_size > 1 and backend == "gloo":
            ctx.p2p_shm = _local_mailbox(ctx)
        logger.debug("rank %d: tp %d/%d pp %d/%d on %s (shm collectives: %s, messages: %s)",
                     rank, ctx.tp_rank, tp_size, ctx.pp_rank, pp_size, device,
                     ctx.tp_shm is not None, ctx.p2p_shm is not None)
        return ctx

    @classmethod
    def from_torchrun_env(cls, tp_size: int, pp_size: int, device: str | torch.device,
                          timeout_s: float = DEFAULT_TIMEOUT_S) -> "ParallelContext":
        return cls.initialize(rank=int(os.environ["RANK"]), tp_size=tp_size, pp_size=pp_size,
                              device=device, timeout_s=timeout_s)

    def destroy(self) -> None:
        if self.tp_shm is not None:
            self.tp_shm.close(unlink=False)
            self.tp_shm = None
        if self.p2p_shm is not None:
            self.p2p_shm.close()
            self.p2p_shm = None
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_process_group = False


def _raise_world_mismatch(world: int, launched: int) -> None:
    from ..errors import LayoutError
    raise LayoutError(f"tp*pp = {world} but the launcher started {launched} ranks; "
                      f"launch with --nproc-per-node {world} or change tp/pp")


def _local_shm_group(ctx: ParallelContext):
    """A ShmGroup for ctx's tp group when all its ranks share this machine (else None)."""
    from .shm import ShmGroup
    return _shared_mapping(
        ctx, ctx.tp_group, ctx.stage_rank(ctx.pp_rank, 0), ctx.tp_size,
        lambda path, create: ShmGroup(path, ctx.tp_rank, ctx.tp_size, ctx.timeout_s, create))


def _local_mailbox(ctx: ParallelContext):
    """A ShmMailbox for all ranks when they share this machine (else None)."""
    from .shm import ShmMailbox
    return _shared_mapping(
        ctx, None, 0, ctx.world_size,
        lambda path, create: ShmMailbox(path, ctx.rank, ctx.world_size, ctx.timeout_s, create))


def _shared_mapping(ctx: ParallelContext, group, src: int, size: int, open_at):
    """``open_at(path, create)`` on every rank of ``group`` (None: the world) when they all run
    on this machine, else None. ``PARALLAX_SHM=0`` turns shared memory off.

    Global rank ``src`` creates the file, the others open it, and it is unlinked at once: the
    mapping lives on in each process and nothing is left in /dev/shm, even after a crash.
    """
    from .shm import new_path, supported
    if os.environ.get("PARALLAX_SHM", "1") == "0" or not supported():
        return None
    hosts = [None] * size
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    if len(set(hosts)) != 1:
        return None
    box = [new_path() if ctx.rank == src else None]
    mapping = open_at(box[0], True) if ctx.rank == src else None
    dist.broadcast_object_list(box, src=src, group=group)
    if mapping is None:
        mapping = open_at(box[0], False)
    dist.barrier(group=group)
    if ctx.rank == src:
        os.unlink(box[0])
    return mapping


def connect_store(host: str, port: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> dist.TCPStore:
    """Connect, as a client, to a TCPStore hosted by the launching process.

    The launcher hosts the master store on port 0 (the OS picks a free port) and hands
    host and port to its workers, so concurrent runs on one machine never race for a port.
    """
    return dist.TCPStore(host, port, is_master=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def launched_by_torchrun() -> bool:
    """True when this process is one rank of a torchrun (or similar env://) launch."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")) \
        and int(os.environ["WORLD_SIZE"]) > 1

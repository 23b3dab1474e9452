"""ParallelContext: the one object that says where this rank sits in the tp x pp mesh.

Built once per process (from torchrun's environment or by parallax's own launcher) and
passed into every constructor that needs it; there are no module-level process groups.
Layout: world = pp * tp ranks, pp outer and tp inner, so the tp ranks of one pipeline
stage are neighbours: ``rank = pp_rank * tp_size + tp_rank``.
A size-1 context (``ParallelContext.single()``) makes every parallel layer a plain one.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import socket
import time
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
    ep_size: int = 1                               # MoE experts split over the tp group
                                                   # (divides tp_size; sharding.expert_partition)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None                     # "gloo" | "nccl" | None (single process)
    timeout_s: float = DEFAULT_TIMEOUT_S
    tp_group: dist.ProcessGroup | None = None
    object_group: dist.ProcessGroup | None = None  # gloo world group for pickled objects
                                                   # under NCCL; None: the default group
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
                   store: dist.Store | None = None,
                   run_id: str | None = None) -> "ParallelContext":
        """Join (or create) the default process group and build the tp groups.

        Rendezvous, first match wins: ``store`` (a ``dist.Store``, e.g. the launcher's
        ``file_store``), then ``tcp://master_addr:master_port``, then the environment
        (torchrun) when ``master_port=None``. NCCL on CUDA devices, gloo otherwise; under
        NCCL a gloo group over the world carries the object collectives. ``run_id`` names
        this run's shared-memory segments (default: made up by the rank that creates one).
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
        tp_group = object_group = None
        if world > 1:
            # Every rank must create every group, in the same order.
            for stage in range(pp_size):
                ranks = list(range(stage * tp_size, (stage + 1) * tp_size))
                group = dist.new_group(ranks, timeout=timeout) if tp_size > 1 else None
                if rank in ranks:
                    tp_group = group
            object_group = _object_group(backend, timeout)
        ctx = cls(rank=rank, world_size=world, tp_size=tp_size, pp_size=pp_size, device=device,
                  backend=backend if world > 1 else None, timeout_s=timeout_s,
                  tp_group=tp_group, object_group=object_group, owns_process_group=owns)
        if tp_group is not None and backend == "gloo":
            ctx.tp_shm = _local_shm_group(ctx, run_id)
        if pp_size > 1 and backend == "gloo":
            ctx.p2p_shm = _local_mailbox(ctx, run_id)
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
            self.tp_shm.close()
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


def _object_group(backend: str, timeout: datetime.timedelta) -> dist.ProcessGroup | None:
    """The group for pickled-object collectives (collective on every rank): a new gloo
    group over the world when the default group is NCCL, so objects stay in host memory
    (as vLLM does) instead of a device tensor and a stream sync per call; None (the
    default group, gloo already) otherwise."""
    return dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None


def control_group(ctx: ParallelContext) -> dist.ProcessGroup | None:
    """A gloo group over the world that carries only the torchrun driver's messages
    (engine/spmd.py), so a rank can wait for the next message in one thread while another
    runs collectives on the other groups; collective on every rank. None for one rank."""
    if ctx.world_size == 1:
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=ctx.timeout_s))


def _local_shm_group(ctx: ParallelContext, run_id: str | None):
    """A ShmGroup for ctx's tp group when all its ranks share this machine (else None)."""
    from .shm import ShmGroup
    every_stage = ShmGroup.nbytes(ctx.tp_size) * ctx.pp_size     # made at the same time
    return _shared_mapping(
        ctx, ctx.tp_group, ctx.stage_rank(ctx.pp_rank, 0), ctx.tp_size, every_stage,
        f"tp{ctx.pp_rank}", run_id,
        lambda path, create: ShmGroup(path, ctx.tp_rank, ctx.tp_size, ctx.timeout_s, create))


def _local_mailbox(ctx: ParallelContext, run_id: str | None):
    """A ShmMailbox for all ranks when they share this machine (else None)."""
    from .shm import ShmGroup, ShmMailbox
    tp_segments = ShmGroup.nbytes(ctx.tp_size) * ctx.pp_size if ctx.tp_shm is not None else 0
    return _shared_mapping(
        ctx, None, 0, ctx.world_size, ShmMailbox.nbytes(ctx.world_size) + tp_segments, "p2p",
        run_id,
        lambda path, create: ShmMailbox(path, ctx.rank, ctx.world_size, ctx.timeout_s, create))


def _machine_key() -> tuple:
    """Equal on ranks that see the same /dev/shm: host, boot, and the tmpfs mount itself
    (two containers on one host share a hostname and boot id, not a /dev/shm)."""
    boot = ""
    with contextlib.suppress(OSError):
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    return socket.gethostname(), boot, os.stat("/dev/shm").st_dev


def _shared_mapping(ctx: ParallelContext, group, src: int, size: int, need_bytes: int,
                    kind: str, run_id: str | None, open_at):
    """``open_at(path, create)`` on every rank of ``group`` (None: the world) when they all
    share this machine's /dev/shm and ``need_bytes`` (this segment and the run's others
    that are not touched yet, so statvfs does not count them) fit there, else None (gloo
    is used). ``PARALLAX_SHM=0`` turns shared memory off.

    Global rank ``src`` checks the space and creates the segment (0600), the others map it,
    and src unlinks it once they all have (a second barrier holds them until it has), or
    as soon as the attempt fails: from then on the mapping lives only in the processes and
    dies with them. A rank killed in between
    leaves the file; the worker pool sweeps its run's segments (``shm.sweep``) when it
    shuts down, and its workers do when the driver dies.
    """
    from . import shm
    if os.environ.get("PARALLAX_SHM", "1") == "0" or not shm.supported():
        return None
    keys = [None] * size
    dist.all_gather_object(keys, _machine_key(), group=group)
    if len(set(keys)) != 1:
        return None
    box, mapping = [None], None
    try:
        if ctx.rank == src:
            short = shm.room_for(need_bytes)
            if short is None:
                box[0] = shm.segment_path(run_id or shm.new_run_id(), kind)
                mapping = open_at(box[0], True)
                _crash_hook(ctx.rank)
            else:
                logger.warning("shared-memory %s transfers off, gloo instead: %s", kind, short)
        dist.broadcast_object_list(box, src=src, group=group)
        if box[0] is None:
            return None
        if mapping is None:
            _crash_hook(ctx.rank)
            mapping = open_at(box[0], False)
        dist.barrier(group=group)                   # everyone has mapped it
        if ctx.rank == src:
            os.unlink(box[0])
        # ... and nobody goes on (and maybe fails, and gets src killed) before it is gone.
        dist.barrier(group=group)
    finally:
        if ctx.rank == src and box[0] is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(box[0])
    return mapping


def _crash_hook(rank: int) -> None:
    """Test hook between creating a segment and everyone mapping it (tests/test_shm.py):
    ``PARALLAX_TEST_CRASH_AT=shm:<rank>:self`` SIGKILLs that rank there;
    ``...:parent`` SIGKILLs its parent (the pool's driver) and stalls."""
    spec = os.environ.get("PARALLAX_TEST_CRASH_AT", "").split(":")
    if len(spec) != 3 or spec[0] != "shm" or int(spec[1]) != rank:
        return
    if spec[2] == "self":
        os.kill(os.getpid(), signal.SIGKILL)
    elif spec[2] == "parent":
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(60)


def file_store(path: str, world_size: int,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> dist.FileStore:
    """The rendezvous store of a worker pool: a file in the driver's owner-only (0700)
    temporary folder. Unlike a TCPStore (which binds every interface, unauthenticated,
    even when given 127.0.0.1) it opens no port."""
    store = dist.FileStore(path, world_size)
    store.set_timeout(datetime.timedelta(seconds=timeout_s))
    return store
def launched_by_torchrun() -> bool:
    """True when this process is one rank of a torchrun (or similar env://) launch."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")) \
        and int(os.environ["WORLD_SIZE"]) > 1

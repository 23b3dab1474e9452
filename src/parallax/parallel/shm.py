"""Shared-memory collectives (one tp group) and point-to-point messages (pipeline stages)
for the CPU ranks of one machine.

A decode step does two all-reduces per layer on a few KB each. Through gloo's TCP loopback
each costs ~1 ms on a 2-core machine (measured: 60 ms of collectives per SmolLM2 step), more
than the step's compute. Here the ranks share one mapped file in /dev/shm: each rank copies
its tensor into its own slot, publishes a sequence number, waits until every rank has
published, then reads the slots (sum for all-reduce, concatenation for all-gather, one slot
for broadcast). Two buffers alternate, so a fast rank never overwrites a slot that a slow
rank is still reading (it cannot pass the next call's wait before the slow rank publishes).

Pipeline stages exchange activations and sampled tokens point to point (ShmMailbox): one
ring of slots per ordered pair of ranks, a sender copies in and bumps a counter, the
receiver copies out and bumps its own. Through gloo each message needs its background
thread to get a core, which on a machine whose cores all compute costs milliseconds.

Ordering relies on x86's total store order (data stores become visible before the flag
store that follows them); other CPUs keep gloo. Waiting spins briefly, then yields the
core, and gives up after the context's timeout, so a dead peer ends in an error.

Segments are private and short-lived (parallel/context.py creates them): a file
``/dev/shm/parallax-<run id>-<kind>`` is created owner-only (0600, ``O_EXCL``, no symlinks
followed), every rank maps it, and it is unlinked as soon as they all have (or the
attempt failed); ``sweep(run_id)`` removes whatever a killed rank left in between. A
segment is only created when it fits the free space of /dev/shm (tmpfs maps pages on first
touch, so an oversized segment would end in SIGBUS mid-run); otherwise gloo is used.
"""

from __future__ import annotations

import glob
import mmap
import os
import platform
import time
import uuid

import numpy as np
import torch

SLOT_FLOATS = 1 << 20          # 4 MB per rank and buffer; larger tensors use gloo
_SPINS_BEFORE_YIELD = 2000


def _wait(ready, timeout_s: float, waiting_for) -> None:
    """Spin on ``ready()``, then yield the core between checks; RuntimeError after timeout_s."""
    spins, deadline = 0, None
    while not ready():
        spins += 1
        if spins > _SPINS_BEFORE_YIELD:
            os.sched_yield()
            if deadline is None:
                deadline = time.monotonic() + timeout_s
            elif time.monotonic() > deadline:
                raise RuntimeError(f"shared-memory transfer timed out after {timeout_s} s "
                                   f"waiting for {waiting_for()}")


SHM_DIR = "/dev/shm"
PREFIX = "parallax-"


def new_run_id() -> str:
    """A name for one run's segments: the creating process's pid and a random part."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:12]}"


def segment_path(run_id: str, kind: str) -> str:
    return f"{SHM_DIR}/{PREFIX}{run_id}-{kind}"


def sweep(run_id: str) -> list[str]:
    """Remove every segment of ``run_id`` still named in /dev/shm (a rank was killed between
    creating and unlinking it); returns the paths removed."""
    removed = []
    for path in glob.glob(glob.escape(segment_path(run_id, "")) + "*"):
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def supported() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and os.path.isdir(SHM_DIR)


def room_for(nbytes: int) -> str | None:
    """None when a segment of ``nbytes`` may be created; else why not (for a warning).

    Limits: ``PARALLAX_SHM_MAX_BYTES`` when set, and the free space of /dev/shm (Docker's
    default is 64 MiB), checked now: tmpfs hands out pages on first touch, so a segment
    larger than the free space is created without complaint and SIGBUSes later.
    """
    cap = os.environ.get("PARALLAX_SHM_MAX_BYTES")
    if cap is not None and nbytes > int(cap):
        return f"it needs {nbytes / 2**20:.1f} MiB and PARALLAX_SHM_MAX_BYTES is {int(cap)}"
    st = os.statvfs(SHM_DIR)
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        return (f"it needs {nbytes / 2**20:.1f} MiB and {SHM_DIR} has {free / 2**20:.1f} MiB "
                f"free (in Docker, raise it with --shm-size)")
    return None


def _map_segment(path: str, nbytes: int, create: bool) -> mmap.mmap:
    """Create (owner-only, exclusive) or open the segment at ``path`` and map it shared."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    if create:
        flags |= os.O_CREAT | os.O_EXCL
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            os.ftruncate(fd, nbytes)
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or st.st_mode & 0o077 or st.st_size != nbytes:
            raise RuntimeError(f"refusing shared-memory segment {path}: owner {st.st_uid}, mode "
                               f"{st.st_mode & 0o777:o}, {st.st_size} bytes; expected ours, "
                               f"0600, {nbytes} bytes")
        return mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)


class ShmGroup:
    """Collectives over ``size`` local ranks through one shared mapping."""

    def __init__(self, path: str, rank: int, size: int, timeout_s: float, create: bool):
        self.path, self.rank, self.size, self.timeout_s = path, rank, size, timeout_s
        flag_bytes = 64 * size                                    # one cache line per rank
        self._map = _map_segment(path, self.nbytes(size), create)
        self._flags = np.frombuffer(self._map, dtype=np.int64, count=8 * size)[::8]
        self._slots = torch.frombuffer(self._map, dtype=torch.float32, offset=flag_bytes,
                                       count=2 * size * SLOT_FLOATS).view(2, size, SLOT_FLOATS)
        self._seq = 0

    @staticmethod
    def nbytes(size: int) -> int:
        """Bytes of the segment for ``size`` ranks: flags, then two buffers of slots."""
        return 64 * size + 2 * size * SLOT_FLOATS * 4

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype == torch.float32 and x.numel() <= SLOT_FLOATS and not x.is_cuda

    def _exchange(self, x: torch.Tensor) -> torch.Tensor:
        """Publish x; return all ranks' flattened tensors as (size, numel) (a view of shm)."""
        self._seq += 1
        seq, n = self._seq, x.numel()
        buf = self._slots[seq % 2]
        buf[self.rank, :n].copy_(x.reshape(-1))
        self._flags[self.rank] = seq
        _wait(lambda: self._flags.min() >= seq, self.timeout_s,
              lambda: f"ranks {np.nonzero(self._flags < seq)[0].tolist()} of the tp group")
        return buf[:, :n]

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        parts = self._exchange(x)
        torch.sum(parts, dim=0, out=x.view(-1)) if x.is_contiguous() else x.copy_(
            parts.sum(0).view_as(x))
        return x

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        parts = self._exchange(x)
        return [p.view_as(x).clone() for p in parts]

    def broadcast_(self, x: torch.Tensor, src: int) -> torch.Tensor:
        parts = self._exchange(x)
        if self.rank != src:
            x.copy_(parts[src].view_as(x))
        return x

    def close(self) -> None:
        try:
            self._slots = self._flags = None
            self._map.close()
        except BufferError:       # a view is still alive somewhere; the OS frees it at exit
            pass


class ShmMailbox:
    """Point-to-point messages between the ``world`` ranks of one machine.

    Ordered pair (src, dst), src != dst, owns ``RING`` slots of ``SLOT_BYTES`` and two counters on their
    own cache lines: messages sent (written only by src) and taken (only by dst). A send
    waits only when dst has ``RING`` messages it has not taken yet; callers keep fewer than
    that in flight per pair (generation.py: 2 x micro-batches < RING). Messages arrive in
    the order they were sent, and both ends pick the transport from the message size, so
    larger ones can go through gloo in between.
    """

    RING = 16
    SLOT_BYTES = 1 << 20

    def __init__(self, path: str, rank: int, world: int, timeout_s: float, create: bool):
        self.path, self.rank, self.world, self.timeout_s = path, rank, world, timeout_s
        pairs = world * (world - 1)
        counter_bytes = 2 * 64 * pairs                       # one cache line per counter
        self._map = _map_segment(path, self.nbytes(world), create)
        counters = np.frombuffer(self._map, dtype=np.int64, count=16 * pairs)[::8]
        self._sent, self._taken = counters[:pairs], counters[pairs:]
        self._slots = torch.frombuffer(self._map, dtype=torch.uint8, offset=counter_bytes,
                                       count=pairs * self.RING * self.SLOT_BYTES
                                       ).view(pairs, self.RING, self.SLOT_BYTES)

    @classmethod
    def nbytes(cls, world: int) -> int:
        """Bytes of the segment: two counters per ordered pair, then each pair's ring."""
        pairs = world * (world - 1)
        return 2 * 64 * pairs + pairs * cls.RING * cls.SLOT_BYTES

    def fits(self, x: torch.Tensor) -> bool:
        return not x.is_cuda and x.numel() * x.element_size() <= self.SLOT_BYTES

    def _pair(self, src: int, dst: int) -> int:
        """Index of the ordered pair (src, dst), src != dst: src's world - 1 targets in order."""
        return src * (self.world - 1) + (dst if dst < src else dst - 1)

    def send(self, x: torch.Tensor, dst: int) -> None:
        """Copy x (contiguous) into the next slot for dst; returns once it is there."""
        pair = self._pair(self.rank, dst)
        seq = int(self._sent[pair])
        _wait(lambda: self._taken[pair] > seq - self.RING, self.timeout_s,
              lambda: f"rank {dst} to take earlier messages")
        data = x.reshape(-1).view(torch.uint8)
        self._slots[pair, seq % self.RING, :data.numel()].copy_(data)
        self._sent[pair] = seq + 1

    def recv(self, out: torch.Tensor, src: int) -> torch.Tensor:
        """Fill ``out`` (contiguous, of the sent shape and dtype) with src's next message."""
        pair = self._pair(src, self.rank)
        seq = int(self._taken[pair])
        _wait(lambda: self._sent[pair] > seq, self.timeout_s, lambda: f"a message from rank {src}")
        data = out.view(-1).view(torch.uint8)
        data.copy_(self._slots[pair, seq % self.RING, :data.numel()])
        self._taken[pair] = seq + 1
        return out

    def close(self) -> None:
        try:
            self._slots = self._sent = self._taken = None
            self._map.close()
        except BufferError:
            pass

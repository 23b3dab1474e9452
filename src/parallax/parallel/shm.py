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
"""

from __future__ import annotations

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


def new_path() -> str:
    return f"/dev/shm/parallax-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def supported() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and os.path.isdir("/dev/shm")


class ShmGroup:
    """Collectives over ``size`` local ranks through one shared mapping."""

    def __init__(self, path: str, rank: int, size: int, timeout_s: float, create: bool):
        self.path, self.rank, self.size, self.timeout_s = path, rank, size, timeout_s
        flag_bytes = 64 * size                                    # one cache line per rank
        nbytes = flag_bytes + 2 * size * SLOT_FLOATS * 4
        if create:
            with open(path, "wb") as f:
                f.truncate(nbytes)
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), nbytes)
        self._flags = np.frombuffer(self._map, dtype=np.int64, count=8 * size)[::8]
        self._slots = torch.frombuffer(self._map, dtype=torch.float32, offset=flag_bytes,
                                       count=2 * size * SLOT_FLOATS).view(2, size, SLOT_FLOATS)
        self._seq = 0

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

    def close(self, unlink: bool) -> None:
        try:
            self._slots = self._flags = None
            self._map.close()
        except BufferError:       # a view is still alive somewhere; the OS frees it at exit
            pass
        if unlink and os.path.exists(self.path):
            os.unlink(self.path)


class ShmMailbox:
    """Point-to-point messages between the ``world`` ranks of one machine.

    Ordered pair (src, dst) owns ``RING`` slots of ``SLOT_BYTES`` and two counters on their
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
        pairs = world * world
        counter_bytes = 2 * 64 * pairs                       # one cache line per counter
        nbytes = counter_bytes + pairs * self.RING * self.SLOT_BYTES
        if create:
            with open(path, "wb") as f:
                f.truncate(nbytes)                           # tmpfs: pages appear on first touch
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), nbytes)
        counters = np.frombuffer(self._map, dtype=np.int64, count=16 * pairs)[::8]
        self._sent, self._taken = counters[:pairs], counters[pairs:]
        self._slots = torch.frombuffer(self._map, dtype=torch.uint8, offset=counter_bytes,
                                       count=pairs * self.RING * self.SLOT_BYTES
                                       ).view(pairs, self.RING, self.SLOT_BYTES)

    def fits(self, x: torch.Tensor) -> bool:
        return not x.is_cuda and x.numel() * x.element_size() <= self.SLOT_BYTES

    def send(self, x: torch.Tensor, dst: int) -> None:
        """Copy x (contiguous) into the next slot for dst; returns once it is there."""
        pair = self.rank * self.world + dst
        seq = int(self._sent[pair])
        _wait(lambda: self._taken[pair] > seq - self.RING, self.timeout_s,
              lambda: f"rank {dst} to take earlier messages")
        data = x.reshape(-1).view(torch.uint8)
        self._slots[pair, seq % self.RING, :data.numel()].copy_(data)
        self._sent[pair] = seq + 1

    def recv(self, out: torch.Tensor, src: int) -> torch.Tensor:
        """Fill ``out`` (contiguous, of the sent shape and dtype) with src's next message."""
        pair = src * self.world + self.rank
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

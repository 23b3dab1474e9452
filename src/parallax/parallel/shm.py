"""Shared-memory collectives for the CPU ranks of one tp group on one machine.

A decode step does two all-reduces per layer on a few KB each. Through gloo's TCP loopback
each costs ~1 ms on a 2-core machine (measured: 60 ms of collectives per SmolLM2 step), more
than the step's compute. Here the ranks share one mapped file in /dev/shm: each rank copies
its tensor into its own slot, publishes a sequence number, waits until every rank has
published, then reads the slots (sum for all-reduce, concatenation for all-gather, one slot
for broadcast). Two buffers alternate, so a fast rank never overwrites a slot that a slow
rank is still reading (it cannot pass the next call's wait before the slow rank publishes).

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

    @staticmethod
    def new_path() -> str:
        return f"/dev/shm/parallax-{os.getpid()}-{uuid.uuid4().hex[:12]}"

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype == torch.float32 and x.numel() <= SLOT_FLOATS and not x.is_cuda

    def _exchange(self, x: torch.Tensor) -> torch.Tensor:
        """Publish x; return all ranks' flattened tensors as (size, numel) (a view of shm)."""
        self._seq += 1
        seq, n = self._seq, x.numel()
        buf = self._slots[seq % 2]
        buf[self.rank, :n].copy_(x.reshape(-1))
        self._flags[self.rank] = seq
        spins, deadline = 0, None
        while self._flags.min() < seq:
            spins += 1
            if spins > _SPINS_BEFORE_YIELD:
                os.sched_yield()
                if deadline is None:
                    deadline = time.monotonic() + self.timeout_s
                elif time.monotonic() > deadline:
                    raise RuntimeError(f"shared-memory collective timed out after {self.timeout_s} s "
                                       f"waiting for ranks {np.nonzero(self._flags < seq)[0].tolist()} "
                                       f"of the tp group")
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

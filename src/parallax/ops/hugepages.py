"""CPU tensors backed by transparent huge pages (2 MiB), for weights that a decode step
streams from memory.

A decode step reads every matmul weight once (513 MiB for SmolLM2-135M in fp32). On 4 KiB
pages that is one TLB miss and page walk per 4 KiB, and the hardware prefetchers stop at
each 4 KiB boundary; on 2 MiB pages neither happens. torch's CPU allocator asks for huge
pages only under ``THP_MEM_ALLOC_ENABLE=1`` (read once per process, for every allocation),
and Linux's default THP mode ("madvise") gives them only to memory advised so. So the packed
fp32 weights (ops/cpu.py: panel_buffers) are laid out in one anonymous mapping advised
``MADV_HUGEPAGE`` before it is first touched. In a virtual machine a TLB miss walks the
guest's and the host's page tables, so this matters most there. Measured on a 2-core AVX-512
EPYC VM (shared, load 7-8), SmolLM2-135M fp32, one thread, interleaved with the tree before
(``benchmarks/bench_step.py --threads 1``): 19.5 / 21.2 -> 29.2 / 28.0 decode tok/s, process
CPU 33.7 / 32.2 -> 22.3 / 22.9 ms per step; the LM head alone (113 MB) 3.56 ms against
4.17-4.36 ms for the same panels on ordinary pages (fastest of 20, three rounds).

Where the kernel gives no huge pages (THP "never", not Linux), the mapping is ordinary
memory: same values, same layout. The memory counts in RSS as any other; the last huge page
may hold up to 2 MiB of unused tail.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import mmap

import torch

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
ALIGN = 4096   # each tensor of an arena starts on a page (and so cache line) boundary


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor of ``nbytes`` whose memory starts on a 2 MiB
    boundary in a private anonymous mapping advised ``MADV_HUGEPAGE`` (where the platform
    has it; without POSIX mmap, torch.empty). The tensor keeps the mapping alive; views of
    it do too."""
    if not hasattr(mmap, "MAP_ANONYMOUS"):   # not a POSIX mmap: torch's own memory
        return torch.empty(nbytes, dtype=torch.uint8)
    size = _round_up(max(nbytes, 1), HUGE_PAGE) + HUGE_PAGE   # room to align the start
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            mm.madvise(advice)
        except OSError as e:   # THP compiled out of the kernel: ordinary pages
            logger.debug("MADV_HUGEPAGE refused (%s): weights on ordinary pages", e)
    raw = torch.frombuffer(mm, dtype=torch.uint8)
    start = (-raw.data_ptr()) % HUGE_PAGE
    return raw[start:start + nbytes]


def trim_heap() -> None:
    """Give the C heap's free memory back to the OS (glibc ``malloc_trim``; nothing
    elsewhere). Tensors under glibc's mmap threshold (which grows to 32 MiB as large blocks
    are freed) live on the heap, and freeing them leaves the pages in the process: after
    the fp32 weights are copied into their panels, the freed copies would otherwise stay in
    RSS (SmolLM2 F32: ~80 MiB after load, ~190 MiB at the peak)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):   # not glibc
        return None


def arena(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[torch.Tensor]:
    """One uninitialised contiguous CPU tensor of ``dtype`` per shape, all carved out of one
    ``huge_page_buffer``, each on a 4 KiB boundary."""
    item = torch.empty(0, dtype=dtype).element_size()
    sizes = [item * torch.Size(s).numel() for s in shapes]
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += _round_up(n, ALIGN)
    buf = huge_page_buffer(total)
    return [buf[o:o + n].view(dtype).view(s) for s, o, n in zip(shapes, offsets, sizes)]

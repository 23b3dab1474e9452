"""GB/s of the 8-bit-activation block matmuls (csrc/cpu/q8_act.c) with the weight read from
memory, as a decode step reads it: each timed call takes the next of enough copies of the
weight to overflow the last-level cache (``--cache-mib`` of copies), interleaved between the
kernel libraries compared, medians of ``--reps`` rounds. SmolLM2-135M's shapes.

    python benchmarks/bench_q8_cold.py --lib new=avx512vnni --lib old=/path/to/old.so
    python benchmarks/bench_q8_cold.py --lib new=avx2 --threads 1 --cpu-time

``--lib NAME=VARIANT_OR_PATH``: a variant of this tree (built as usual) or a library built
from another tree (``ops.cpu.build`` there). ``--cpu-time`` measures process CPU time
instead of wall time: with 1 thread on a shared machine, it leaves out the time another
process held the core (memory stalls still count). ``--copies 1``: the cache-hot figure.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from parallax.ops import cpu

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]


def random_blocks(kind: str, n: int, k: int) -> torch.Tensor:
    """(n, k) of ``kind`` blocks with random codes and sane fp16 scales (~0.06)."""
    elems, nbytes = cpu._ref.GGUF_BLOCKS[kind]
    w = torch.randint(0, 256, (n, k // elems, nbytes), dtype=torch.uint8)
    if kind == "q6_k":
        w[:, :, 208], w[:, :, 209], w[:, :, 192:208] = 0, 0x2C, 3
    else:   # d (and Q4_1's m, Q4_K's dmin) first
        w[:, :, 0], w[:, :, 1] = 0, 0x2C
        if kind in ("q4_1", "q4_k"):
            w[:, :, 2], w[:, :, 3] = 0, 0x2C
    return w.reshape(n, -1).contiguous()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", action="append", required=True, help="NAME=VARIANT_OR_PATH")
    ap.add_argument("--kinds", default="q8_0,q4_0,q4_1")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--cache-mib", type=int, default=96, help="bytes of weight copies")
    ap.add_argument("--copies", type=int, default=0, help="fix the copy count (1: hot)")
    ap.add_argument("--cpu-time", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    cpu.kernels()
    names = []
    for spec in args.lib:
        name, _, what = spec.partition("=")
        path = what if os.path.sep in what else cpu.build(what)
        cpu.load_library(name, path)
        names.append(name)
    print(f"threads {args.threads}, rows {args.rows}, {'CPU' if args.cpu_time else 'wall'} "
          f"time, median of {args.reps}")
    for kind in args.kinds.split(","):
        for n, k in SHAPES:
            w0 = random_blocks(kind, n, k)
            count = args.copies or max(1, (args.cache_mib << 20) // w0.numel())
            ws = [w0] + [w0.clone() for _ in range(count - 1)]
            x = torch.randn(args.rows, k)
            ref = cpu.block_linear_q8(kind, x, w0, isa=names[0])
            # Warm up, and the same values from every library (to the rounding of x's
            # block scales: fp32 in libraries built before they were fp16, 2^-11 a block).
            for name in names:
                out = cpu.block_linear_q8(kind, x, w0, isa=name)
                torch.testing.assert_close(out, ref, rtol=1e-3,
                                           atol=2e-3 * float(ref.abs().max()))
            times = {name: [] for name in names}
            for _ in range(args.reps):
                for name in names:
                    t0 = clock()
                    for w in ws:
                        cpu.block_linear_q8(kind, x, w, isa=name)
                    times[name].append((clock() - t0) / len(ws))
            line = f"{kind} {n:5d} x {k:4d} ({count:3d} copies):"
            for name in names:
                t = statistics.median(times[name])
                line += f"  {name} {t * 1e6:8.1f} us {w0.numel() / t / 1e9:5.1f} GB/s"
            print(line, flush=True)


if __name__ == "__main__":
    main()

"""What calling the CPU kernels as torch ops costs: per call, and per decode step.

    PYTHONPATH=src python benchmarks/bench_op_overhead.py [--calls 20000] [--rounds 5]
        [--before-src DIR [--runs 3] [--tokens 32] [--threads 1]]

1. Per call, on inputs so small that the kernel itself takes next to nothing: the same C
   entry point of the same library called (a) through the torch op from Python
   (``torch.ops.parallax_cpu.*.default``), (b) through ops/cpu.py's wrapper around it (what
   the model calls), and (c) through ctypes with the output allocated in Python, the way
   ops/cpu.py called the kernels before the torch ops. Interleaved rounds, medians, in us.
2. With ``--before-src DIR`` (a source tree of parallax from before, e.g.
   ``git archive <commit> src | tar -x -C DIR``): batch-1 SmolLM2 decode tok/s of this tree
   against that one, each run a fresh process (``PYTHONPATH`` set to the tree), runs
   alternating, medians.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

import torch

DECODE_RUN = r"""
import json, sys, time, torch, parallax
threads, n = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
with parallax.LLM("smollm2-135m", dtype="float32") as llm:
    kw = dict(ignore_eos=True, chat=False)
    p = "The three primary colors are"
    llm.generate(["Warm up"], max_new_tokens=8, **kw)
    t0, c0 = time.perf_counter(), time.process_time()
    llm.generate([p], max_new_tokens=1, **kw)
    t1, c1 = time.perf_counter(), time.process_time()
    llm.generate([p], max_new_tokens=1 + n, **kw)
    t2, c2 = time.perf_counter(), time.process_time()
print(json.dumps({"tok_s": n / ((t2 - t1) - (t1 - t0)), "cpu_tok_s": n / ((c2 - c1) - (c1 - c0)),
                  "file": parallax.__file__}))
"""


def per_call(calls: int, rounds: int) -> dict[str, float]:
    from parallax.ops import cpu
    isa = cpu.kernels()
    if isa is None:
        raise SystemExit(f"CPU kernels unavailable: {cpu.build_error()}")
    lib = ctypes.CDLL(cpu.build(isa))                 # the same library, bound by ctypes
    P, I = ctypes.c_void_p, ctypes.c_int
    lib.parallax_silu_and_mul_f32.argtypes = [P, P, I, I]
    lib.parallax_gemm_packed_f32.argtypes = [P] * 3 + [I] * 4
    x = torch.randn(1, 64)
    packed = cpu.pack(torch.randn(32, 64))
    silu, gemm = torch.ops.parallax_cpu.silu_and_mul_f32.default, \
        torch.ops.parallax_cpu.gemm_packed_f32.default

    def ctypes_silu():
        out = x.new_empty(1, 32)
        lib.parallax_silu_and_mul_f32(x.data_ptr(), out.data_ptr(), 1, 32)
        return out

    def ctypes_gemm():
        rows = x.reshape(-1, 64).contiguous()
        y = torch.empty(1, 32, dtype=torch.float32)
        lib.parallax_gemm_packed_f32(rows.data_ptr(), packed.data_ptr(), y.data_ptr(), 1, 32,
                                     64, torch.get_num_threads())
        return y.view(1, 32)

    cases = {
        "silu_and_mul: torch op": lambda: silu(x, isa),
        "silu_and_mul: ops/cpu.py wrapper": lambda: cpu.silu_and_mul(x),
        "silu_and_mul: ctypes (before)": ctypes_silu,
        "gemm_packed 1x64 @ 64x32: torch op": lambda: gemm(x, packed, None, isa),
        "gemm_packed 1x64 @ 64x32: ops/cpu.py wrapper": lambda: cpu.linear_packed(x, packed),
        "gemm_packed 1x64 @ 64x32: ctypes (before)": ctypes_gemm,
    }
    torch.testing.assert_close(silu(x, isa), ctypes_silu())
    torch.testing.assert_close(gemm(x, packed, None, isa), ctypes_gemm())
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {name: statistics.median(v) for name, v in times.items()}


def decode(tree: str, threads: int, tokens: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    r = subprocess.run([sys.executable, "-c", DECODE_RUN, str(threads), str(tokens)], env=env,
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"decode run on {tree} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--before-src", help="a parallax source tree to compare decode against")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    load0 = os.getloadavg()[0]
    res = per_call(a.calls, a.rounds)
    print(f"\nper call, us (median of {a.rounds} interleaved rounds of {a.calls} calls; "
          f"1-minute load average {load0:.1f}):\n\n| call | us |\n|---|---:|")
    for name, us in res.items():
        print(f"| {name} | {us:.2f} |")
    if a.before_src:
        here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
        runs: dict[str, list[dict]] = {"this tree (torch ops)": [], "before": []}
        for _ in range(a.runs):
            runs["this tree (torch ops)"].append(decode(here, a.threads, a.tokens))
            runs["before"].append(decode(a.before_src, a.threads, a.tokens))
        print(f"\nSmolLM2 batch-1 decode, {a.threads} thread(s), {a.tokens} tokens, fresh "
              f"processes alternating, {a.runs} runs each: tok/s by the wall clock and per "
              "CPU-second of the process (the latter robust to waiting for a core):\n")
        print("| tree | tok/s (median) | runs | tok/CPU-s (median) | runs |\n"
              "|---|---:|---|---:|---|")
        med = {}
        for name, v in runs.items():
            med[name] = [statistics.median(r[key] for r in v) for key in ("tok_s", "cpu_tok_s")]
            each = [", ".join(f"{r[key]:.1f}" for r in v) for key in ("tok_s", "cpu_tok_s")]
            print(f"| {name} | {med[name][0]:.1f} | {each[0]} | {med[name][1]:.1f} | {each[1]} |")
        new, old = med["this tree (torch ops)"], med["before"]
        print(f"\nratio this / before: {new[0] / old[0]:.3f}x wall, {new[1] / old[1]:.3f}x CPU; "
              f"1-minute load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

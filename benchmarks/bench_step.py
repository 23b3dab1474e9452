"""Where one decode step's time goes, and decode tokens/s, for SmolLM2-135M fp32.

    python benchmarks/bench_step.py [--threads 2] [--max-new-tokens 64] [--repeats 3]
                                    [--batches 1,8] [--tp 1] [--pp 1] [--no-breakdown]
                                    [--json out.json]

Decode rate: (time of 1 + N tokens - time of 1 token) / N steps, times the batch (as
bench_generate.py), median over repeats. It uses only ``LLM.generate``, so the same script
measures an older checkout (PYTHONPATH=/other/src) for an interleaved A/B comparison.

Breakdown (the serving engine only): the parts of a step are wrapped with timers during one
more generate of N tokens and reported per step, as wall ms and as CPU ms of the thread
that ran them (time.thread_time: the machine may be shared, CPU time is less noisy):
schedule (Scheduler.schedule), plan (EngineCore._plan), meta (AttentionMetadata.build),
forward (the model's forward), logits (compute_logits), sample (the Sampler), execute (all
of ModelRunner.execute), step (all of EngineCore.step) and, for the caller, wall per token
(generate's time / steps; the difference to ``step`` is the thread hand-off and result
delivery). ``attn`` is the paged attention op summed over layers (inside ``forward``);
where layers run fused (models/fused.py) it is inside ``attn half`` and ``mlp half``, the
two fused ops summed over layers.
The cpu column of the parts is the engine thread's own CPU; the OpenMP worker threads that
help it show only in the caller's process CPU row.

What this found (2026-11, 2-core AVX-512 EPYC, shared): the Python parts of a step (schedule,
plan, metadata, sampling) are < 0.5 ms; the step is the forward's C kernels and torch ops,
and how libgomp waits between their parallel regions (docs/engine.md, "Threads and OpenMP").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch

PROMPT = "Write a short story about a robot who learns to paint."


def isa() -> str:
    with open("/proc/cpuinfo") as f:
        flags = next((line for line in f if line.startswith("flags")), "").split()
    for name in ("avx512f", "avx2", "asimd"):
        if name in flags:
            return name
    return "generic"


def decode_rate(llm, batch: int, new_tokens: int) -> tuple[float, float]:
    """(tokens/s, process CPU ms per decode step) of the decode steps alone."""
    prompts = [PROMPT] * batch

    def run(n):
        w, c = time.perf_counter(), time.process_time()
        llm.generate(prompts, max_new_tokens=n, ignore_eos=True, chat=False)
        return time.perf_counter() - w, time.process_time() - c
    w1, c1 = run(1)
    w2, c2 = run(1 + new_tokens)
    return batch * new_tokens / (w2 - w1), 1e3 * (c2 - c1) / new_tokens


class Timers:
    """Wall and thread-CPU seconds per named part; ``wrap`` patches, ``restore`` undoes."""

    def __init__(self):
        self.wall, self.cpu, self.calls = defaultdict(float), defaultdict(float), defaultdict(int)
        self._undo = []

    def wrap(self, owner, attr: str, name: str) -> None:
        had = attr in vars(owner)
        old = vars(owner).get(attr)
        fn = getattr(owner, attr)
        if isinstance(old, classmethod):
            timed = classmethod(lambda cls, *a, **k: _call(self, name, old.__get__(None, cls), a, k))
        else:
            def timed(*args, **kwargs):
                return _call(self, name, fn, args, kwargs)
        setattr(owner, attr, timed)
        self._undo.append((owner, attr, had, old))

    def restore(self) -> None:
        for owner, attr, had, old in reversed(self._undo):
            if had:
                setattr(owner, attr, old)
            else:
                delattr(owner, attr)
        self._undo.clear()

    def clear(self) -> None:
        self.wall.clear(), self.cpu.clear(), self.calls.clear()


def _call(timers: Timers, name: str, fn, args, kwargs):
    w, c = time.perf_counter(), time.thread_time()
    try:
        return fn(*args, **kwargs)
    finally:
        timers.wall[name] += time.perf_counter() - w
        timers.cpu[name] += time.thread_time() - c
        timers.calls[name] += 1


def breakdown(llm, batch: int, new_tokens: int) -> dict:
    """Per-step ms of each part over one generate of 1 + ``new_tokens`` tokens (one prefill
    step, ``new_tokens`` decode steps; at N=64 the prefill is a small share)."""
    from parallax import ops
    from parallax.models.attention import AttentionMetadata
    from parallax.sampling import Sampler
    core, runner = llm._core, llm._runner
    prompts = [PROMPT] * batch
    t = Timers()
    t.wrap(core.scheduler, "schedule", "schedule")
    t.wrap(core, "_plan", "plan")
    t.wrap(core, "step", "step")
    t.wrap(runner, "execute", "execute")
    t.wrap(AttentionMetadata, "build", "meta")
    t.wrap(runner.model, "forward", "forward")
    t.wrap(ops, "paged_attention_with_kvcache", "attn")
    if hasattr(ops.cpu, "attention_half"):   # trees before the fused layer have none
        t.wrap(ops.cpu, "attention_half", "attn half")
        t.wrap(ops.cpu, "mlp_half", "mlp half")
    t.wrap(runner.model, "compute_logits", "logits")
    t.wrap(Sampler, "__call__", "sample")
    try:
        llm.generate(prompts, max_new_tokens=2, ignore_eos=True, chat=False)   # warm
        t.clear()
        w0, c0 = time.perf_counter(), time.process_time()
        llm.generate(prompts, max_new_tokens=1 + new_tokens, ignore_eos=True, chat=False)
        wall_total, cpu_total = time.perf_counter() - w0, time.process_time() - c0
    finally:
        t.restore()
    steps = t.calls["execute"] or 1
    rows = {name: {"wall_ms": 1e3 * t.wall[name] / steps, "cpu_ms": 1e3 * t.cpu[name] / steps}
            for name in t.wall}
    rows["per step (caller)"] = {"wall_ms": 1e3 * wall_total / steps,
                                 "cpu_ms": 1e3 * cpu_total / steps}
    return {"steps": steps, "parts": rows}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (worker processes of "
                   "threads/(tp*pp) threads each; no breakdown)")
    p.add_argument("--no-breakdown", action="store_true")
    p.add_argument("--json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    import parallax
    world = a.tp * a.pp
    llm = parallax.LLM("smollm2-135m", dtype="float32", tp=a.tp, pp=a.pp,
                       **({} if world == 1 else {"threads_per_rank": max(1, a.threads // world)}))
    result = {"isa": isa(), "threads": a.threads, "tp": a.tp, "pp": a.pp,
              "parallax": parallax.__file__, "batches": {}}
    print(f"ISA {result['isa']}, {a.threads} threads, tp={a.tp} pp={a.pp}, {parallax.__file__}")
    for b in map(int, a.batches.split(",")):
        decode_rate(llm, b, 4)   # warm
        runs = [decode_rate(llm, b, a.max_new_tokens) for _ in range(a.repeats)]
        rates = [r for r, _ in runs]
        entry = {"tok_s": statistics.median(rates), "all": rates,
                 "cpu_ms_per_step": statistics.median(c for _, c in runs)}
        print(f"batch {b}: decode {entry['tok_s']:.1f} tok/s (runs "
              f"{', '.join(f'{r:.1f}' for r in rates)}), process CPU "
              f"{entry['cpu_ms_per_step']:.1f} ms/step")
        if not a.no_breakdown and world == 1 and getattr(llm, "_core", None) is not None:
            entry["breakdown"] = breakdown(llm, b, a.max_new_tokens)
            print(f"  per decode step ({entry['breakdown']['steps']} steps):   wall ms   cpu ms")
            for name, r in entry["breakdown"]["parts"].items():
                print(f"    {name:<20} {r['wall_ms']:8.2f} {r['cpu_ms']:8.2f}")
        result["batches"][b] = entry
    llm.close()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()

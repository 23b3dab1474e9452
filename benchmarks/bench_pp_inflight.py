"""Decode throughput under torchrun at pp=2 with 1 vs 2 steps in flight (SmolLM2-135M fp32).

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_pp_inflight.py \
        [--requests 8] [--max-new-tokens 32] [--rounds 5] [--threads 1] [--json out.json]

Every rank builds ``LLM(pp=2)``; the driver rank (the last stage) submits ``--requests``
different prompts at once, and the decode rate is (time of 1 + N tokens - time of 1 token)
/ N steps, times the requests (as bench_step.py), with the driver process's CPU time per
token. Configurations, interleaved in every
round (A, B, C, A, B, C, ...), medians reported:

- ``depth2``: the engine's default, up to 2 steps in flight over disjoint halves of the
  requests, one micro-batch per step;
- ``depth1-mb2``: one step in flight cut into 2 micro-batches (torchrun's behaviour before
  steps in flight);
- ``depth1-mb1``: one step in flight, one micro-batch (the stages take turns).

The switch between them sets the engine's private depth fields between runs, when no step
is in flight (a benchmark knob, not an API). The other ranks follow until the driver closes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import parallax

PROMPTS = ["Write a short story about a robot who learns to paint.",
           "Explain why the sky is blue to a child.",
           "List three uses of a paperclip that are not holding paper.",
           "Describe the water cycle in simple terms.",
           "What makes a good cup of coffee? Give some advice.",
           "Summarise the plot of a heist movie you would like to see.",
           "Give me a recipe for a quick vegetable soup.",
           "Why do cats purr? Give a few possible reasons."]

CONFIGS = {"depth2": (2, 1), "depth1-mb2": (1, 2), "depth1-mb1": (1, 1)}


def set_depth(llm, depth: int, micro_batches: int) -> None:
    core = llm._core
    core.executor.depth = depth
    core.scheduler.steps_in_flight = depth
    core.micro_batches = micro_batches


def decode_rate(llm, prompts: list[str], new_tokens: int) -> tuple[float, float]:
    """(tokens/s, the driver process's CPU ms per token) of the decode steps alone."""
    def run(n: int) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        handles = [llm.submit(p, max_new_tokens=n, ignore_eos=True, chat=False)
                   for p in prompts]
        for h in handles:
            h.result(timeout=600)
        return time.perf_counter() - t, time.process_time() - c
    (w1, c1), (w2, c2) = run(1), run(1 + new_tokens)
    tokens = len(prompts) * new_tokens
    return tokens / (w2 - w1), 1e3 * (c2 - c1) / tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    prompts = (PROMPTS * (a.requests // len(PROMPTS) + 1))[:a.requests]
    with parallax.LLM("smollm2-135m", pp=2) as llm:
        if int(os.environ["RANK"]) != llm._ctx.driver_rank:
            return                                   # follow until the driver closes
        decode_rate(llm, prompts, 4)                 # warm-up
        rates: dict[str, list[float]] = {name: [] for name in CONFIGS}
        cpu: dict[str, list[float]] = {name: [] for name in CONFIGS}
        for r in range(a.rounds):
            for name, (depth, mb) in CONFIGS.items():
                set_depth(llm, depth, mb)
                rate, ms = decode_rate(llm, prompts, a.max_new_tokens)
                rates[name].append(rate)
                cpu[name].append(ms)
            print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items()),
                  flush=True)
        set_depth(llm, *CONFIGS["depth2"])
    base = statistics.median(rates["depth1-mb2"])
    print(f"\n{a.requests} requests, {a.max_new_tokens} new tokens, pp=2 under torchrun, "
          f"{a.threads} thread(s) per rank, load {os.getloadavg()[0]:.1f}; median tok/s:")
    for name, v in rates.items():
        med = statistics.median(v)
        print(f"  {name:11s} {med:7.1f}  ({med / base:.2f}x depth1-mb2; driver CPU "
              f"{statistics.median(cpu[name]):.2f} ms/token; runs "
              f"{', '.join(f'{x:.1f}' for x in v)})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rates": rates, "driver_cpu_ms_per_token": cpu, "args": vars(a)}, f,
                      indent=1)


if __name__ == "__main__":
    main()

"""Tensor- and pipeline-parallel decode on SmolLM2-135M, one table per mode.

    python benchmarks/bench_parallel.py tp  [--device cpu|cuda] [--new-tokens 48]
    python benchmarks/bench_parallel.py pp  [--device cpu|cuda] [--batch 16]

tp: decode tokens/s at tp=1 (one process, all cores) vs tp=2 (two processes, one thread
each) at batch 1 and 8, plus the time the collectives of one decode step take (measured
in the workers by timing the step's all-reduces and logits gather on real shapes).
pp: generated tokens/s at batch 16 for pp=1, pp=2 without micro-batches and pp=2 with
2 and 4, plus the busy fraction: sum over ranks of compute time / (ranks x wall time).
On GPUs (--device cuda) the same runs use NCCL.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import torch

log = logging.getLogger("bench_parallel")


class CollectiveProbe:
    """A worker-side engine that times one decode step's collectives on real shapes:
    2 all-reduces per layer (o_proj, down_proj) and the logits gather."""

    def __init__(self, ctx, hidden: int, vocab: int, layers: int):
        self.ctx, self.hidden, self.vocab, self.layers = ctx, hidden, vocab, layers

    def step_ms(self, batch: int, iters: int = 50) -> float:
        from parallax.parallel import collectives as C
        from parallax.parallel.sharding import split_evenly
        dev = self.ctx.device
        x = torch.randn(batch, 1, self.hidden, device=dev)
        sizes = [split_evenly(self.vocab, self.ctx.tp_size, r)[1] for r in range(self.ctx.tp_size)]
        logits = torch.randn(batch, sizes[self.ctx.tp_rank], device=dev)
        times = []
        for i in range(iters + 5):
            C.barrier(self.ctx)
            t = time.perf_counter()
            for _ in range(2 * self.layers):
                C.all_reduce_tp(x, self.ctx)
            C.gather_tp(logits, self.ctx, sizes)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= 5:
                times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3


def _rate(llm, prompts, new_tokens: int) -> float:
    llm.generate(prompts, max_new_tokens=2, ignore_eos=True)
    t = time.perf_counter()
    llm.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)
    return len(prompts) * new_tokens / (time.perf_counter() - t)


def _decode_rate(llm, prompts, new_tokens: int) -> float:
    """Decode-only tokens/s: time(1 + N) - time(1)."""
    t0 = time.perf_counter()
    llm.generate(prompts, max_new_tokens=1, ignore_eos=True)
    t1 = time.perf_counter()
    llm.generate(prompts, max_new_tokens=1 + new_tokens, ignore_eos=True)
    t2 = time.perf_counter()
    return len(prompts) * new_tokens / ((t2 - t1) - (t1 - t0))


def bench_tp(a) -> None:
    import parallax
    from parallax.parallel.launch import WorkerPool
    cores = os.cpu_count() or 2
    prompts = {b: [[1, 2, 3, 4, 5, 6, 7, 8]] * b for b in (1, 8)}
    rows = []
    for tp in (1, 2):
        threads = cores if tp == 1 else max(1, cores // tp)
        torch.set_num_threads(cores)   # tp=1 runs in this process
        with parallax.LLM("smollm2-135m", tp=tp, device=a.device, threads_per_rank=threads) as llm:
            for b, p in prompts.items():
                _decode_rate(llm, p, 4)
                rate = statistics.median(_decode_rate(llm, p, a.new_tokens) for _ in range(a.repeats))
                rows.append((tp, threads, b, rate))
                log.info("tp=%d batch %d: %.1f tok/s", tp, b, rate)
    cfg = _config()
    comm = {}
    with WorkerPool(CollectiveProbe, (cfg.hidden_size, cfg.vocab_size, cfg.num_layers), tp_size=2,
                    pp_size=1, device=a.device, threads_per_rank=1) as pool:
        for b in prompts:
            comm[b] = pool.call("step_ms", b)
    base = {b: r for tp, _, b, r in rows if tp == 1}
    print(f"\nSmolLM2-135M fp32 decode, {cores} cores in all, {a.new_tokens} new tokens\n")
    print("| tp | threads/rank | batch | tok/s | vs tp=1 | collectives ms/step |")
    print("|---:|---:|---:|---:|---:|---:|")
    for tp, threads, b, r in rows:
        c = f"{comm[b]:.2f}" if tp == 2 else "-"
        print(f"| {tp} | {threads} | {b} | {r:.1f} | {r / base[b]:.2f}x | {c} |")


def _config():
    from parallax.loading import open_checkpoint
    ckpt = open_checkpoint("smollm2-135m")
    cfg = ckpt.config
    ckpt.close()
    return cfg


def bench_pp(a) -> None:
    import parallax
    prompts = [[1 + i, 2, 3, 4, 5, 6, 7, 8] for i in range(a.batch)]
    rows = []
    torch.set_num_threads(1)   # pp=1 runs in this process
    for pp, mb in ((1, 1), (2, 1), (2, 2), (2, 4)):
        with parallax.LLM("smollm2-135m", pp=pp, micro_batches=mb, device=a.device,
                          threads_per_rank=1) as llm:
            rate = statistics.median(_rate(llm, prompts, a.new_tokens) for _ in range(a.repeats))
            st = llm.generation_stats()
            busy = sum(s["busy_s"] for s in st) / (len(st) * max(s["wall_s"] for s in st))
            rows.append((pp, mb, rate, busy))
            log.info("pp=%d micro-batches=%d: %.1f tok/s, busy %.0f%%", pp, mb, rate, 100 * busy)
    base = next(r for pp, mb, r, _ in rows if pp == 2 and mb == 1)
    print(f"\nSmolLM2-135M fp32, batch {a.batch}, {a.new_tokens} new tokens, one thread per rank\n")
    print("| pp | micro-batches | tok/s | vs pp=2 without micro-batches | busy fraction |")
    print("|---:|---:|---:|---:|---:|")
    for pp, mb, r, busy in rows:
        print(f"| {pp} | {mb} | {r:.1f} | {r / base:.2f}x | {busy:.0%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["tp", "pp"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    bench_tp(a) if a.mode == "tp" else bench_pp(a)


if __name__ == "__main__":
    main()

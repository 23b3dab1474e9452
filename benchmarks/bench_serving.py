"""Serving benchmark: requests arriving over time, parallax's engine vs static batching vs HF.

    python benchmarks/bench_serving.py                       # short default run (~2-3 min)
    python benchmarks/bench_serving.py --num-requests 64 --rates 1,2,4,8,inf --hf

Workload: ``--num-requests`` requests (default 32) with random prompt lengths
(``--prompt-len``, default 32-512 tokens) and output lengths (``--output-len``, default
16-256), fixed seed, arriving as a Poisson process at each rate of ``--rates`` (requests/s;
``inf`` = a burst, all at t=0). ``--lengths lognormal`` (default) draws each length from a
log-normal with sigma 0.8 and median lo * (hi/lo)**0.4 (97 prompt / 49 output tokens with the
defaults; means ~134 / ~67), clipped to [lo, hi]: chat traffic is long-tailed like that, most
requests short and a few long (e.g. ShareGPT, LMSYS-Chat). ``--lengths uniform`` draws
uniformly in [lo, hi] (the mean is then half the maximum, which flatters a static cache).
Systems, on the same weights (SmolLM2-135M, fp32, one process):

- ``parallax``: every request ``submit``ted at its arrival time, deltas timed as they stream.
  ``parallax@N`` (in ``--systems``): the same with the engine's token budget
  (``max_num_batched_tokens``) set to N for that run, to compare budgets in one run.
- ``static``: the old way (the ``generate()`` the engine replaced), emulated on the same
  kernels: requests in arrival order form batches of ``--batch``; a batch starts when its last
  request has arrived and the previous batch is done; every prompt is right-padded to the
  batch's longest (the old loop prefilled the padded ``(B, T_max)`` block, and HF batches pad
  the same way), and the batch runs until its longest output is done (every member decodes
  that long).
- ``static-unpadded``: the same batches with each prompt prefilled at its own length, a
  stronger baseline than the old way (only the decode rows are wasted).
- ``hf`` (``--hf``): transformers ``generate()`` on the same batches (left padding); not
  streamed, so its TTFT is its end-to-end latency.

Reported per system and rate: requests/s, output tokens/s, TTFT, TPOT (time per output token
after the first), ITL (inter-token latency) and E2E latency: mean, p50, p99; and the process's
CPU seconds over the run with output tokens per CPU second (``--threads 1``: the work itself,
which a shared machine distorts far less than wall time). Then the KV
memory the engine actually held (peak blocks in use) against a static ``(batch, S_max)``
cache, the same for the first 32 requests in a burst stepped by the scheduler alone
(deterministic: no timing involved), and (``--decode-overhead``) decode-only throughput of the engine with 32 running
requests against a plain batch-32 decode loop over the same runner (scheduling overhead).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import threading
import time
from dataclasses import dataclass, field

import torch

import parallax


@dataclass
class Req:
    prompt: list[int]
    out_len: int
    arrival: float = 0.0
    times: list[float] = field(default_factory=list)   # when each output token arrived
    start: float = 0.0                                  # when it was actually sent


def draw_length(rng: random.Random, lo: int, hi: int, kind: str) -> int:
    """A length in [lo, hi]: uniform, or log-normal (sigma 0.8, median lo*(hi/lo)**0.4)."""
    if kind == "uniform":
        return rng.randint(lo, hi)
    median = lo * (hi / lo) ** 0.4
    return max(lo, min(hi, round(rng.lognormvariate(math.log(median), 0.8))))


def workload(n: int, prompt_len: tuple[int, int], output_len: tuple[int, int], vocab: int,
             seed: int, lengths: str = "lognormal") -> list[Req]:
    rng = random.Random(seed)
    return [Req([rng.randrange(100, vocab) for _ in range(draw_length(rng, *prompt_len, lengths))],
                draw_length(rng, *output_len, lengths)) for _ in range(n)]


def arrivals(reqs: list[Req], rate: float, seed: int) -> None:
    rng = random.Random(seed + 1)
    t = 0.0
    for r in reqs:
        r.arrival, r.times = t, []
        if math.isfinite(rate):
            t += rng.expovariate(rate)


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def summarize(reqs: list[Req], t0: float, t_end: float) -> dict:
    ttft = [r.times[0] - (t0 + r.arrival) for r in reqs]
    e2e = [r.times[-1] - (t0 + r.arrival) for r in reqs]
    tpot = [(r.times[-1] - r.times[0]) / (len(r.times) - 1) for r in reqs if len(r.times) > 1]
    itl = [b - a for r in reqs for a, b in zip(r.times, r.times[1:])]
    wall = t_end - t0
    out = {"req_s": len(reqs) / wall, "tok_s": sum(len(r.times) for r in reqs) / wall}
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e", e2e)):
        out[name] = (statistics.fmean(xs) if xs else float("nan"), _pct(xs, 50), _pct(xs, 99))
    return out


# ---------------------------------------------------------------------- systems
def run_parallax(llm, reqs: list[Req], peak: dict) -> tuple[float, float]:
    t0 = time.perf_counter()
    threads = []

    def consume(r: Req, handle) -> None:
        for d in handle:
            now = time.perf_counter()
            r.times += [now] * len(d.token_ids)

    for r in reqs:
        delay = t0 + r.arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        h = llm.submit(r.prompt, max_new_tokens=r.out_len, ignore_eos=True)
        t = threading.Thread(target=consume, args=(r, h))
        t.start()
        threads.append(t)
        peak["usage"] = max(peak["usage"], llm.stats()["kv_cache_usage"])
    for t in threads:       # join, sampling the KV usage every 20 ms meanwhile: the end
        while t.is_alive():  # time is taken when the last thread ends, not on a poll tick
            peak["usage"] = max(peak["usage"], llm.stats()["kv_cache_usage"])
            t.join(0.02)
    return t0, time.perf_counter()


def _batches(reqs: list[Req], b: int) -> list[list[Req]]:
    return [reqs[i:i + b] for i in range(0, len(reqs), b)]


def run_static(llm, reqs: list[Req], batch: int, pad: int | None) -> tuple[float, float]:
    """Arrival-ordered batches, one at a time, each running to its longest output; with
    ``pad`` set, each prompt is right-padded with that token to its batch's longest."""
    t0 = time.perf_counter()
    for group in _batches(reqs, batch):
        delay = t0 + group[-1].arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        longest = max(r.out_len for r in group)
        width = max(len(r.prompt) for r in group)
        # Right padding keeps each padded prompt's prefix unique: no prefix-cache hits.
        prompts = [r.prompt if pad is None else r.prompt + [pad] * (width - len(r.prompt))
                   for r in group]
        handles = [llm.submit(p, max_new_tokens=longest, ignore_eos=True) for p in prompts]

        def consume(r: Req, h) -> None:
            for d in h:
                now = time.perf_counter()
                if len(r.times) < r.out_len:      # its own tokens; the rest is the batch's waste
                    r.times += [now] * len(d.token_ids)

        ts = [threading.Thread(target=consume, args=(r, h)) for r, h in zip(group, handles)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        end = time.perf_counter()
        for r in group:   # a request completes when its batch returns
            r.times[-1] = end
    return t0, time.perf_counter()


def run_hf(model, reqs: list[Req], batch: int, pad_id: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    for group in _batches(reqs, batch):
        delay = t0 + group[-1].arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        width = max(len(r.prompt) for r in group)
        ids = torch.tensor([[pad_id] * (width - len(r.prompt)) + r.prompt for r in group])
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in group])
        longest = max(r.out_len for r in group)
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=longest,
                           min_new_tokens=longest, do_sample=False, pad_token_id=pad_id)
        end = time.perf_counter()
        for r in group:
            r.times = [end] * r.out_len       # not streamed: every token arrives at the end
    return t0, time.perf_counter()


# ---------------------------------------------------------------------- decode overhead
def decode_overhead(llm, n_seqs: int = 32, steps: int = 32, repeats: int = 3) -> tuple[float, float]:
    """Decode tok/s with n_seqs running through the engine vs a plain loop of batch decode
    steps on the same runner (no scheduler, no requests, argmax sampling): interleaved."""
    from parallax.engine.runner import NewRequest, StepPlan
    from parallax.sampling import SamplingParams
    runner = llm._runner
    prompts = [[1, 504, 3458, 314, 260, 400 + i] for i in range(n_seqs)]

    def engine_rate() -> float:
        t0 = time.perf_counter()
        llm.generate(prompts, max_new_tokens=1, ignore_eos=True)
        t1 = time.perf_counter()
        llm.generate(prompts, max_new_tokens=1 + steps, ignore_eos=True)
        t2 = time.perf_counter()
        return n_seqs * steps / ((t2 - t1) - (t1 - t0))

    def plain_rate() -> float:
        per = -(-(6 + steps + 1) // runner.block_size)
        tables = [list(range(i * per, (i + 1) * per)) for i in range(n_seqs)]
        ids = list(range(10_000, 10_000 + n_seqs))
        new = [NewRequest(i, SamplingParams()) for i in ids]
        runner.execute(StepPlan([t for p in prompts for t in p], [(0, 6, t) for t in tables],
                                [6 * (i + 1) - 1 for i in range(n_seqs)], ids, new))
        t0 = time.perf_counter()
        toks = [1] * n_seqs
        for s in range(steps):
            toks = runner.execute(StepPlan(toks, [(6 + s, 1, t) for t in tables],
                                           list(range(n_seqs)), ids))
        rate = n_seqs * steps / (time.perf_counter() - t0)
        runner.execute(StepPlan([], [], [], [], finished=ids))
        llm._core.bm.reset_prefix_cache()   # those blocks were written behind its back
        return rate

    eng, plain = [], []
    for _ in range(repeats):
        eng.append(engine_rate())
        plain.append(plain_rate())
    return statistics.median(eng), statistics.median(plain)


# ---------------------------------------------------------------------- main
def burst_kv_tokens(reqs: list[Req], block_size: int, max_num_seqs: int,
                    max_num_batched_tokens: int) -> int:
    """Peak KV token slots the engine's scheduler and block manager hold for ``reqs`` all
    arriving at once, stepped without the model (with ignore_eos the schedule does not
    depend on the sampled tokens, nor on timing in a burst)."""
    from parallax.engine.block_manager import BlockManager
    from parallax.engine.request import Request, StopConditions
    from parallax.engine.scheduler import Scheduler
    from parallax.sampling import SamplingParams
    need = sum(len(r.prompt) + r.out_len for r in reqs)
    bm = BlockManager(-(-need // block_size) + len(reqs), block_size)
    sched = Scheduler(bm, max_num_seqs, max_num_batched_tokens)
    for i, r in enumerate(reqs):
        sched.add(Request(i, r.prompt, SamplingParams(), StopConditions(r.out_len)))
    peak = 0
    while sched.has_work:
        out = sched.schedule()
        peak = max(peak, (bm.num_blocks - bm.num_free_blocks) * block_size)
        sched.update(out)
        for s in out.scheduled:
            if s.samples and s.request.append_token(0).finish_reason:
                sched.finish(s.request)
    return peak


def _fmt(name: str, rate: float, s: dict, cpu_s: float, tokens: int) -> str:
    ms = lambda t: "/".join(f"{1e3 * x:.0f}" for x in t)   # noqa: E731
    return (f"| {name:15s} | {rate:>5g} | {s['req_s']:6.2f} | {s['tok_s']:7.1f} | {ms(s['ttft'])} | "
            f"{ms(s['tpot'])} | {ms(s['itl'])} | {ms(s['e2e'])} | {cpu_s:.1f} | "
            f"{tokens / cpu_s:.1f} |")


def warm_up(llm, prompt: list[int]) -> None:
    """Build the kernels and let ops/cpu.py time its matmul paths for every row bucket
    (``choose``: once per weight shape and bucket, ~0.1-0.5 s each) before any system is
    timed: batches of 1, 3, 8, 16 and 48 short prompts decode 1-48 rows and prefill 8-384
    tokens a step. Without it the first system timed (the engine) paid the timing of the
    buckets it reached first inside its run (~6% of its CPU in a burst) and the next one
    found them done."""
    llm.generate([prompt], max_new_tokens=4)
    for n in (1, 3, 8, 16, 48):
        llm.generate([prompt[:8]] * n, max_new_tokens=3, ignore_eos=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(32, 512))
    ap.add_argument("--output-len", type=int, nargs=2, default=(16, 256))
    ap.add_argument("--lengths", choices=("lognormal", "uniform"), default="lognormal",
                    help="length distribution in the --prompt-len / --output-len ranges")
    ap.add_argument("--rates", default="2,inf", help="requests/s, comma-separated; inf = burst")
    ap.add_argument("--batch", type=int, default=8, help="static/HF batch size")
    ap.add_argument("--systems", default="parallax,static,static-unpadded",
                    help="comma-separated: parallax, parallax@BUDGET, static, "
                         "static-unpadded, hf")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="the engine's token budget per step (default: the LLM's)")
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help="the engine's running requests at most (default: the LLM's)")
    ap.add_argument("--hf", action="store_true", help="also HF transformers generate()")
    ap.add_argument("--decode-overhead", action="store_true",
                    help="engine vs plain batch-32 decode loop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); 1 makes the CPU seconds the work")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    systems = a.systems.split(",") + (["hf"] if a.hf else [])
    engine_kw = {k: v for k, v in (("max_num_batched_tokens", a.max_num_batched_tokens),
                                   ("max_num_seqs", a.max_num_seqs)) if v is not None}
    llm = parallax.LLM(a.model, **engine_kw)
    reqs0 = workload(a.num_requests, tuple(a.prompt_len), tuple(a.output_len),
                     llm.config.vocab_size, a.seed, a.lengths)
    warm_up(llm, reqs0[0].prompt)
    hf = None
    if "hf" in systems:
        import os
        from transformers import AutoModelForCausalLM
        from parallax.loading import resolve_model_path
        path = resolve_model_path(a.model)
        if path.endswith(".gguf"):
            folder, name = os.path.split(path)
            hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        else:
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        hf.eval()
    mean = lambda xs: sum(xs) / len(xs)   # noqa: E731
    print(f"{a.num_requests} requests, {a.lengths} lengths: prompts {a.prompt_len[0]}-"
          f"{a.prompt_len[1]} tokens (mean {mean([len(r.prompt) for r in reqs0]):.0f}), outputs "
          f"{a.output_len[0]}-{a.output_len[1]} (mean {mean([r.out_len for r in reqs0]):.0f}), "
          f"static/HF batch {a.batch}, engine max_num_batched_tokens "
          f"{llm._core.scheduler.max_num_batched_tokens}, max_num_seqs "
          f"{llm._core.scheduler.max_num_seqs}, threads {torch.get_num_threads()}")
    print("| system          |  rate |  req/s |   tok/s | TTFT ms mean/p50/p99 | TPOT ms | ITL ms | E2E ms "
          "| CPU s | tok/CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    peak_tokens = 0
    pad_id = llm.config.pad_token_id or 0
    ratios = []
    for rate in [float(x) for x in a.rates.split(",")]:
        tok_s = {}
        for system in systems:
            reqs = [Req(r.prompt, r.out_len) for r in reqs0]
            arrivals(reqs, rate, a.seed)
            # Every system starts cold: an earlier run's prompts would be prefix-cache hits.
            llm._core.bm.reset_prefix_cache()
            cpu0 = time.process_time()
            if system.split("@")[0] == "parallax":
                peak = {"usage": 0.0}
                sched = llm._core.scheduler
                default_budget = sched.max_num_batched_tokens
                if "@" in system:      # the engine thread reads it at its next schedule()
                    sched.max_num_batched_tokens = int(system.split("@")[1])
                try:
                    t0, t1 = run_parallax(llm, reqs, peak)
                finally:
                    sched.max_num_batched_tokens = default_budget
                peak_tokens = max(peak_tokens, int(peak["usage"] * llm.stats()["kv_cache_tokens"]))
            elif system in ("static", "static-unpadded"):
                t0, t1 = run_static(llm, reqs, a.batch, pad_id if system == "static" else None)
            else:
                t0, t1 = run_hf(hf, reqs, a.batch, pad_id)
            summary = summarize(reqs, t0, t1)
            tok_s[system] = summary["tok_s"]
            print(_fmt(system, rate, summary, time.process_time() - cpu0,
                       sum(r.out_len for r in reqs)), flush=True)
        if "parallax" in tok_s:
            ratios += [f"{rate:g} req/s: " + ", ".join(
                f"{tok_s['parallax'] / v:.2f}x {k}" for k, v in tok_s.items() if k != "parallax")]
    if ratios:
        print("\nengine output tok/s over the others': " + "; ".join(ratios))
    s_max = max(len(r.prompt) + r.out_len for r in reqs0)
    static_tokens = min(32, a.num_requests) * s_max
    print(f"\nKV memory: the engine held at most {peak_tokens} token slots (blocks in use); a "
          f"static ({min(32, a.num_requests)}, S_max={s_max}) cache needs {static_tokens}: "
          f"{peak_tokens / static_tokens:.2f}x")
    burst = reqs0[:32]
    s_max32 = max(len(r.prompt) + r.out_len for r in burst)
    held = burst_kv_tokens(burst, llm._core.bm.block_size, llm._core.scheduler.max_num_seqs,
                           llm._core.scheduler.max_num_batched_tokens)
    print(f"KV memory, {len(burst)} requests in a burst (scheduler and block manager stepped "
          f"without the model): {held} token slots at peak vs {len(burst) * s_max32} for a "
          f"static ({len(burst)}, S_max={s_max32}) cache: {held / (len(burst) * s_max32):.2f}x")
    if a.decode_overhead:
        eng, plain = decode_overhead(llm)
        print(f"decode-only, 32 running requests: engine {eng:.1f} tok/s, plain batch-32 "
              f"decode loop {plain:.1f} tok/s: {eng / plain:.1%}")
    llm.close()


if __name__ == "__main__":
    main()

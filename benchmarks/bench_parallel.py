"""Tensor- and pipeline-parallel decode on SmolLM2-135M, one markdown table.

    python benchmarks/bench_parallel.py [tp|pp|all] [--device cpu|cuda] [--threads 2]
                                        [--max-new-tokens 48] [--batch 16] [--repeats 3]
    parallax bench parallel ...        (the same, through the CLI)

tp: decode tokens/s (prefill subtracted: t(1 + N) - t(1)) at batch 1 and 8 for tp=1 (one
    process, ``--threads`` threads) vs tp=2 (two processes, threads/2 each, so both use the
    same cores), runs interleaved. Collective time per decode step is measured two ways in the tp=2 workers:
    - "in decode": every call of the tp collectives (``all_reduce_tp`` after o_proj and
      down_proj, ``gather_tp`` of the logits) is timed inside a real generate, on each rank;
      (t(1 + N) - t(1)) / N per rank. This includes waiting for the slower rank (SmolLM2's
      9 heads split 6 + 3 over tp=2, so rank 1 waits for rank 0 in each all-reduce);
      the smaller of the two ranks' numbers is closest to the pure transfer cost.
    - "isolated": the same 2 x layers all-reduces of a (batch, 1, hidden) activation and
      the logits gather, back to back after a barrier: the pure cost of the collectives.
pp: generated tokens/s over a whole generate (prefill included) at batch ``--batch`` (16)
    for pp=1, pp=2 without micro-batches and pp=2 with 2 and 4, one thread per rank, runs
    interleaved. The
    busy fraction is sum over ranks of compute time / (ranks x wall time): each rank times
    its own model forward (+ sampling on the last stage) inside generate and reports it
    through ``LLM.generation_stats()``; the rest of a rank's wall time is waiting for
    activations or tokens from the other stage.
With --device cuda the same runs use NCCL (CUDA timings synchronise around each collective).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

log = logging.getLogger("bench_parallel")
MODEL = "smollm2-135m"


# ---------------------------------------------------------------------- worker-side probes
class CollectiveProbe:
    """Worker factory: times one decode step's collectives on real shapes, isolated:
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


def _timed(fn, clock: dict, cuda: bool):
    def wrapper(*args, **kwargs):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        clock["s"] += time.perf_counter() - t
        clock["calls"] += 1
        return out
    return wrapper


class TimedCollectivesEngine:
    """Worker factory: a parallax ModelRunner whose tp collectives are timed in place.

    The parallel layers call ``collectives.all_reduce_tp`` / ``gather_tp`` through the
    module, so wrapping the module's functions in this worker process times every call.
    Every rank runs the same hand-made step plans (a prefill, then decode steps feeding a
    fixed token: the collectives' cost does not depend on which token).
    """

    BLOCKS_PER_SEQ = 64     # 1024 tokens per sequence at block size 16

    def __init__(self, ctx, model: str):
        from parallax.engine.runner import ModelRunner
        from parallax.parallel import collectives as C
        self.ctx = ctx
        self.engine = ModelRunner(ctx, model, num_blocks=64 * self.BLOCKS_PER_SEQ)
        self.clock = {"s": 0.0, "calls": 0}
        cuda = ctx.device.type == "cuda"
        C.all_reduce_tp = _timed(C.all_reduce_tp, self.clock, cuda)
        C.gather_tp = _timed(C.gather_tp, self.clock, cuda)

    def _comm_s(self, prompts: list[list[int]], n: int) -> float:
        from parallax.engine.runner import StepPlan
        self.clock["s"] = 0.0
        m = self.BLOCKS_PER_SEQ
        tables = [list(range(i * m, (i + 1) * m)) for i in range(len(prompts))]
        lens = [len(p) for p in prompts]
        self.engine.execute(StepPlan([t for p in prompts for t in p],
                                     [(0, n_, t) for n_, t in zip(lens, tables)], [], []))
        for step in range(n - 1):
            self.engine.execute(StepPlan([1] * len(prompts),
                                         [(n_ + step, 1, t) for n_, t in zip(lens, tables)],
                                         [], []))
        return self.clock["s"]

    def comm_ms_per_step(self, prompts: list[list[int]], new_tokens: int, repeats: int) -> list[float]:
        """Every rank's collective ms per decode step, median over repeats."""
        from parallax.parallel import collectives as C
        self._comm_s(prompts, 2)   # warm-up
        per = [(self._comm_s(prompts, 1 + new_tokens) - self._comm_s(prompts, 1)) / new_tokens
               for _ in range(repeats)]
        return C.all_gather_object(statistics.median(per) * 1e3, self.ctx)


# ---------------------------------------------------------------------- driver side
def _decode_rate(llm, prompts, new_tokens: int) -> float:
    """Decode-only tokens/s for the batch: N steps = t(1 + N) - t(1)."""
    t0 = time.perf_counter()
    llm.generate(prompts, max_new_tokens=1, ignore_eos=True)
    t1 = time.perf_counter()
    llm.generate(prompts, max_new_tokens=1 + new_tokens, ignore_eos=True)
    t2 = time.perf_counter()
    return len(prompts) * new_tokens / ((t2 - t1) - (t1 - t0))


def _throughput(llm, prompts, new_tokens: int) -> tuple[float, float]:
    """Generated tokens/s over a whole generate (prefill included), and its busy fraction."""
    before = llm.generation_stats()
    t = time.perf_counter()
    llm.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)
    wall = time.perf_counter() - t
    rate = len(prompts) * new_tokens / wall
    after = llm.generation_stats()
    busy = sum(a["busy_s"] - b["busy_s"] for a, b in zip(after, before)) / (len(after) * wall)
    return rate, busy


def _config():
    from parallax.loading import open_checkpoint
    ckpt = open_checkpoint(MODEL)
    try:
        return ckpt.config
    finally:
        ckpt.close()


def bench_tp(a) -> list[dict]:
    import parallax
    from parallax.parallel.launch import WorkerPool
    prompts = {b: [[1, 2, 3, 4, 5, 6, 7, 8]] * b for b in (1, 8)}
    rows = []
    torch.set_num_threads(a.threads)   # tp=1 runs in this process
    half = max(1, a.threads // 2)
    # Both layouts stay loaded and their runs alternate (tp=1, tp=2, tp=1, ...), so drift
    # on the machine hits both alike; the idle one's processes wait on a pipe.
    with parallax.LLM(MODEL, device=a.device) as one, \
            parallax.LLM(MODEL, tp=2, device=a.device, threads_per_rank=half) as two:
        for b, p in prompts.items():
            rates: dict[int, list[float]] = {1: [], 2: []}
            for llm in (one, two):
                _decode_rate(llm, p, 4)    # warm-up
            for _ in range(a.repeats):
                for tp, llm in ((1, one), (2, two)):
                    rates[tp].append(_decode_rate(llm, p, a.new_tokens))
            for tp in (1, 2):
                rate = statistics.median(rates[tp])
                rows.append(dict(bench="tp", layout=f"tp={tp}", procs=tp,
                                 threads=a.threads if tp == 1 else half, batch=b, tok_s=rate))
                log.info("tp=%d batch %d: %.1f tok/s (runs: %s)", tp, b, rate,
                         ", ".join(f"{r:.0f}" for r in rates[tp]))

    log.info("tp=2: timing collectives inside decode")
    in_decode = {}
    with WorkerPool(TimedCollectivesEngine, (MODEL,), tp_size=2, pp_size=1, device=a.device,
                    threads_per_rank=max(1, a.threads // 2)) as pool:
        for b, p in prompts.items():
            in_decode[b] = pool.call("comm_ms_per_step", p, a.new_tokens, a.repeats)
    log.info("tp=2: timing collectives in isolation")
    cfg = _config()
    isolated = {}
    with WorkerPool(CollectiveProbe, (cfg.hidden_size, cfg.vocab_size, cfg.num_layers),
                    tp_size=2, pp_size=1, device=a.device,
                    threads_per_rank=max(1, a.threads // 2)) as pool:
        for b in prompts:
            isolated[b] = pool.call("step_ms", b)
    base = {r["batch"]: r["tok_s"] for r in rows if r["layout"] == "tp=1"}
    for r in rows:
        r["vs"] = r["tok_s"] / base[r["batch"]]
        if r["layout"] == "tp=2":
            r["comm"] = (" / ".join(f"{x:.2f}" for x in in_decode[r["batch"]])
                         + f" ({isolated[r['batch']]:.2f})")
    return rows


def bench_pp(a) -> list[dict]:
    import parallax
    prompts = [[1 + i, 2, 3, 4, 5, 6, 7, 8] for i in range(a.batch)]
    torch.set_num_threads(1)   # pp=1 runs in this process
    layouts = ((1, 1), (2, 1), (2, 2), (2, 4))
    # All layouts stay loaded and their runs alternate, as in bench_tp.
    llms = [parallax.LLM(MODEL, pp=pp, micro_batches=mb, device=a.device, threads_per_rank=1)
            for pp, mb in layouts]
    try:
        for llm in llms:
            _throughput(llm, prompts, 4)   # warm-up
        runs: list[list[tuple[float, float]]] = [[] for _ in layouts]
        for _ in range(a.repeats):
            for i, llm in enumerate(llms):
                runs[i].append(_throughput(llm, prompts, a.new_tokens))
    finally:
        for llm in llms:
            llm.close()
    rows = []
    for (pp, mb), rs in zip(layouts, runs):
        rate = statistics.median(r for r, _ in rs)
        busy = statistics.median(b for _, b in rs)
        rows.append(dict(bench="pp", layout=f"pp={pp}, {mb} micro-batch" + "es" * (mb > 1),
                         procs=pp, threads=1, batch=a.batch, tok_s=rate, busy=busy))
        log.info("pp=%d micro-batches=%d: %.1f tok/s, busy %.0f%% (runs: %s)", pp, mb, rate,
                 100 * busy, ", ".join(f"{r:.0f}" for r, _ in rs))
    base = next(r["tok_s"] for r in rows if r["procs"] == 2 and "1 micro" in r["layout"])
    for r in rows:
        r["vs"] = r["tok_s"] / base
    return rows


def print_table(rows: list[dict], a) -> None:
    print(f"\nSmolLM2-135M fp32 on {a.device}, {a.new_tokens} new tokens, median of {a.repeats}; "
          f"tp: decode tok/s vs tp=1; pp: generated tok/s (prefill included) vs pp=2 without "
          f"micro-batches\n")
    print("| bench | layout | processes x threads | batch | tok/s | vs baseline "
          "| collectives ms/step: in decode, rank 0 / 1 (isolated) | busy fraction |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        busy = f"{r['busy']:.0%}" if "busy" in r else "-"
        print(f"| {r['bench']} | {r['layout']} | {r['procs']} x {r['threads']} | {r['batch']} | "
              f"{r['tok_s']:.1f} | {r['vs']:.2f}x | {r.get('comm', '-')} | {busy} |")


def main() -> None:
    ap = argparse.ArgumentParser(prog="bench_parallel", description=__doc__.splitlines()[0])
    ap.add_argument("mode", nargs="?", choices=["tp", "pp", "all"], default="all")
    ap.add_argument("--device", default="cpu", help="cpu (gloo + shared memory) | cuda (NCCL)")
    ap.add_argument("--threads", type=int, default=2,
                    help="cores in all for tp (tp=1: this many threads; tp=2: half each)")
    ap.add_argument("--max-new-tokens", "--new-tokens", dest="new_tokens", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16, help="batch of the pp runs")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if a.device == "cuda" and torch.cuda.device_count() < 2:
        raise SystemExit("--device cuda needs 2 GPUs (tp=2 and pp=2 use one GPU per rank)")
    rows = []
    if a.mode in ("tp", "all"):
        rows += bench_tp(a)
    if a.mode in ("pp", "all"):
        rows += bench_pp(a)
    print_table(rows, a)


if __name__ == "__main__":
    main()

"""A mixture-of-experts decode step at ep=2 vs ep=1 (both tp=2, one thread per rank on the
same two cores), and in one process (2 threads, and 1), with where a step's time goes.

    python benchmarks/bench_moe.py [--rounds 15] [--steps 16] [--batch 8] [--matmul kernel]
                                   [--json out.json]

The model is a random Mixtral (transformers' class, saved to a temporary folder): hidden
512, 8 experts of width 1024, top-2, 4 layers, fp32. Every layout is built once and kept
(the idle pools block on their pipes, they do not spin); then ``--rounds`` rounds run
``--steps`` decode steps of the batch on each layout in turn (the order alternates between
rounds), the same positions every round, so load from other processes hits every layout
alike. Reported per layout: the median over rounds of the per-round median step time, with
the 25th-75th percentile of the rounds, and the ep=2 / ep=1 ratio per round (paired, so
slow drift of the machine's load cancels), median and range. ``--matmul`` fixes the fp32
matmul path of every layout (``PARALLAX_CPU_MATMUL``; default the C kernel): left to
``auto``, each process times kernel against torch once per weight shape, and on a loaded
machine two layouts can settle on different paths, which would be compared instead of ep.

Inside a step, on each rank (``BenchRank``): ``SparseMoE.route`` (router matmul, softmax,
top-k), the experts' compute, the MoE block's one exchange (``all_reduce_tp`` of the
weighted partial outputs: with the hidden states replicated over tp, it is what an
all-to-all dispatch + combine does here, see docs/models.md), and the other all-reduces
(attention, embedding). The exchange's wall time includes waiting for the slower rank;
``exchange_ms`` is the same all-reduce timed alone after a barrier (the transfer itself).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

# One process with 2 threads (the same cores as tp=2) and with 1 thread; tp=2 one thread per rank.
LAYOUTS = {"tp1": dict(tp=1, ep=1, threads=2), "tp1-1thread": dict(tp=1, ep=1, threads=1),
           "tp2-ep1": dict(tp=2, ep=1, threads=1), "tp2-ep2": dict(tp=2, ep=2, threads=1)}
PROMPT = 32


def make_mixtral(path: str) -> str:
    import transformers
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024,
                                     num_hidden_layers=4, num_attention_heads=8,
                                     num_key_value_heads=4, num_local_experts=8,
                                     num_experts_per_tok=2, max_position_embeddings=512)
    transformers.MixtralForCausalLM(cfg).save_pretrained(path)
    return path


class _Clock:
    """Wall and CPU seconds per bucket (CPU: this thread's, ``time.thread_time``: with one
    thread per rank, the rank's own work, whatever else the machine runs)."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.in_moe = False

    def wrap(self, fn, key):
        def timed(*args, **kwargs):
            w0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                k = key()
                self.wall[k] = self.wall.get(k, 0.0) + time.perf_counter() - w0
                self.cpu[k] = self.cpu.get(k, 0.0) + time.thread_time() - c0
                self.calls[k] = self.calls.get(k, 0) + 1
        return timed


class BenchRank:
    """One rank's model (built like the engine builds it), a prefilled cache, and a timed
    decode loop over the same positions each call."""

    def __init__(self, ctx, path: str, ep: int, batch: int, steps: int, block_size: int = 16):
        from parallax.loading import open_checkpoint
        from parallax.models.attention import AttentionMetadata
        from parallax.models.loader import build_model
        ctx.ep_size = ep
        self.ctx, self.batch, self.steps, self.bs = ctx, batch, steps, block_size
        self.model = m = build_model(open_checkpoint(path), ctx, torch.float32)
        per_seq = -(-(PROMPT + steps) // block_size)
        shape = (batch * per_seq, m.num_kv_heads_local, block_size, m.cfg.head_dim)
        self.caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in m.layers]
        self.tables = [list(range(b * per_seq, (b + 1) * per_seq)) for b in range(batch)]
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, m.cfg.vocab_size, (batch * PROMPT,), generator=gen)
        with torch.inference_mode():
            m(self.ids, AttentionMetadata.build([(0, PROMPT, t) for t in self.tables],
                                                block_size), self.caches)
            self.run()   # warm-up: first touches, kernel builds, matmul path choices

    def run(self) -> dict:
        """``steps`` decode steps; per-step wall times (ms) and the buckets' seconds, of
        every rank of the tp group (rank order)."""
        from parallax.models import moe
        from parallax.models.attention import AttentionMetadata
        from parallax.parallel import collectives
        m, clock = self.model, _Clock()
        real = (moe.SparseMoE.route, moe.SparseMoE.forward, collectives.all_reduce_tp)
        experts_cpu: list[float] = []      # per MoE block call: its experts' CPU seconds

        def forward(layer, x):
            c0 = time.thread_time()
            before = clock.cpu.get("route", 0.0) + clock.cpu.get("moe_exchange", 0.0)
            clock.in_moe = True
            try:
                return real[1](layer, x)
            finally:
                clock.in_moe = False
                inner = clock.cpu.get("route", 0.0) + clock.cpu.get("moe_exchange", 0.0)
                experts_cpu.append(time.thread_time() - c0 - (inner - before))
        moe.SparseMoE.route = clock.wrap(real[0], lambda: "route")
        moe.SparseMoE.forward = clock.wrap(forward, lambda: "moe")
        collectives.all_reduce_tp = clock.wrap(
            real[2], lambda: "moe_exchange" if clock.in_moe else "other_collectives")
        steps_ms, step_cpu = [], 0.0
        try:
            with torch.inference_mode():
                for s in range(self.steps):
                    meta = AttentionMetadata.build([(PROMPT + s, 1, t) for t in self.tables],
                                                   self.bs)
                    t0, c0 = time.perf_counter(), time.thread_time()
                    m.compute_logits(m(self.ids[:self.batch], meta, self.caches))
                    steps_ms.append(1e3 * (time.perf_counter() - t0))
                    step_cpu += time.thread_time() - c0
        finally:
            moe.SparseMoE.route, moe.SparseMoE.forward, collectives.all_reduce_tp = real
        w, c = clock.wall, clock.cpu
        mine = dict(steps_ms=steps_ms, route=w.get("route", 0.0),
                    moe_exchange=w.get("moe_exchange", 0.0),
                    experts=w.get("moe", 0.0) - w.get("route", 0.0) - w.get("moe_exchange", 0.0),
                    other_collectives=w.get("other_collectives", 0.0),
                    experts_cpu=experts_cpu,
                    # this rank's CPU seconds outside the experts and every all-reduce
                    rest_cpu=(step_cpu - sum(experts_cpu) - c.get("moe_exchange", 0.0)
                              - c.get("other_collectives", 0.0)),
                    all_reduces=clock.calls.get("moe_exchange", 0)
                    + clock.calls.get("other_collectives", 0),
                    experts_held=len(m.layers[0].mlp.experts), exchange_ms=self._exchange_ms())
        return self._gather(mine)

    def _exchange_ms(self, reps: int = 50) -> float:
        """The MoE output all-reduce, (batch, hidden) fp32, alone: median ms after a barrier."""
        from parallax.parallel import collectives
        if self.ctx.tp_size == 1:
            return 0.0
        import torch.distributed as dist
        x, times = torch.randn(self.batch, self.model.cfg.hidden_size), []
        for _ in range(reps):
            dist.barrier(group=self.ctx.tp_group)
            t0 = time.perf_counter()
            collectives.all_reduce_tp(x, self.ctx)
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)

    def _gather(self, mine: dict) -> list[dict]:
        if self.ctx.tp_size == 1:
            return [mine]
        import torch.distributed as dist
        out: list = [None] * self.ctx.tp_size
        dist.all_gather_object(out, mine, group=self.ctx.tp_group)
        return out


def _q(xs: list[float], p: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(p) - 1] if len(xs) > 1 else xs[0]


def summarise(rounds: list[list[dict]]) -> dict:
    """Per-round medians -> median and 25th-75th percentile over rounds; wall-time shares of
    rank 0's steps; the experts' CPU ms per step on each rank; and ``cpu_step_ms``, the step
    a quiet machine would take by CPU time: the slowest rank's other work, each MoE block's
    slowest rank (the exchange waits for it), and every all-reduce's transfer alone."""
    step = [statistics.median(r[0]["steps_ms"]) for r in rounds]
    total = [sum(r[0]["steps_ms"]) / 1e3 for r in rounds]
    n_steps = len(rounds[0][0]["steps_ms"])

    def share(key, rank=0):
        return statistics.median(r[rank][key] / t for r, t in zip(rounds, total))

    def per_step_ms(values):
        return statistics.median(values) * 1e3 / n_steps
    ranks = range(len(rounds[0]))
    critical = [sum(map(max, zip(*(r[k]["experts_cpu"] for k in ranks)))) for r in rounds]
    rest = [max(r[k]["rest_cpu"] for k in ranks) for r in rounds]
    comm = [r[0]["all_reduces"] * r[0]["exchange_ms"] / 1e3 for r in rounds]
    cpu_step = [1e3 * (a + b + c) / n_steps for a, b, c in zip(critical, rest, comm)]
    return dict(
        step_ms=statistics.median(step), step_p25=_q(step, 25), step_p75=_q(step, 75),
        route=share("route"), moe_exchange=share("moe_exchange"),
        other_collectives=share("other_collectives"),
        experts=[share("experts", k) for k in ranks],
        experts_cpu_ms=[per_step_ms([sum(r[k]["experts_cpu"]) for r in rounds]) for k in ranks],
        experts_critical_ms=per_step_ms(critical),
        cpu_step_ms=statistics.median(cpu_step), cpu_per_round=cpu_step,
        exchange_ms=statistics.median(r[0]["exchange_ms"] for r in rounds),
        experts_held=rounds[0][0]["experts_held"], per_round=step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--matmul", choices=("kernel", "torch", "auto"), default="kernel")
    ap.add_argument("--json")
    a = ap.parse_args()
    os.environ["PARALLAX_CPU_MATMUL"] = a.matmul      # the workers inherit it
    torch.set_num_threads(2)
    from parallax.parallel.context import ParallelContext
    from parallax.parallel.launch import WorkerPool
    with tempfile.TemporaryDirectory() as d:
        path = make_mixtral(d)
        runners, pools, one = {}, [], None
        try:
            for name, kw in LAYOUTS.items():
                if kw["tp"] == 1:
                    one = one or BenchRank(ParallelContext.single(), path, 1, a.batch, a.steps)

                    def run_one(threads=kw["threads"]):
                        torch.set_num_threads(threads)
                        return one.run()
                    runners[name] = run_one
                else:
                    pool = WorkerPool(BenchRank, (path, kw["ep"], a.batch, a.steps),
                                      tp_size=kw["tp"], pp_size=1, threads_per_rank=1)
                    pools.append(pool)
                    runners[name] = lambda p=pool: p.call("run")
            results: dict[str, list] = {k: [] for k in LAYOUTS}
            order = list(LAYOUTS)
            for r in range(a.rounds):                  # interleaved, order alternating
                for name in order if r % 2 == 0 else order[::-1]:
                    results[name].append(runners[name]())
        finally:
            for pool in pools:
                pool.close()
    table = {name: summarise(rs) for name, rs in results.items()}
    ratios = [b / c for b, c in zip(table["tp2-ep2"]["per_round"], table["tp2-ep1"]["per_round"])]
    print(f"Mixtral 4 x (8 experts, top-2), hidden 512, fp32, batch {a.batch}: {a.rounds} "
          f"interleaved rounds of {a.steps} decode steps")
    print("| layout | experts / rank | step ms, median [p25-p75] | routing | MoE exchange "
          "| experts' compute, rank 0 / 1 | other all-reduces |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, t in table.items():
        experts = " / ".join(f"{e:.0%}" for e in t["experts"])
        print(f"| {name} | {t['experts_held']} | {t['step_ms']:.1f} [{t['step_p25']:.1f}-"
              f"{t['step_p75']:.1f}] | {t['route']:.1%} | {t['moe_exchange']:.1%} | "
              f"{experts} | {t['other_collectives']:.1%} |")
    print("\nBy CPU time (one thread per rank; load-insensitive), ms per step:")
    print("| layout | experts' CPU, rank 0 / 1 | experts' critical path | all-reduce alone "
          "| step on a quiet machine |")
    print("|---|---:|---:|---:|---:|")
    for name, t in table.items():
        if LAYOUTS[name]["threads"] > 1:
            continue        # two threads: one thread's CPU time is not the step's
        cpu = " / ".join(f"{e:.1f}" for e in t["experts_cpu_ms"])
        print(f"| {name} | {cpu} | {t['experts_critical_ms']:.1f} | "
              f"{t['exchange_ms'] * 1e3:.0f} us | {t['cpu_step_ms']:.1f} |")
    cpu_ratios = [b / c for b, c in zip(table["tp2-ep2"]["cpu_per_round"],
                                        table["tp2-ep1"]["cpu_per_round"])]
    print(f"\nep=2 / ep=1 step time at tp=2, paired per round: wall median "
          f"{statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}x); "
          f"by CPU time median {statistics.median(cpu_ratios):.2f}x (range "
          f"{min(cpu_ratios):.2f}-{max(cpu_ratios):.2f}x)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"layouts": table, "ep2_over_ep1": ratios,
                       "ep2_over_ep1_cpu": cpu_ratios}, f, indent=1)


if __name__ == "__main__":
    main()

"""A mixture-of-experts decode step at ep=2 vs ep=1 (both tp=2, one thread per rank on the
same two cores), and in one process (2 threads), with where a step's time goes.

    python benchmarks/bench_moe.py [--rounds 15] [--steps 16] [--batch 8] [--json out.json]

The model is a random Mixtral (transformers' class, saved to a temporary folder): hidden
512, 8 experts of width 1024, top-2, 4 layers, fp32. Every layout is built once and kept
(the idle pools block on their pipes, they do not spin); then ``--rounds`` rounds run
``--steps`` decode steps of the batch on each layout in turn (the order alternates between
rounds), the same positions every round, so load from other processes hits every layout
alike. Reported per layout: the median over rounds of the per-round median step time, with
the 25th-75th percentile of the rounds, and the ep=2 / ep=1 ratio per round (paired, so
slow drift of the machine's load cancels), median and range.

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
import statistics
import tempfile
import time

import torch

LAYOUTS = {"tp1": dict(tp=1, ep=1), "tp2-ep1": dict(tp=2, ep=1), "tp2-ep2": dict(tp=2, ep=2)}
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
    """Seconds spent per bucket; ``wrap`` times a function into the current bucket."""

    def __init__(self):
        self.t: dict[str, float] = {}
        self.in_moe = False

    def add(self, key: str, dt: float) -> None:
        self.t[key] = self.t.get(key, 0.0) + dt

    def wrap(self, fn, key):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(key(), time.perf_counter() - t0)
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

        def forward(layer, x):
            clock.in_moe = True
            try:
                return real[1](layer, x)
            finally:
                clock.in_moe = False
        moe.SparseMoE.route = clock.wrap(real[0], lambda: "route")
        moe.SparseMoE.forward = clock.wrap(forward, lambda: "moe")
        collectives.all_reduce_tp = clock.wrap(
            real[2], lambda: "moe_exchange" if clock.in_moe else "other_collectives")
        steps_ms = []
        try:
            with torch.inference_mode():
                for s in range(self.steps):
                    meta = AttentionMetadata.build([(PROMPT + s, 1, t) for t in self.tables],
                                                   self.bs)
                    t0 = time.perf_counter()
                    m.compute_logits(m(self.ids[:self.batch], meta, self.caches))
                    steps_ms.append(1e3 * (time.perf_counter() - t0))
        finally:
            moe.SparseMoE.route, moe.SparseMoE.forward, collectives.all_reduce_tp = real
        t = clock.t
        mine = dict(steps_ms=steps_ms, route=t.get("route", 0.0),
                    moe_exchange=t.get("moe_exchange", 0.0),
                    experts=t.get("moe", 0.0) - t.get("route", 0.0) - t.get("moe_exchange", 0.0),
                    other_collectives=t.get("other_collectives", 0.0),
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
    """Per-round medians -> median and 25th-75th percentile over rounds; time shares of
    rank 0's steps, the experts' compute per rank."""
    step = [statistics.median(r[0]["steps_ms"]) for r in rounds]
    total = [sum(r[0]["steps_ms"]) / 1e3 for r in rounds]

    def share(key, rank=0):
        return statistics.median(r[rank][key] / t for r, t in zip(rounds, total))
    ranks = len(rounds[0])
    return dict(
        step_ms=statistics.median(step), step_p25=_q(step, 25), step_p75=_q(step, 75),
        route=share("route"), moe_exchange=share("moe_exchange"),
        other_collectives=share("other_collectives"),
        experts=[share("experts", k) for k in range(ranks)],
        exchange_ms=statistics.median(r[0]["exchange_ms"] for r in rounds),
        exchange_share=statistics.median(
            r[0]["exchange_ms"] * 4 * len(r[0]["steps_ms"]) / 1e3 / t
            for r, t in zip(rounds, total)),      # 4 MoE layers per step
        experts_held=rounds[0][0]["experts_held"], per_round=step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(2)
    from parallax.parallel.context import ParallelContext
    from parallax.parallel.launch import WorkerPool
    with tempfile.TemporaryDirectory() as d:
        path = make_mixtral(d)
        runners, pools = {}, []
        try:
            for name, kw in LAYOUTS.items():
                if kw["tp"] == 1:
                    one = BenchRank(ParallelContext.single(), path, 1, a.batch, a.steps)
                    runners[name] = one.run
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
          "(transfer alone) | experts' compute, rank 0 / 1 | other all-reduces |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, t in table.items():
        experts = " / ".join(f"{e:.0%}" for e in t["experts"])
        print(f"| {name} | {t['experts_held']} | {t['step_ms']:.1f} [{t['step_p25']:.1f}-"
              f"{t['step_p75']:.1f}] | {t['route']:.1%} | {t['moe_exchange']:.1%} "
              f"({t['exchange_share']:.1%}, {t['exchange_ms'] * 1e3:.0f} us) | {experts} | "
              f"{t['other_collectives']:.1%} |")
    print(f"\nep=2 / ep=1 step time at tp=2, paired per round: median {statistics.median(ratios):.2f}x "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}x)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"layouts": table, "ep2_over_ep1": ratios}, f, indent=1)


if __name__ == "__main__":
    main()

"""A mixture-of-experts decode step at ep=2 vs ep=1 (both tp=2, the same two cores), and
one process, with the share of the step spent routing and in collectives.

    python benchmarks/bench_moe.py [--steps 20] [--batch 8] [--repeats 3] [--json out.json]

The model is a random Mixtral (transformers' class, saved to a temporary folder): hidden
512, 8 experts of width 1024, top-2, 4 layers, fp32. Each rank runs ``BenchRank.run``: a
prefill of ``batch`` 32-token prompts, then ``steps`` decode steps of the batch, timing
``SparseMoE.route`` (router + top-k) and every ``collectives.all_reduce_tp`` (attention,
MoE and embedding all-reduces) inside the step. Rank 0's times are reported. Layouts are
interleaved (ep1, ep2, ep1, ...) and medians reported; the machine may be shared, so
compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

LAYOUTS = {"tp1": dict(tp=1, ep=1), "tp2-ep1": dict(tp=2, ep=1), "tp2-ep2": dict(tp=2, ep=2)}


def make_mixtral(path: str) -> str:
    import transformers
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024,
                                     num_hidden_layers=4, num_attention_heads=8,
                                     num_key_value_heads=4, num_local_experts=8,
                                     num_experts_per_tok=2, max_position_embeddings=512)
    transformers.MixtralForCausalLM(cfg).save_pretrained(path)
    return path


def _timed(fn, acc: list[float]):
    """``fn`` wrapped to add its wall time to acc[0] (a plain function: binds as a method)."""
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[0] += time.perf_counter() - t0
    return wrapper


class BenchRank:
    """One rank's model (built like the engine builds it) and a timed decode loop."""

    def __init__(self, ctx, path: str, ep: int):
        from parallax.loading import open_checkpoint
        from parallax.models.loader import build_model
        ctx.ep_size = ep
        self.ctx = ctx
        self.model = build_model(open_checkpoint(path), ctx, torch.float32)

    def run(self, batch: int, steps: int, block_size: int = 16) -> dict:
        from parallax.models import moe
        from parallax.models.attention import AttentionMetadata
        from parallax.parallel import collectives
        m, prompt = self.model, 32
        blocks_per_seq = -(-(prompt + steps) // block_size)
        shape = (batch * blocks_per_seq, m.num_kv_heads_local, block_size, m.cfg.head_dim)
        caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in m.layers]
        tables = [list(range(b * blocks_per_seq, (b + 1) * blocks_per_seq)) for b in range(batch)]
        ids = torch.randint(0, m.cfg.vocab_size, (batch * prompt,), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            m(ids, AttentionMetadata.build([(0, prompt, t) for t in tables], block_size), caches)
            route, reduce = [0.0], [0.0]
            real = moe.SparseMoE.route, collectives.all_reduce_tp
            moe.SparseMoE.route = _timed(real[0], route)
            collectives.all_reduce_tp = _timed(real[1], reduce)
            try:
                t0 = time.perf_counter()
                for s in range(steps):
                    meta = AttentionMetadata.build([(prompt + s, 1, t) for t in tables], block_size)
                    m.compute_logits(m(ids[:batch], meta, caches))
                total = time.perf_counter() - t0
            finally:
                moe.SparseMoE.route, collectives.all_reduce_tp = real
        return dict(step_ms=1e3 * total / steps, route_share=route[0] / total,
                    collective_share=reduce[0] / total,
                    experts_held=len(m.layers[0].mlp.experts))


def run_layout(path: str, tp: int, ep: int, batch: int, steps: int) -> dict:
    if tp == 1:
        from parallax.parallel.context import ParallelContext
        return BenchRank(ParallelContext.single(), path, ep).run(batch, steps)
    from parallax.parallel.launch import WorkerPool
    with WorkerPool(BenchRank, (path, ep), tp_size=tp, pp_size=1, threads_per_rank=1) as pool:
        return pool.call("run", batch, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        path = make_mixtral(d)
        runs: dict[str, list[dict]] = {k: [] for k in LAYOUTS}
        for _ in range(a.repeats):
            for name, kw in LAYOUTS.items():       # interleaved
                runs[name].append(run_layout(path, kw["tp"], kw["ep"], a.batch, a.steps))
    print(f"Mixtral 4 x (8 experts, top-2), hidden 512, batch {a.batch}, {a.steps} decode "
          f"steps, medians of {a.repeats}")
    print("| layout | experts / rank | step ms | routing | collectives |")
    print("|---|---:|---:|---:|---:|")
    table = {}
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        table[name] = med
        print(f"| {name} | {med['experts_held']:.0f} | {med['step_ms']:.2f} | "
              f"{med['route_share']:.1%} | {med['collective_share']:.1%} |")
    print(f"\nep=2 / ep=1 step time at tp=2: "
          f"{table['tp2-ep2']['step_ms'] / table['tp2-ep1']['step_ms']:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()

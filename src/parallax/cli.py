"""The ``parallax`` command: generate, info, bench.

Works as ``parallax ...``, ``python -m parallax ...`` and under
``torchrun --nproc-per-node N -m parallax generate ... --tp N`` (only rank 0 prints).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

from .errors import ParallaxError
from .loading import DEFAULT_MODEL


def _layer_split(text: str | None) -> list[int] | None:
    return [int(x) for x in text.split(",")] if text else None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--layer-split", help="layers per stage, e.g. 16,14")


def cmd_generate(a: argparse.Namespace) -> int:
    from .api import LLM
    rank0 = int(os.environ.get("RANK", "0")) == 0
    with LLM(a.model, tp=a.tp, pp=a.pp, dtype=a.dtype, device=a.device,
             layer_split=_layer_split(a.layer_split), quantize=a.quantize,
             micro_batches=a.micro_batches, timeout_s=a.timeout) as llm:
        kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                  top_p=a.top_p, seed=a.seed, stop=a.stop, ignore_eos=a.ignore_eos,
                  chat=False if a.no_chat else None, repetition_penalty=a.repetition_penalty)
        for piece in llm.stream(a.prompt, **kw):
            if rank0:
                sys.stdout.write(piece)
                sys.stdout.flush()
        if rank0:
            sys.stdout.write("\n")
    return 0


def rank_plan(cfg, tp: int, pp: int, layer_split: list[int] | None, bytes_per: int) -> list[dict]:
    """What each rank holds, computed from the sharding math without reading weights."""
    from .parallel.sharding import head_partition, split_evenly, split_layers
    stages = split_layers(cfg, pp, layer_split)
    d, hd = cfg.hidden_size, cfg.head_dim
    rows = []
    for stage, layers in enumerate(stages):
        for t in range(tp):
            part = head_partition(cfg, tp, t)
            ffn = split_evenly(cfg.intermediate_size, tp, t)[1]
            vocab = split_evenly(cfg.vocab_size, tp, t)[1]
            attn = d * hd * (2 * part.n_q + 2 * part.n_kv)
            if cfg.attention_bias:
                attn += hd * (part.n_q + 2 * part.n_kv)
            params = len(layers) * (attn + 3 * d * ffn + 2 * d)
            has_head = stage == pp - 1
            # Tied embeddings under pp live with the LM head (models/llama.py).
            embed_stage = pp - 1 if cfg.tie_word_embeddings else 0
            has_embed = stage == embed_stage
            params += vocab * d * (has_embed + (has_head and not (cfg.tie_word_embeddings and has_embed)))
            params += d * has_head
            rows.append(dict(rank=stage * tp + t, stage=stage, tp_rank=t,
                             layers=f"{layers.start}-{layers.stop - 1}", q_heads=part.n_q,
                             kv_heads=part.n_kv, weight_bytes=params * bytes_per))
    return rows


def cmd_info(a: argparse.Namespace) -> int:
    from . import ops
    from .engine import parse_dtype
    from .loading import open_checkpoint
    from .ops import cuda as cuda_ops
    from .parallel.sharding import check_layout
    ckpt = open_checkpoint(a.model)
    cfg = ckpt.config
    ckpt.close()
    split = _layer_split(a.layer_split)
    check_layout(cfg, a.tp, a.pp, split)
    bytes_per = parse_dtype(a.dtype).itemsize
    print(f"model            {a.model}")
    print(f"architecture     {cfg.architecture}")
    print(f"layers           {cfg.num_layers}")
    print(f"hidden / ffn     {cfg.hidden_size} / {cfg.intermediate_size}")
    print(f"heads / kv heads {cfg.num_heads} / {cfg.num_kv_heads} (head dim {cfg.head_dim})")
    print(f"vocab            {cfg.vocab_size} (tied embeddings: {cfg.tie_word_embeddings})")
    print(f"context          {cfg.max_position_embeddings}")
    print(f"parameters       {cfg.num_parameters():,}")
    print(f"kernels          {ops.active_backend()} (CUDA extension loadable: "
          f"{cuda_ops.load_extension() if _has_gpu() else 'no GPU'})")
    print(f"\nlayout tp={a.tp} pp={a.pp}, {a.dtype}; weights per rank (computed):")
    plan = rank_plan(cfg, a.tp, a.pp, split, bytes_per)
    measured = {}
    if a.measure:
        from .api import LLM
        with LLM(a.model, tp=a.tp, pp=a.pp, dtype=a.dtype, layer_split=split) as llm:
            measured = {m["rank"]: m for m in llm.memory()}
    print(f"{'rank':>4} {'stage':>5} {'tp':>3} {'layers':>8} {'q/kv heads':>10} {'weights MB':>11}"
          + (f" {'measured MB':>11} {'peak RSS MB':>11}" if measured else ""))
    for r in plan:
        line = (f"{r['rank']:>4} {r['stage']:>5} {r['tp_rank']:>3} {r['layers']:>8} "
                f"{r['q_heads']:>4}/{r['kv_heads']:<5} {r['weight_bytes'] / 2**20:>11.1f}")
        if measured:
            m = measured[r["rank"]]
            line += f" {m['weight_bytes'] / 2**20:>11.1f} {m['peak_rss_bytes'] / 2**20:>11.1f}"
        print(line)
    return 0


def _has_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def cmd_bench(a: argparse.Namespace, rest: list[str]) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(here, "..", "..", "benchmarks", f"bench_{a.which}.py")
    if not os.path.exists(script):
        raise ParallaxError(f"{script} not found; `parallax bench` runs from a source checkout")
    return subprocess.call([sys.executable, script, *rest])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parallax", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream an answer to stdout")
    g.add_argument("prompt")
    g.add_argument("--model", default=DEFAULT_MODEL)
    _add_model_args(g)
    g.add_argument("--device", default="cpu")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.add_argument("--quantize", choices=["int8"])
    g.add_argument("--micro-batches", type=int)
    g.add_argument("--timeout", type=float, default=60.0, help="seconds a rank may stall")

    i = sub.add_parser("info", help="architecture, parameters and memory per rank")
    i.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    _add_model_args(i)
    i.add_argument("--measure", action="store_true", help="also load the model and measure")

    b = sub.add_parser("bench", help="run a benchmark script from benchmarks/")
    b.add_argument("which", choices=["generate", "parallel"])
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "info":
            return cmd_info(args)
        return cmd_bench(args, rest)
    except ParallaxError as e:
        print(f"parallax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

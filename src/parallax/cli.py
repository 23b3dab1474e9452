"""The ``parallax`` command: generate, info, bench.

Works as ``parallax ...``, ``python -m parallax ...`` and under
``torchrun --nproc-per-node N -m parallax generate ... --tp N`` (only rank 0 prints).
Errors parallax raises on purpose (ParallaxError) print one line to stderr and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time

from .errors import ParallaxError
from .loading import DEFAULT_MODEL

logger = logging.getLogger("parallax.cli")

EXIT_ERROR = 2
BENCHMARKS = ("generate", "parallel", "kernels")


def _layer_split(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ParallaxError(f"--layer-split {text!r} must be comma-separated layer counts, "
                            "e.g. 16,14") from None


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------------- generate
def cmd_generate(a: argparse.Namespace) -> int:
    from .api import LLM
    rank0 = _is_rank0()
    t_load = time.perf_counter()
    with LLM(a.model, tp=a.tp, pp=a.pp, dtype=a.dtype, device=a.device,
             layer_split=_layer_split(a.layer_split), quantize=a.quantize,
             micro_batches=a.micro_batches, timeout_s=a.timeout) as llm:
        load_s = time.perf_counter() - t_load
        kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                  top_p=a.top_p, seed=a.seed, stop=a.stop, ignore_eos=a.ignore_eos,
                  chat=False if a.no_chat else None, repetition_penalty=a.repetition_penalty)
        pieces: list[str] = []
        t0 = time.perf_counter()
        t_first = None
        for piece in llm.stream(a.prompt, **kw):
            if t_first is None:
                t_first = time.perf_counter()
            pieces.append(piece)
            if rank0:
                sys.stdout.write(piece)
                sys.stdout.flush()
        t_end = time.perf_counter()
        if rank0:
            sys.stdout.write("\n")
            sys.stdout.flush()
            _report_stats(llm, "".join(pieces), load_s, t0, t_first, t_end, a.verbose)
    return 0


def _report_stats(llm, text: str, load_s: float, t0: float, t_first: float | None,
                  t_end: float, verbose: bool) -> None:
    """TTFT and decode speed of the streamed answer, to stderr (--verbose) or the log.

    ``LLM.stream`` yields text, not tokens, so the token count is the answer re-encoded
    (exact for almost all text; a token split differently on re-encoding shifts it by one).
    """
    n = len(llm.tokenizer.encode(text, add_special_tokens=False)) if llm.tokenizer and text else 0
    ttft = (t_first or t_end) - t0
    decode = (n - 1) / (t_end - t_first) if n > 1 and t_first and t_end > t_first else float("nan")
    line = (f"parallax: {n} tokens in {t_end - t0:.2f} s; time to first token {ttft * 1e3:.0f} ms; "
            f"decode {decode:.1f} tok/s; load {load_s:.1f} s (tp={llm.tp} pp={llm.pp})")
    if verbose:
        print(line, file=sys.stderr)
    else:
        logger.info(line)


# ---------------------------------------------------------------------- info
def _extension_status() -> str:
    """Whether the CUDA extension can be used here, without building it on a CPU machine."""
    import importlib.util

    import torch

    from .ops import cuda as cuda_ops
    if torch.cuda.is_available():
        return ("loaded" if cuda_ops.load_extension()
                else f"not loadable ({cuda_ops.load_error()})")
    prebuilt = importlib.util.find_spec("parallax._C") is not None
    return (f"{'prebuilt parallax._C present' if prebuilt else 'not built'}; "
            f"unused without a GPU (torch.version.cuda={torch.version.cuda})")


def _fmt_bytes(n: int) -> str:
    return f"{n:,}"


def cmd_info(a: argparse.Namespace) -> int:
    from . import ops
    from .loading import open_checkpoint
    from .parallel.plan import rank_plan
    from .parallel.sharding import check_layout
    ckpt = open_checkpoint(a.model)
    try:
        cfg = ckpt.config
        path = getattr(ckpt, "path", a.model)
    finally:
        ckpt.close()
    split = _layer_split(a.layer_split)
    check_layout(cfg, a.tp, a.pp, split)
    plan = rank_plan(cfg, a.tp, a.pp, split, a.dtype)
    measured: dict[int, dict] = {}
    if a.measure:
        from .api import LLM
        with LLM(a.model, tp=a.tp, pp=a.pp, dtype=a.dtype, layer_split=split) as llm:
            measured = {m["rank"]: m for m in llm.memory()}

    print(f"model            {a.model}" + (f" ({path})" if path != a.model else ""))
    print(f"architecture     {cfg.architecture}")
    print(f"layers           {cfg.num_layers}")
    print(f"hidden / ffn     {cfg.hidden_size} / {cfg.intermediate_size}")
    print(f"heads / kv heads {cfg.num_heads} / {cfg.num_kv_heads} (head dim {cfg.head_dim})")
    print(f"vocab            {cfg.vocab_size}")
    print(f"tied embeddings  {cfg.tie_word_embeddings}")
    print(f"parameters       {cfg.num_parameters():,}")
    print(f"context          {cfg.max_position_embeddings}")
    rep = ops.kernel_report()
    print(f"kernels          {rep['backend']} (CPU {rep['isa']}, variant "
          f"{rep['variant'] or 'none'}; CUDA extension: {_extension_status()})")
    if rep["build_error"]:   # the compiler's first error line (the whole message is logged)
        lines = rep["build_error"].splitlines()
        first = next((x for x in lines[1:] if "error" in x.lower()), lines[-1])
        print(f"                 CPU kernels did not build: {first.strip()}")
    print()
    print(f"layout tp={a.tp} pp={a.pp} ({a.tp * a.pp} ranks), {a.dtype}; weights per rank "
          f"computed from the sharding math" + (", and measured" if measured else "") + ":")
    print()
    head = ("| rank | pp stage | tp rank | layers | q / kv heads | vocab rows | embed / head "
            "| weight bytes | MiB |")
    if measured:
        head += " measured bytes | peak RSS MiB |"
    print(head)
    print("|" + "---:|" * (head.count("|") - 1))
    for r in plan:
        lay = r["layers"]
        held = f"{lay.start}-{lay.stop - 1}" if len(lay) > 1 else str(lay.start)
        eh = ("tied" if r["lm_head"] == "tied" else
              "/".join(x for x, has in (("embed", r["embedding"]), ("head", r["lm_head"])) if has)
              or "-")
        line = (f"| {r['rank']} | {r['stage']} | {r['tp_rank']} | {held} | "
                f"{r['q_heads']} / {r['kv_heads']} | {r['vocab_rows']} | {eh} | "
                f"{_fmt_bytes(r['weight_bytes'])} | {r['weight_bytes'] / 2**20:.1f} |")
        if measured:
            m = measured[r["rank"]]
            line += f" {_fmt_bytes(m['weight_bytes'])} | {m['peak_rss_bytes'] / 2**20:.0f} |"
        print(line)
    total = sum(r["weight_bytes"] for r in plan)
    single = rank_plan(cfg, 1, 1, None, a.dtype)[0]["weight_bytes"]
    print(f"\ntotal {_fmt_bytes(total)} bytes over all ranks; one process holds "
          f"{_fmt_bytes(single)}; largest rank {max(r['weight_bytes'] for r in plan) / single:.0%} "
          "of that")
    if measured:
        bad = [r["rank"] for r in plan if measured[r["rank"]]["weight_bytes"] != r["weight_bytes"]]
        if bad:
            print(f"warning: measured weight bytes differ from the plan on ranks {bad}",
                  file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- bench
def _benchmarks_dir() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    for d in (os.path.join(here, "..", "..", "benchmarks"), os.path.join(os.getcwd(), "benchmarks")):
        if os.path.isfile(os.path.join(d, "bench_generate.py")):
            return os.path.normpath(d)
    return None


def cmd_bench(a: argparse.Namespace) -> int:
    folder = _benchmarks_dir()
    if folder is None:
        raise ParallaxError("benchmarks/ not found; `parallax bench` runs from a source "
                            "checkout of parallax (or a folder holding its benchmarks/)")
    script = os.path.join(folder, f"bench_{a.which}.py")
    return subprocess.call([sys.executable, script, *a.args])


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parallax", description=__doc__.splitlines()[0])
    verbose_help = "log progress and print generation stats to stderr"
    p.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    # Also accepted after the subcommand; SUPPRESS keeps a -v given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help=verbose_help)
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
        q.add_argument("--pp", type=int, default=1, help="pipeline stages")
        q.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
        q.add_argument("--layer-split", help="layers per pipeline stage, e.g. 16,14")

    g = sub.add_parser("generate", parents=[common], help="stream an answer to stdout")
    g.add_argument("prompt")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"HF checkpoint folder, .gguf file or {DEFAULT_MODEL!r} (default)")
    model_args(g)
    g.add_argument("--device", default="cpu", help="cpu | cuda")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", nargs="+", action="extend", metavar="STR",
                   help="stop strings (one or more; repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.add_argument("--quantize", choices=["int8"], help="weight-only int8")
    g.add_argument("--micro-batches", type=int, help="micro-batches in flight (pp)")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds a rank may stall")

    i = sub.add_parser("info", parents=[common],
                       help="architecture, parameters and memory per rank")
    i.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    model_args(i)
    i.add_argument("--measure", action="store_true",
                   help="also build the model and report measured weight bytes and peak RSS")

    b = sub.add_parser("bench", help="run a benchmark script from benchmarks/ (args forwarded)")
    b.add_argument("which", choices=BENCHMARKS)
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "info":
            return cmd_info(args)
        return cmd_bench(args)
    except ParallaxError as e:
        msg = " ".join(str(e).split())     # one line, whatever the message holds
        print(f"parallax: error: {msg}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

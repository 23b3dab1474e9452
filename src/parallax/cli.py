"""The ``parallax`` command: generate, info, bench.

Works as ``parallax ...``, ``python -m parallax ...`` and under
``torchrun --nproc-per-node N -m parallax generate ... --tp N`` (only rank 0 prints).

Every argument is checked before a weight is read: option values first, then the model
path and the tp/pp layout against the checkpoint's config (its header only). Errors print
one line to stderr, naming the problem and the fix. Exit codes: 0 done; 2 a usage error (a
bad option value, an unknown model path, a layout the model cannot take); 1 an error while
running (a ParallaxError from the run: a prompt the model cannot take, a worker that died,
a missing optional dependency); 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time

from . import __version__, defaults
from .errors import ParallaxError
from .extras import require

logger = logging.getLogger("parallax.cli")

EXIT_RUNTIME = 1
EXIT_USAGE = 2
BENCHMARKS = ("generate", "parallel", "kernels")
# Optional modules each benchmark imports, with the extra that brings them.
BENCH_NEEDS = {"generate": [("transformers", "bench")]}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of the usage block."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"parallax: error: {message}; see `{self.prog} --help`\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default (an option without one says in its help what leaving it
    out means)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _count(text: str) -> int:
    """argparse type: an integer >= 1 (ranks, stages, tokens, micro-batches)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {n}")
    return n


def _seconds(text: str) -> float:
    """argparse type: a number of seconds > 0."""
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not s > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return s


def _layer_split(text: str) -> list[int]:
    """argparse type: comma-separated layer counts per pipeline stage, e.g. ``16,14``."""
    try:
        split = [int(x) for x in text.split(",")]
    except ValueError:
        split = []
    if not split or min(split) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be comma-separated layer counts >= 1, one per pipeline stage, "
            "e.g. 16,14")
    return split


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------------- checks (exit 2)
def check_sampling(a: argparse.Namespace) -> None:
    """Check the sampling options with the same rules as the Python API (SamplingParams),
    naming the option in the message. Raises ParallaxError."""
    from .sampling import SamplingParams
    try:
        SamplingParams(a.temperature, a.top_k, a.top_p, a.repetition_penalty, a.seed)
    except ParallaxError as e:
        msg = str(e)
        name = msg.split(" ", 1)[0]
        if name in ("temperature", "top_k", "top_p", "repetition_penalty", "seed"):
            msg = "--" + name.replace("_", "-") + msg[len(name):]
        raise type(e)(msg) from None


def check_model(a: argparse.Namespace) -> None:
    """Open the checkpoint's header (no weights) and check the tp/pp layout against its
    config; sets ``a.config`` and ``a.model_path``. Raises ParallaxError."""
    from .loading import open_checkpoint
    from .parallel.sharding import check_expert_layout, check_layout
    ckpt = open_checkpoint(a.model)
    try:
        a.config = ckpt.config
        a.model_path = getattr(ckpt, "path", a.model)
    finally:
        ckpt.close()
    check_layout(a.config, a.tp, a.pp, a.layer_split)
    check_expert_layout(a.config, a.tp, a.ep)


def check_generate(a: argparse.Namespace) -> None:
    """All of ``generate``'s checks: sampling options, then model and layout."""
    check_sampling(a)
    check_model(a)


# ---------------------------------------------------------------------- generate
def cmd_generate(a: argparse.Namespace) -> int:
    from .api import LLM
    rank0 = _is_rank0()
    t_load = time.perf_counter()
    with LLM(a.model, tp=a.tp, pp=a.pp, ep=a.ep, dtype=a.dtype, device=a.device,
             layer_split=a.layer_split, quantize=a.quantize,
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
            f"decode {decode:.1f} tok/s; load {load_s:.1f} s "
            f"(tp={llm.tp} pp={llm.pp} ep={llm.ep})")
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


def _span(r: range) -> str:
    """"-" for none, "3" for one, "0-2" for several."""
    return "-" if not r else str(r.start) if len(r) == 1 else f"{r.start}-{r.stop - 1}"


def cmd_info(a: argparse.Namespace) -> int:
    from . import ops
    from .parallel.plan import rank_plan
    cfg, path, split = a.config, a.model_path, a.layer_split
    plan = rank_plan(cfg, a.tp, a.pp, split, a.dtype, a.ep)
    measured: dict[int, dict] = {}
    if a.measure:
        from .api import LLM
        with LLM(a.model, tp=a.tp, pp=a.pp, dtype=a.dtype, layer_split=split, ep=a.ep) as llm:
            measured = {m["rank"]: m for m in llm.memory()}

    print(f"model            {a.model}" + (f" ({path})" if path != a.model else ""))
    print(f"architecture     {cfg.architecture}")
    print(f"layers           {cfg.num_layers}")
    print(f"hidden / ffn     {cfg.hidden_size} / {cfg.intermediate_size}")
    print(f"heads / kv heads {cfg.num_heads} / {cfg.num_kv_heads} (head dim {cfg.head_dim})")
    print(f"vocab            {cfg.vocab_size}")
    print(f"tied embeddings  {cfg.tie_word_embeddings}")
    print(f"parameters       {cfg.num_parameters():,}")
    if cfg.num_experts:
        print(f"experts          {cfg.num_experts} per sparse layer, top-{cfg.num_experts_per_tok}")
    print(f"context          {cfg.max_position_embeddings}")
    rep = ops.kernel_report()
    print(f"kernels          {rep['backend']} (CPU {rep['isa']}, variant "
          f"{rep['variant'] or 'none'}; CUDA extension: {_extension_status()})")
    if rep["numerics"] != "parallax":
        print(f"numerics         {rep['numerics']} (PARALLAX_NUMERICS: llama.cpp's arithmetic, op by op)")
    if rep["build_error"]:   # the compiler's first error line (the whole message is logged)
        lines = rep["build_error"].splitlines()
        first = next((x for x in lines[1:] if "error" in x.lower()), lines[-1])
        print(f"                 CPU kernels did not build: {first.strip()}")
    print()
    print(f"layout tp={a.tp} pp={a.pp} ep={a.ep} ({a.tp * a.pp} ranks), {a.dtype}; weights per rank "
          f"computed from the sharding math" + (", and measured" if measured else "") + ":")
    print()
    head = ("| rank | pp stage | tp rank | layers | q / kv heads | vocab rows | embed / head "
            "| experts | weight bytes | MiB |")
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
                f"{r['q_heads']} / {r['kv_heads']} | {r['vocab_rows']} | {eh} | {_span(r['experts'])} | "
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
    for module, extra in BENCH_NEEDS.get(a.which, ()):
        require(module, extra, f"parallax bench {a.which}")
    folder = _benchmarks_dir()
    if folder is None:
        raise ParallaxError("benchmarks/ not found; `parallax bench` runs from a source "
                            "checkout of parallax (or a folder holding its benchmarks/)")
    script = os.path.join(folder, f"bench_{a.which}.py")
    return subprocess.call([sys.executable, script, *a.args])


# ---------------------------------------------------------------------- serve
def _replicated(a: argparse.Namespace) -> bool:
    return a.replicas is not None or a.min_replicas is not None or a.max_replicas is not None


def check_serve(a: argparse.Namespace) -> None:
    """``serve``'s flags that go together, then model and layout. Raises ParallaxError."""
    if not _replicated(a) and (a.ray_address or a.prefix_routing):
        raise ParallaxError("--ray-address and --prefix-routing need --replicas N or "
                            "--min-replicas A --max-replicas B")
    check_model(a)


def cmd_serve(a: argparse.Namespace) -> int:
    if _replicated(a):
        from .serve.ray_serve import main as ray_main    # Ray only for replicated serving
        return ray_main(a)
    from .serve.server import main as serve_main     # FastAPI/uvicorn only when serving
    return serve_main(a)


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The ``parallax`` argument parser (also renders docs/cli.md)."""
    from .engine.runner import DTYPES
    p = _Parser(prog="parallax", formatter_class=_Formatter,
                description="Model-parallel LLM inference: generate text, inspect a model's "
                            "layout and memory per rank, run the benchmarks.",
                epilog="Exit codes: 0 done, 1 an error while running, 2 a usage error (found "
                       "before any weight is loaded). `parallax COMMAND --help` for each "
                       "command's options.")
    p.add_argument("--version", action="version",
                   version=f"parallax {__version__}")
    verbose_help = "log progress and print generation stats to stderr"
    p.add_argument("-v", "--verbose", action="store_true", help=verbose_help + " (default: off)")
    # Also accepted after the subcommand; SUPPRESS keeps a -v given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help=verbose_help + " (default: off)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=_Parser)

    def command(name: str, help: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                              formatter_class=_Formatter, **kw)

    def model_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--tp", type=_count, default=defaults.TP, metavar="N",
                       help="tensor-parallel ranks (attention heads are split by whole KV groups)")
        q.add_argument("--pp", type=_count, default=defaults.PP, metavar="N",
                       help="pipeline stages")
        q.add_argument("--ep", type=_count, default=1, metavar="N",
                       help="expert-parallel groups of a mixture-of-experts model (divides --tp; "
                            "docs/models.md)")
        q.add_argument("--dtype", default=defaults.DTYPE, choices=list(DTYPES),
                       metavar="{" + ",".join(defaults.DTYPES) + "}",
                       help="dtype of the weights and activations")
        q.add_argument("--layer-split", type=_layer_split, metavar="N,N,...",
                       help="layers per pipeline stage, e.g. 16,14 (default: balanced by "
                            "decode cost)")

    g = command("generate", "stream the answer to PROMPT to stdout", parents=[common])
    g.add_argument("prompt", help="the prompt; the model's chat template is applied unless "
                                  "--no-chat")
    g.add_argument("--model", default=defaults.MODEL,
                   help="HF checkpoint folder, .gguf file or 'smollm2-135m'")
    model_args(g)
    g.add_argument("--device", default=defaults.DEVICE, choices=["cpu", "cuda"],
                   help="where the ranks run")
    g.add_argument("--max-new-tokens", type=_count, default=defaults.MAX_NEW_TOKENS, metavar="N",
                   help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=defaults.TEMPERATURE, metavar="T",
                   help="sampling temperature; 0 = greedy")
    g.add_argument("--top-k", type=int, metavar="K",
                   help="sample among the K most likely tokens only (default: all tokens)")
    g.add_argument("--top-p", type=float, default=defaults.TOP_P, metavar="P",
                   help="sample among the smallest set of tokens whose probability reaches P; "
                        "in (0, 1], 1 = off")
    g.add_argument("--repetition-penalty", type=float, default=defaults.REPETITION_PENALTY,
                   metavar="R",
                   help="> 1 makes tokens already in the text less likely; 1 = off")
    g.add_argument("--seed", type=int, metavar="N",
                   help="seed of the sampler, for reproducible samples (default: random)")
    g.add_argument("--stop", nargs="+", action="extend", metavar="STR",
                   help="stop when the answer contains one of these strings; repeatable "
                        "(default: none)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past the end-of-sequence token (default: stop there)")
    g.add_argument("--no-chat", action="store_true",
                   help="send the prompt as is, without the model's chat template (default: "
                        "apply it when the model has one)")
    g.add_argument("--quantize", choices=["int8"],
                   help="weight-only quantization (default: none, the checkpoint's weights)")
    g.add_argument("--micro-batches", type=_count, metavar="N",
                   help="cut each step into N micro-batches under pp (default: 1; pp "
                        "steps are in flight instead)")
    g.add_argument("--timeout", type=_seconds, default=defaults.TIMEOUT_S, metavar="S",
                   help="seconds a rank may stall before it is an error")

    i = command("info", "print the architecture, parameter count and memory per rank",
                parents=[common])
    i.add_argument("model", nargs="?", default=defaults.MODEL,
                   help="HF checkpoint folder, .gguf file or 'smollm2-135m'")
    model_args(i)
    i.add_argument("--measure", action="store_true",
                   help="also build the model and report measured weight bytes and peak RSS "
                        "(default: computed only)")

    s = command("serve", "serve the model over an OpenAI-compatible HTTP API (docs/serving.md)",
                parents=[common])
    s.add_argument("model", help="HF checkpoint folder, .gguf file or 'smollm2-135m'")
    model_args(s)
    s.add_argument("--device", default=defaults.DEVICE, choices=["cpu", "cuda"],
                   help="where the ranks run")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind; anything but loopback should also set --api-key")
    s.add_argument("--port", type=int, default=8000, help="TCP port; 0 = any free port")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set "
                   "PARALLAX_API_KEY; default: no key)")
    s.add_argument("--max-queue", type=_count, metavar="N",
                   help="answer 429 while this many requests wait (default: unbounded)")
    s.add_argument("--served-model-name", help="the model id clients send (default: MODEL)")
    s.add_argument("--max-num-seqs", type=_count, metavar="N",
                   help="requests decoded together at most (default: the engine's, 64)")
    s.add_argument("--kv-cache-tokens", type=_count, metavar="N",
                   help="KV-cache capacity in tokens (default: sized from memory)")
    s.add_argument("--drain-timeout", type=_seconds, default=30.0, metavar="S",
                   help="seconds running requests may take to finish after SIGTERM")
    s.add_argument("--health-timeout", type=_seconds, default=30.0, metavar="S",
                   help="/health is 503 after the engine is silent or stuck this long")
    r = s.add_argument_group("replicas on Ray Serve (docs/scaling.md)")
    r.add_argument("--replicas", type=_count, metavar="N", help="a fixed number of replicas")
    r.add_argument("--min-replicas", type=_count, metavar="N", help="autoscaling: fewest replicas")
    r.add_argument("--max-replicas", type=_count, metavar="N", help="autoscaling: most replicas")
    r.add_argument("--target-ongoing-requests", type=float, default=16,
                   help="autoscaling: requests in flight per replica to aim for")
    r.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
    r.add_argument("--threads-per-rank", type=_count, metavar="N", default=1, help="CPUs per rank")
    r.add_argument("--prefix-routing", action="store_true",
                   help="send requests sharing a prompt prefix to the same replica")

    b = command("bench", "run a benchmark script from benchmarks/ (arguments forwarded)")
    b.add_argument("which", choices=BENCHMARKS, metavar="WHICH",
                   help="the script benchmarks/bench_WHICH.py: " + " | ".join(BENCHMARKS))
    b.add_argument("args", nargs=argparse.REMAINDER,
                   help="arguments for the script (see `parallax bench WHICH --help`)")
    return p


# Per command: the checks that need no weights (exit 2), then the run (exit 1 on error).
COMMANDS = {
    "generate": (check_generate, cmd_generate),
    "info": (check_model, cmd_info),
    "serve": (check_serve, cmd_serve),
    "bench": (None, cmd_bench),
}


def _fail(e: ParallaxError, code: int) -> int:
    msg = " ".join(str(e).split())     # one line, whatever the message holds
    print(f"parallax: error: {msg}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the ``parallax`` command with ``argv`` (default: ``sys.argv[1:]``); returns the
    exit code."""
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    check, run = COMMANDS[args.command]
    try:
        if check is not None:
            check(args)
    except ParallaxError as e:
        return _fail(e, EXIT_USAGE)
    try:
        return run(args)
    except ParallaxError as e:
        return _fail(e, EXIT_RUNTIME)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

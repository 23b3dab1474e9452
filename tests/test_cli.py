"""The `parallax` command: generate, info, bench, errors (run as subprocesses)."""

from __future__ import annotations

import importlib.metadata
import argparse
import inspect
import os
import re
import shutil
import subprocess
import sys

import pytest

import parallax
from parallax import cli, ops
from parallax.extras import MissingExtraError, require
from parallax.parallel.plan import rank_plan

# The subprocesses run the parallax this test imports, whatever the environment installed.
_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [os.path.dirname(os.path.dirname(parallax.__file__)), os.environ.get("PYTHONPATH", "")])}


def _run(*args: str, timeout: float = 180, exe: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(exe or [sys.executable, "-m", "parallax"]), *args],
                          capture_output=True, text=True, timeout=timeout, env=_ENV)


def _table(stdout: str) -> list[dict[str, str]]:
    """The markdown table `parallax info` prints, as one dict per row."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def _bytes(cell: str) -> int:
    return int(cell.replace(",", ""))


def _must_not_run(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} ran, but the arguments were already known to be bad")
    return fail


def _main(argv: list[str]) -> int:
    """cli.main in this process; argparse's own errors exit through SystemExit."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


# ---------------------------------------------------------------------- help, defaults, version
def _parsers() -> dict[str, "argparse.ArgumentParser"]:
    top = cli.build_parser()
    sub = next(a for a in top._actions if a.dest == "command")
    return {"parallax": top, **{f"parallax {n}": q for n, q in sub.choices.items()}}


def _help_entries(text: str) -> list[str]:
    """The option entries of a --help page, each joined onto one line."""
    entries: list[str] = []
    for line in text.splitlines():
        if line.startswith("  ") and not line.startswith("   "):
            entries.append(line.strip())
        elif line.startswith("   ") and entries:
            entries[-1] += " " + line.strip()
        else:
            entries.append("")                  # a section title or blank line ends one
    return [e for e in entries if e]


@pytest.mark.parametrize("name", ["parallax", "parallax generate", "parallax info",
                                  "parallax bench"])
def test_help_describes_every_option_with_its_default(name, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    parser = _parsers()[name]
    entries = _help_entries(parser.format_help())
    for action in parser._actions:
        if action.dest in ("help", "version", "command") or action.help == "==SUPPRESS==":
            continue
        label = action.option_strings[-1] if action.option_strings else action.metavar or action.dest
        [entry] = [e for e in entries if e.split(" ")[0].rstrip(",") in
                   (*action.option_strings, label)] or [None]
        assert entry, (name, label, entries)
        assert action.help and len(action.help) > 10, (name, label)
        if action.nargs == argparse.REMAINDER or (not action.option_strings
                                                  and action.nargs is None):
            continue                            # a required positional has no default
        shown = re.search(r"\(default: ([^)]*)\)", entry)
        assert shown, (name, label, entry)
        if action.default not in (None, False, argparse.SUPPRESS):
            assert shown.group(1) == str(action.default), (name, label, entry)


def test_cli_defaults_are_the_python_defaults():
    """One source of truth: `parallax generate` given nothing does what LLM(...) and
    llm.generate(...) given nothing do."""
    gen = _parsers()["parallax generate"]
    cli_defaults = {a.dest: a.default for a in gen._actions}
    py = {**inspect.signature(parallax.LLM.__init__).parameters,
          **inspect.signature(parallax.LLM.generate).parameters}
    rename = {"timeout": "timeout_s"}
    checked = []
    for dest, default in cli_defaults.items():
        param = py.get(rename.get(dest, dest))
        if param is None or param.default is inspect.Parameter.empty:
            continue
        assert default == param.default, (dest, default, param.default)
        checked.append(dest)
    assert {"model", "tp", "pp", "ep", "dtype", "device", "max_new_tokens", "temperature", "top_k",
            "top_p", "repetition_penalty", "seed", "ignore_eos", "timeout", "quantize",
            "micro_batches", "layer_split", "stop"} <= set(checked)
    info_defaults = {a.dest: a.default for a in _parsers()["parallax info"]._actions}
    assert all(info_defaults[k] == cli_defaults[k] for k in ("model", "tp", "pp", "ep", "dtype"))


def test_version():
    r = _run("--version", timeout=60)
    assert r.returncode == 0 and r.stdout == f"parallax {parallax.__version__}\n", r


def test_usage_error_is_one_line_exit_2():
    r = _run("generate", "hi", "--tp", "two", timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("parallax: error: argument --tp: 'two' is not an integer; "
                        "see `parallax generate --help`\n")
    assert _run(timeout=60).stderr.count("\n") == 1      # no command given


# ---------------------------------------------------------------------- checks before loading
BAD_ARGS = [("--max-new-tokens", "0"), ("--temperature", "-0.5"), ("--top-p", "0"),
            ("--top-p", "1.5"), ("--top-k", "-1"), ("--repetition-penalty", "0"),
            ("--tp", "0"), ("--pp", "-1"), ("--layer-split", "16,x"), ("--micro-batches", "0"),
            ("--timeout", "0")]


@pytest.mark.parametrize("option, value", BAD_ARGS, ids=[f"{o}={v}" for o, v in BAD_ARGS])
def test_bad_option_fails_before_the_checkpoint_is_opened(option, value, monkeypatch, capsys):
    """Option values are checked before the model path is even looked at: the checkpoint
    opener and LLM are replaced by functions that fail the test if called."""
    import parallax.api
    import parallax.loading
    monkeypatch.setattr(parallax.loading, "open_checkpoint", _must_not_run("open_checkpoint"))
    monkeypatch.setattr(parallax.api, "LLM", _must_not_run("LLM"))
    assert _main(["generate", "hi", option, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("parallax: error: ") and err.count("\n") == 1, err
    assert option in err, err


@pytest.mark.parametrize("args, words", [
    (["--tp", "9"], "choose tp in 1..8"),
    (["--pp", "2", "--layer-split", "1,1,1"], "layer_split=[1, 1, 1]"),
    (["--pp", "9"], "choose pp in 1..4"),
])
def test_layout_is_checked_before_the_model_is_built(tiny_llama, args, words, monkeypatch,
                                                     capsys):
    """A layout the model cannot take is found from the config alone: exit 2, LLM never built."""
    import parallax.api
    monkeypatch.setattr(parallax.api, "LLM", _must_not_run("LLM"))
    assert _main(["generate", "hi", "--model", tiny_llama, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
    assert _main(["info", tiny_llama, *args]) == 2
    assert words in capsys.readouterr().err


def test_unknown_model_path_is_a_usage_error(monkeypatch, capsys):
    import parallax.api
    monkeypatch.setattr(parallax.api, "LLM", _must_not_run("LLM"))
    assert _main(["generate", "hi", "--model", "/no/such/model"]) == 2
    assert "model path '/no/such/model' does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------- generate
@pytest.mark.slow
def test_generate_streams_real_text_with_stats():
    r = _run("generate", "What is the capital of France?", "--max-new-tokens", "24", "--verbose")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and r.stdout.endswith("\n")
    assert re.search(r"time to first token \d+ ms; decode [\d.]+ tok/s", r.stderr), r.stderr


def test_text_prompt_without_tokenizer_is_a_runtime_error(tiny_llama):
    """A tokenizer-less checkpoint refuses text prompts while running: one line, exit 1."""
    r = _run("generate", "hello", "--model", tiny_llama, "--max-new-tokens", "2")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "no tokenizer" in r.stderr


def test_bad_model_path_is_one_clear_line():
    r = _run("generate", "hi", "--model", "/no/such/model")
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1
    assert r.stderr.startswith("parallax: error: model path '/no/such/model' does not exist")


def test_bad_sampling_value_exits_2(tiny_llama):
    r = _run("generate", "hi", "--model", tiny_llama, "--no-chat", "--top-p", "1.5")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


# ---------------------------------------------------------------------- expert parallel
@pytest.fixture(scope="module")
def tiny_moe_chat(tmp_path_factory) -> str:
    """A tiny random Mixtral (5 experts: 3 + 2 per rank at ep=2) with a trained tokenizer."""
    from conftest import make_checkpoint, make_tokenizer
    folder = str(tmp_path_factory.mktemp("tiny_moe"))
    return make_checkpoint(folder, "mixtral", vocab_size=make_tokenizer(folder),
                           num_local_experts=5, num_experts_per_tok=2)


def test_generate_runs_the_expert_parallel_layout(tiny_moe_chat):
    """`generate --tp 2 --ep 2` runs ep=2 (the stats line reports the engine's own ep) and
    answers what one process answers."""
    prompt = "the capital of France"
    r = _run("generate", prompt, "--model", tiny_moe_chat, "--tp", "2", "--ep", "2",
             "--no-chat", "--max-new-tokens", "12", "--temperature", "0", "--verbose")
    assert r.returncode == 0, r.stderr
    assert "(tp=2 pp=1 ep=2)" in r.stderr, r.stderr
    with parallax.LLM(tiny_moe_chat) as llm:
        [want] = llm.generate([prompt], max_new_tokens=12, chat=False)
    assert want.text and r.stdout == want.text + "\n"


def test_serve_passes_ep_to_the_engine(tiny_moe_chat):
    """`serve --ep` reaches the LLM keywords of both the one-server and the Ray Serve path
    (serve/server.py's cli_options feeds both)."""
    from parallax.serve.server import cli_options
    a = cli.build_parser().parse_args(["serve", tiny_moe_chat, "--tp", "2", "--ep", "2"])
    cli.check_serve(a)
    assert cli_options(a)[1]["ep"] == 2


@pytest.mark.parametrize("model, args, words", [
    ("dense", ["--tp", "2", "--ep", "2"], "needs a mixture-of-experts model"),
    ("moe", ["--tp", "2", "--ep", "3"], "ep=3 must divide tp=2"),
])
@pytest.mark.parametrize("command", ["generate", "serve"])
def test_bad_ep_is_a_usage_error(command, model, args, words, tiny_llama, tiny_moe_chat,
                                 monkeypatch, capsys):
    """An --ep the model cannot take is found from the config alone: exit 2, one line, the
    engine never built."""
    import parallax.api
    monkeypatch.setattr(parallax.api, "LLM", _must_not_run("LLM"))
    path = tiny_llama if model == "dense" else tiny_moe_chat
    argv = ["generate", "hi", "--model", path] if command == "generate" else ["serve", path]
    assert _main([*argv, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err


# ---------------------------------------------------------------------- info
def test_info_table_equals_allocated_bytes(tiny_llama):
    """`parallax info --tp 2` computes per-rank bytes without loading a weight; they must be
    exactly what the two ranks allocate."""
    r = _run("info", tiny_llama, "--tp", "2")
    assert r.returncode == 0, r.stderr
    rows = _table(r.stdout)
    with parallax.LLM(tiny_llama, tp=2) as llm:
        measured = {m["rank"]: m["weight_bytes"] for m in llm.memory()}
    assert {int(row["rank"]): _bytes(row["weight bytes"]) for row in rows} == measured
    assert [row["q / kv heads"] for row in rows] == ["4 / 1", "4 / 1"]


@pytest.mark.slow
def test_info_measure_tp_pp_tied_bias(tiny_qwen2):
    """--measure builds tp=2 x pp=2 (qwen2: q/k/v biases, a tied embedding matrix read by the
    first stage's embedding and the last stage's head) and its measured column equals the
    computed one."""
    r = _run("info", tiny_qwen2, "--tp", "2", "--pp", "2", "--measure")
    assert r.returncode == 0, r.stderr
    rows = _table(r.stdout)
    assert len(rows) == 4 and "warning" not in r.stderr
    assert all(_bytes(row["weight bytes"]) == _bytes(row["measured bytes"]) for row in rows)
    assert [row["embed / head"] for row in rows] == ["embed", "embed", "head", "head"]


def test_info_smollm2_printout():
    r = _run("info", "smollm2-135m", "--tp", "2")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for fact in ("architecture     llama", "layers           30", "heads / kv heads 9 / 3",
                 "vocab            49152", "tied embeddings  True", "parameters       134,515,008",
                 "context          8192"):
        assert fact in out, (fact, out)
    # The kernels line names what this machine runs (same environment, same build cache).
    want = ops.kernel_report()
    line = next(x for x in out.splitlines() if x.startswith("kernels "))
    assert line.split()[1] == want["backend"], (line, want)
    assert f"variant {want['variant'] or 'none'}" in line
    rows = _table(out)
    # 3 KV heads over 2 ranks: whole KV groups, 2 + 1.
    assert [row["q / kv heads"] for row in rows] == ["6 / 2", "3 / 1"]
    assert [row["layers"] for row in rows] == ["0-29", "0-29"]
    # Everything but the replicated norms (61 x 576 floats per extra rank) is split.
    one = 134_515_008 * 4
    assert sum(_bytes(row["weight bytes"]) for row in rows) == one + 61 * 576 * 4


def test_info_layout_errors_exit_2():
    bad = _run("info", "smollm2-135m", "--tp", "10")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "choose tp in 1..9" in bad.stderr
    split = _run("info", "smollm2-135m", "--pp", "2", "--layer-split", "3,4")
    assert split.returncode == 2 and "summing to the model's 30 layers" in split.stderr


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)])
def test_plan_equals_allocated_bytes_in_process(tiny_qwen2, tp, pp):
    with parallax.LLM(tiny_qwen2, tp=tp, pp=pp) as llm:
        measured = {m["rank"]: m["weight_bytes"] for m in llm.memory()}
        plan = rank_plan(llm.config, tp, pp, None, "float32")
    assert {r["rank"]: r["weight_bytes"] for r in plan} == measured


# ---------------------------------------------------------------------- entry point, bench
def test_entry_point_is_declared_and_runs(tiny_llama):
    eps = importlib.metadata.entry_points(group="console_scripts")
    assert any(ep.name == "parallax" and ep.value == "parallax.cli:main" for ep in eps)
    exe = shutil.which("parallax")
    if exe is None:
        pytest.skip("the parallax script is not on PATH")
    r = _run("info", tiny_llama, exe=[exe])
    assert r.returncode == 0, r.stderr
    assert "architecture     llama" in r.stdout


def test_bench_forwards_arguments(monkeypatch):
    """Everything after the benchmark's name reaches its script untouched, in order, and the
    script's exit code is parallax's."""
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda argv: calls.append(argv) or 7)
    assert cli.main(["bench", "parallel", "tp", "--repeats", "2", "--help", "-v"]) == 7
    [argv] = calls
    assert argv[0] == sys.executable
    assert argv[1].endswith(os.path.join("benchmarks", "bench_parallel.py"))
    assert argv[2:] == ["tp", "--repeats", "2", "--help", "-v"]


def test_bench_script_parses_the_forwarded_arguments():
    """End to end: the script's own parser sees the value (its error, not parallax's)."""
    r = _run("bench", "parallel", "tp", "--repeats", "notanint", timeout=60)
    assert r.returncode == 2
    assert "bench_parallel: error: argument --repeats: invalid int value: 'notanint'" in r.stderr


def test_bench_without_its_extra_names_the_pip_line(monkeypatch, capsys):
    """`parallax bench generate` needs transformers: without it, one line naming the extra,
    exit 1, and the script is never started."""
    monkeypatch.setitem(sys.modules, "transformers", None)     # as if not installed
    monkeypatch.setattr(cli.subprocess, "call", _must_not_run("the benchmark script"))
    assert cli.main(["bench", "generate"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'transformers'" in err, err
    assert "pip install 'parallax[bench]'" in err, err


def test_require_names_module_and_extra():
    with pytest.raises(MissingExtraError) as e:
        require("parallax_no_such_module", "serve", "parallax serve")
    assert isinstance(e.value, parallax.ParallaxError) and isinstance(e.value, ImportError)
    assert str(e.value).startswith("parallax serve needs the Python package "
                                   "'parallax_no_such_module'")
    assert "pip install 'parallax[serve]'" in str(e.value)
    require("json", "serve")                   # installed: no error


def test_info_names_a_cpu_kernel_build_failure(tmp_path):
    """A compiler that fails: `info` says the kernels are torch and why, in the compiler's words."""
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'gemm_f32.c:1: error: frobnicate.h not found' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {**_ENV, "PARALLAX_CC": str(fake), "PARALLAX_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "parallax", "info", "smollm2-135m"],
                       capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("kernels "))
    if not ops.kernel_report()["device"] == "cuda":
        assert line.split()[1] == "torch" and "variant none" in line
    assert "did not build: gemm_f32.c:1: error: frobnicate.h not found" in r.stdout
    assert r.stderr.count("frobnicate.h") == 1   # logged once

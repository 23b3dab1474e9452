"""The `parallax` command: generate, info, bench, errors (run as subprocesses)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys

import pytest

import parallax
from parallax import ops
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


# ---------------------------------------------------------------------- generate
@pytest.mark.slow
def test_generate_streams_real_text_with_stats():
    r = _run("generate", "What is the capital of France?", "--max-new-tokens", "24", "--verbose")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and r.stdout.endswith("\n")
    assert re.search(r"time to first token \d+ ms; decode [\d.]+ tok/s", r.stderr), r.stderr


def test_text_prompt_without_tokenizer_exits_2(tiny_llama):
    """A tokenizer-less checkpoint refuses text prompts with one line (PromptError -> 2)."""
    r = _run("generate", "hello", "--model", tiny_llama, "--max-new-tokens", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
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
    """--measure builds tp=2 x pp=2 (qwen2: q/k/v biases, tied embedding on the last stage)
    and its measured column equals the computed one."""
    r = _run("info", tiny_qwen2, "--tp", "2", "--pp", "2", "--measure")
    assert r.returncode == 0, r.stderr
    rows = _table(r.stdout)
    assert len(rows) == 4 and "warning" not in r.stderr
    assert all(_bytes(row["weight bytes"]) == _bytes(row["measured bytes"]) for row in rows)
    assert [row["embed / head"] for row in rows] == ["-", "-", "tied", "tied"]


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


def test_bench_forwards_arguments():
    r = _run("bench", "parallel", "--help")
    assert r.returncode == 0, r.stderr
    assert "bench_parallel" in r.stdout or "usage" in r.stdout


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

"""The `parallax` command: generate, info, errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

import parallax
from parallax.cli import rank_plan


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parallax", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_generate_prints_real_text():
    r = _run("generate", "What is the capital of France?", "--max-new-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_bad_model_path_is_one_clear_line():
    r = _run("generate", "hi", "--model", "/no/such/model")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("parallax: error: model path '/no/such/model' does not exist")
    assert "Traceback" not in r.stderr


def test_info_prints_layout_and_refuses_impossible_ones():
    r = _run("info", "smollm2-135m", "--tp", "3")
    assert r.returncode == 0, r.stderr
    assert "heads / kv heads 9 / 3" in r.stdout and "134,515,008" in r.stdout
    bad = _run("info", "smollm2-135m", "--tp", "10")
    assert bad.returncode == 2 and "choose tp in 1..9" in bad.stderr


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)])
def test_computed_plan_equals_allocated_bytes(tiny_qwen2, tp, pp):
    """`parallax info` computes per-rank bytes without loading; they must equal what the
    ranks really allocate (qwen2: biases and tied embeddings included)."""
    with parallax.LLM(tiny_qwen2, tp=tp, pp=pp) as llm:
        measured = {m["rank"]: m["weight_bytes"] for m in llm.memory()}
        plan = rank_plan(llm.config, tp, pp, None, 4)
    assert {r["rank"]: r["weight_bytes"] for r in plan} == measured

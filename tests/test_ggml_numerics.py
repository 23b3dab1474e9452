"""PARALLAX_NUMERICS=ggml (ops/ggml.py): llama.cpp's CPU arithmetic, op for op.

The oracle is llama.cpp itself, recorded: benchmarks/record_llamacpp.py ran llama.cpp
0.3.x (llama-cpp-python) built for AVX-512 and for AVX2 on SmolLM2 Q8_0 (the installed file
requantised by gguf-py, which this test makes again and checks by its SHA-256) and kept
each build's greedy tokens and top logits in tests/data/llamacpp_greedy_q8_0.json. Each
level is reproduced by the kernel variant of the same level; a machine checks the levels
its CPU runs (an AVX-512 machine both). The two builds' records differ (llama.cpp's
own text depends on the ISA it was built for), so each check also tells the levels apart.
Kernel-level checks against the torch twins are in test_ggml_pointwise.py,
test_ggml_attention.py and below.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf
import pytest
import torch

from parallax import ParallaxError, ops
from parallax.ops import cpu
from parallax.ops import reference as ref

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))
from record_llamacpp import q8_0_file as q8_0_file_in, sha256  # noqa: E402

RECORD = os.path.join(HERE, "data", "llamacpp_greedy_q8_0.json")
with open(RECORD) as _f:
    REC = json.load(_f)
# the kernel variant that reproduces each recorded build
LEVEL_VARIANT = {"avx512": "avx512", "avx2": "avx2"}
RUNS_HERE = [lv for lv in REC["builds"] if LEVEL_VARIANT[lv] in cpu.supported_variants()]

GENERATE = r"""
import json, struct, sys, torch, parallax
path, prompts, n, top = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(2)
out = []
with parallax.LLM(path) as llm:
    for ids in prompts:
        toks = llm.generate([ids], max_new_tokens=n, ignore_eos=True, chat=False)[0].token_ids
        row = llm.logits([ids])[0, -1]
        ids_top = torch.sort(row, descending=True, stable=True).indices[:top].tolist()
        out.append({"tokens": list(toks), "top_ids": ids_top,
                    "top_logits": [struct.pack("<f", float(row[i])).hex() for i in ids_top]})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def q8_0_file(tmp_path_factory):
    path = q8_0_file_in(str(tmp_path_factory.mktemp("gguf")))
    assert sha256(path) == REC["sha256"], (
        "the requantised file differs from the recorded one (gguf-py "
        f"{REC['gguf_py']} made it): run benchmarks/record_llamacpp.py again")
    return path


@pytest.mark.parametrize("level", RUNS_HERE)
def test_greedy_tokens_and_logits_equal_llamacpp(q8_0_file, level):
    """32 greedy tokens on 4 prompts and the top-8 logits of each prompt equal the recorded
    llama.cpp build's, bit for bit, with the kernel variant of its level."""
    env = dict(os.environ, PARALLAX_NUMERICS="ggml", PARALLAX_CPU_ISA=LEVEL_VARIANT[level])
    prompts = [p["ids"] for p in REC["prompts"]]
    r = subprocess.run([sys.executable, "-c", GENERATE, q8_0_file, json.dumps(prompts),
                        str(REC["new_tokens"]), "8"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    mine = json.loads(r.stdout.strip().splitlines()[-1])
    for p, got, want in zip(REC["prompts"], mine, REC["builds"][level]["runs"]):
        assert got["tokens"] == want["tokens"], p["label"]
        assert got["top_ids"] == want["top_ids"], p["label"]
        assert got["top_logits"] == want["top_logits"], p["label"]


def test_the_recorded_builds_differ():
    """What makes the check above tell the levels apart: llama.cpp's AVX-512 and AVX2 builds
    part within 32 tokens on at least one recorded prompt."""
    a, b = (REC["builds"][lv]["runs"] for lv in ("avx512", "avx2"))
    assert any(x["tokens"] != y["tokens"] for x, y in zip(a, b))


def _q8_0(w: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
                            ).view(torch.uint8)


@pytest.mark.parametrize("variant", cpu.supported_variants())
@pytest.mark.parametrize("m", [1, 3, 4, 7])
def test_q8_0_linear_ggml_equals_its_twin(variant, m):
    """The Q8_0 matmul in ggml's order equals reference.q8_0_linear_ggml bit for bit: x86
    variants its 8-lane order, the generic variant its scalar one (lanes=1)."""
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 320, generator=g)
    qw = _q8_0(torch.randn(13, 320, generator=g))
    lanes = 1 if variant == "generic" else 8
    want = ref.q8_0_linear_ggml(x, qw, lanes=lanes)
    assert torch.equal(cpu.q8_0_linear_ggml(x, qw, isa=variant), want)
    # the order differs from the q8 kernels' (faster) one only by fp32 rounding
    torch.testing.assert_close(want, ref.q8_0_linear_q8(x, qw), rtol=1e-5, atol=1e-5)


@pytest.fixture
def numerics(monkeypatch):
    """numerics(value): PARALLAX_NUMERICS=value in this process for one test (ops.ggml reads
    it once, so the cached reading is cleared on the way in and out)."""
    def set_(value: str) -> None:
        monkeypatch.setenv("PARALLAX_NUMERICS", value)
        ops.ggml.enabled.cache_clear()
    yield set_
    monkeypatch.delenv("PARALLAX_NUMERICS", raising=False)
    ops.ggml.enabled.cache_clear()


def test_bad_value_is_refused(numerics):
    numerics("llamacpp")
    with pytest.raises(ParallaxError, match="PARALLAX_NUMERICS='llamacpp'"):
        ops.ggml.enabled()


def test_unreproduced_models_are_refused(tmp_path):
    """A layout or model the mode does not reproduce is refused with the reason."""
    import dataclasses
    from parallax.loading import open_checkpoint
    from test_gguf import write_tiny
    path = tmp_path / "tiny.gguf"
    write_tiny(path, gguf.GGMLQuantizationType.Q8_0)
    cfg = open_checkpoint(str(path)).config
    ops.ggml.check_model(cfg, "cpu")                       # a plain Llama on the CPU: taken
    with pytest.raises(ParallaxError, match="tp=2"):
        ops.ggml.check_model(cfg, "cpu", tp_size=2)
    with pytest.raises(ParallaxError, match="rope scaling"):
        ops.ggml.check_model(dataclasses.replace(
            cfg, rope_scaling={"rope_type": "linear", "factor": 2.0}), "cpu")
    with pytest.raises(ParallaxError, match="qwen3 family"):
        ops.ggml.check_model(dataclasses.replace(cfg, architecture="qwen3"), "cpu")


@pytest.mark.timeout(300)
def test_prefix_caching_is_off_in_the_mode(tmp_path, numerics):
    """llama.cpp computes every prompt in full: a second request with the same 40-token
    prompt finds no cached prefix (one would change the prefill's rows, and with them
    ggml's attention algorithm) and gives the same tokens; the report names the mode."""
    import parallax
    from test_quant_gguf import tiny_gguf
    numerics("ggml")
    prompt = list(range(3, 43))
    with parallax.LLM(tiny_gguf(tmp_path, True, "q8_0")) as llm:
        first, second = (llm.generate([prompt], max_new_tokens=8, ignore_eos=True)[0].token_ids
                         for _ in range(2))
        assert llm.stats()["prefix_cache_queries"] == 0
    assert first == second
    assert ops.kernel_report()["numerics"] == "ggml"

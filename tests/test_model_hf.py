"""parallax against HF transformers on the same weights: logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import parallax
from conftest import make_checkpoint

VARIANTS = {
    "llama": dict(arch="llama"),
    "qwen2": dict(arch="qwen2", tie_word_embeddings=True),
    "mistral": dict(arch="mistral"),
    "llama3-rope": dict(arch="llama", rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}, rope_theta=50000.0),
    "linear-rope": dict(arch="llama", rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mha-sharded": dict(arch="llama", num_key_value_heads=8, shards=True),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    path = make_checkpoint(str(tmp_path_factory.mktemp(request.param)), **VARIANTS[request.param])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with parallax.LLM(path) as llm:
        yield llm, hf


PROMPTS = [[5, 17, 300, 2, 99, 45, 7], [11, 3], list(range(40, 140, 3))]


def test_logits_match_hf(pair):
    llm, hf = pair
    ours = llm.logits(PROMPTS)
    for i, p in enumerate(PROMPTS):
        ref = hf(torch.tensor([p])).logits[0]
        torch.testing.assert_close(ours[i, :len(p)], ref, atol=1e-4, rtol=0)
        assert torch.isnan(ours[i, len(p):]).all()


def test_greedy_64_tokens_match_hf(pair):
    llm, hf = pair
    prompt = PROMPTS[0]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False,
                      min_new_tokens=64)[0, len(prompt):].tolist()
    out = llm.generate([prompt], max_new_tokens=64, ignore_eos=True)[0]
    assert out.token_ids == ref
    assert out.finish_reason == "length"


def test_ragged_batch_equals_one_at_a_time(pair):
    llm, _ = pair
    batched = llm.generate(PROMPTS, max_new_tokens=20, ignore_eos=True)
    for p, b in zip(PROMPTS, batched):
        assert llm.generate([p], max_new_tokens=20, ignore_eos=True)[0].token_ids == b.token_ids


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_close_to_fp32(tiny_llama, dtype):
    with parallax.LLM(tiny_llama) as ref, parallax.LLM(tiny_llama, dtype=dtype) as low:
        a, b = ref.logits(PROMPTS[:1]), low.logits(PROMPTS[:1])
    assert b.dtype == torch.float32
    rel = (a - b).norm() / a.norm()
    assert rel < 3e-2, f"{dtype} logits differ from fp32 by {rel:.3g} (relative)"

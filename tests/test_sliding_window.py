"""Models whose every layer slides (Mistral, Mixtral, Phi-3 with ``sliding_window``) run the
window in the attention and in the KV cache: prompts and generations longer than the window
equal HF transformers on the same tiny weights, and a request holds a bounded number of
KV blocks however long it runs (engine/block_manager.py frees the blocks behind the window).
"""

from __future__ import annotations

import pytest
import torch
import transformers

import parallax
from conftest import make_checkpoint
from parallax.engine.block_manager import BlockManager
from test_models_families import make_family_checkpoint

WINDOW = 16
PROMPTS = [list(range(40, 140, 2)), [7, 3, 9] * 7, [5, 17, 300]]   # 50, 21 and 3 tokens


@pytest.fixture(scope="module", params=["mistral", "mixtral", "phi3"])
def windowed(request, tmp_path_factory):
    """(family, checkpoint) with sliding_window 16 in every layer."""
    path = str(tmp_path_factory.mktemp(request.param))
    if request.param == "mistral":
        return request.param, make_checkpoint(path, "mistral", sliding_window=WINDOW)
    return request.param, make_family_checkpoint(path, request.param, sliding_window=WINDOW)


def _held_blocks_per_decode_step(monkeypatch) -> list[int]:
    """Record, after every one-token (decode) allocation, the blocks its request holds."""
    held: list[int] = []
    real = BlockManager.allocate

    def allocate(self, req, num_new_tokens, computed=None):
        ok = real(self, req, num_new_tokens, computed)
        if ok and num_new_tokens == 1:
            held.append(self.num_held_blocks(req.request_id))
        return ok
    monkeypatch.setattr(BlockManager, "allocate", allocate)
    return held


@pytest.mark.parametrize("block_size", [4, 16])
def test_past_the_window_equals_hf_with_bounded_blocks(windowed, block_size, monkeypatch):
    family, path = windowed
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    held = _held_blocks_per_decode_step(monkeypatch)
    with parallax.LLM(path, block_size=block_size) as llm:
        assert llm.config.cache_window == WINDOW
        assert llm.config.max_position_embeddings > WINDOW      # no clamp to the window
        ours = llm.logits(PROMPTS)
        outs = llm.generate(PROMPTS[:2], max_new_tokens=64, ignore_eos=True)
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            torch.testing.assert_close(ours[i, :len(p)], hf(torch.tensor([p])).logits[0],
                                       atol=1e-4, rtol=0)
        for p, out in zip(PROMPTS[:2], outs):
            ref = hf.generate(torch.tensor([p]), max_new_tokens=64, min_new_tokens=64,
                              do_sample=False)[0, len(p):].tolist()
            assert out.token_ids == ref, family
    bound = -(-WINDOW // block_size) + 1
    assert len(held) >= 2 * 63 and max(held) <= bound, (max(held), bound)


def test_window_changes_the_answer_past_it(windowed, tmp_path):
    """The same weights without the window differ past it (so the match above used it)."""
    import json
    import os
    import shutil
    family, path = windowed
    full = shutil.copytree(path, str(tmp_path / "full"))
    cfg = json.load(open(os.path.join(full, "config.json")))
    cfg["sliding_window"] = None
    json.dump(cfg, open(os.path.join(full, "config.json"), "w"))
    with parallax.LLM(path) as a, parallax.LLM(full) as b:
        assert b.config.cache_window is None
        x, y = a.logits(PROMPTS[:1])[0], b.logits(PROMPTS[:1])[0]
    torch.testing.assert_close(x[:WINDOW], y[:WINDOW], atol=1e-5, rtol=0)
    assert (x[WINDOW:] - y[WINDOW:]).abs().max() > 1e-2


class _Req:
    def __init__(self, rid, tokens):
        self.request_id, self.all_token_ids = rid, tokens
        self.num_computed_tokens = 0

    @property
    def num_tokens(self):
        return len(self.all_token_ids)


def test_block_manager_releases_blocks_behind_the_window():
    """Chunked prefill then decode with window 10, blocks of 4: the table keeps token order
    (-1 for released blocks), released blocks return to the free queue, and the request
    never holds more than the window's blocks plus the step's."""
    bm = BlockManager(num_blocks=12, block_size=4, prefix_caching=True, window=10)
    req = _Req(0, list(range(30)))
    for n in (8, 8, 8, 6):                         # chunked prefill of 30 tokens
        assert bm.allocate(req, n)
        start = req.num_computed_tokens
        first = max(0, start + 1 - 10) // 4        # the first block this chunk reads
        table = bm.block_table(0)
        assert table[:first] == [-1] * first and -1 not in table[first:]
        assert len(table) == -(-(start + n) // 4)
        req.num_computed_tokens += n
    for _ in range(20):                            # decode
        req.all_token_ids.append(1)
        assert bm.allocate(req, 1)
        assert bm.num_held_blocks(0) <= -(-10 // 4) + 1
        req.num_computed_tokens += 1
    assert bm.num_free_blocks == 12 - bm.num_held_blocks(0)
    bm.free_request(0)
    assert bm.num_free_blocks == 12


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_windowed_cache_layouts_match_one_process(tmp_path):
    """tp=2 and pp=2 read the same block tables (released entries -1) as one process: the
    same greedy tokens and logits past the window (Mistral, block size 4)."""
    path = make_checkpoint(str(tmp_path / "m"), "mistral", sliding_window=WINDOW)
    greedy = dict(max_new_tokens=40, ignore_eos=True)
    with parallax.LLM(path, block_size=4) as one:
        ref_tokens = [o.token_ids for o in one.generate(PROMPTS, **greedy)]
        ref_logits = one.logits(PROMPTS)
    for kw in (dict(tp=2), dict(pp=2)):
        with parallax.LLM(path, block_size=4, threads_per_rank=1, **kw) as llm:
            assert [o.token_ids for o in llm.generate(PROMPTS, **greedy)] == ref_tokens, kw
            torch.testing.assert_close(llm.logits(PROMPTS), ref_logits, atol=1e-4, rtol=0,
                                       equal_nan=True)

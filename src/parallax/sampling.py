"""Token sampling: greedy, temperature, top-k, top-p, repetition penalty, per-sequence seeds.

Only one rank samples (the driver rank, which holds the full-vocabulary logits) and the
token is broadcast, so ranks can never diverge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import SamplingError


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen; checked when built (``LLM.generate`` builds one from its
    arguments).

    Args:
        temperature: divides the logits; 0 = greedy (argmax), the default.
        top_k: keep only the k most likely tokens; None or 0 = all.
        top_p: keep the smallest set of most likely tokens whose probability reaches top_p;
            in (0, 1], 1 = off.
        repetition_penalty: HF/CTRL style, > 1 makes tokens already in the sequence less
            likely (positive logits divided, negative ones multiplied); 1 = off.
        seed: sequence i of a batch samples from its own generator seeded ``seed + i``;
            None = a random seed per sequence.

    Raises:
        SamplingError: a value outside the ranges above.
    """

    temperature: float = 0.0          # 0 = greedy
    top_k: int | None = None          # keep the k most likely tokens (None / 0: all)
    top_p: float = 1.0                # keep the smallest set with cumulative prob >= top_p
    repetition_penalty: float = 1.0   # HF/CTRL style: divide positive logits of seen tokens
    seed: int | None = None           # sequence i draws from its own generator seeded seed + i

    def __post_init__(self) -> None:
        t, k, p, r = self.temperature, self.top_k, self.top_p, self.repetition_penalty
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise SamplingError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 0):
            raise SamplingError(f"top_k must be None or an integer >= 1, got {k!r}")
        if not (isinstance(p, (int, float)) and 0 < p <= 1):
            raise SamplingError(f"top_p must be in (0, 1], got {p!r}")
        if not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0):
            raise SamplingError(f"repetition_penalty must be > 0 (1 = off), got {r!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise SamplingError(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """Whether sampling reduces to argmax (temperature 0 or top_k 1)."""
        return self.temperature == 0 or self.top_k == 1


class Sampler:
    """Samples one token per sequence from (B, V) float32 logits."""

    def __init__(self, params: SamplingParams, batch: int, device: torch.device):
        self.params = params
        self.generators = None
        if not params.greedy:
            seeds = ([params.seed + i for i in range(batch)] if params.seed is not None
                     else torch.randint(0, 2**62, (batch,)).tolist())
            self.generators = [torch.Generator(device).manual_seed(s) for s in seeds]

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None = None,
                 rows: slice = slice(None)) -> torch.Tensor:
        """logits: (b, V) float32 for the sequences ``rows`` of the batch (a micro-batch);
        seen: (b, L) long ids already in each sequence (repetition penalty). Returns (b,) long."""
        p = self.params
        if p.repetition_penalty != 1.0 and seen is not None:
            logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
        if p.greedy:
            return logits.argmax(dim=-1)
        logits = logits / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            logits = _top_p_filter(logits, p.top_p)
        probs = torch.softmax(logits, dim=-1)
        return torch.cat([torch.multinomial(probs[i], 1, generator=g)
                          for i, g in enumerate(self.generators[rows])])


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise each token id in ``seen`` (B, L) once per row: positive logits are divided
    by ``penalty``, negative ones multiplied. Repeated ids gather the same value, so the
    scatter is order-independent."""
    picked = logits.gather(1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, seen, picked)


def _top_p_filter(logits: torch.Tensor, top_p: float, candidates: int = 1024) -> torch.Tensor:
    """Keep, per row, the smallest set of most likely tokens whose mass reaches top_p.

    Sorting all 49k logits dominates sampling, so the nucleus is first looked for among
    the ``candidates`` most likely tokens (exact whenever their mass reaches top_p, the
    usual case); otherwise the whole row is sorted.
    """
    lse = logits.logsumexp(dim=-1, keepdim=True)
    k = min(candidates, logits.shape[-1])
    top, order = logits.topk(k, dim=-1)                                 # sorted, descending
    if k < logits.shape[-1]:
        cum_k = (top - lse).exp().cumsum(dim=-1)[:, -1]   # exactly the cum used below
        if bool((cum_k < top_p).any()):
            top, order = logits.sort(dim=-1, descending=True)
    probs = (top - lse).exp()                                           # true probabilities
    cum = probs.cumsum(dim=-1)
    # Drop a token when the mass before it already reaches top_p (the top token always stays).
    kept = top.masked_fill((cum - probs) >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(1, order, kept)

"""Token sampling: greedy, temperature, top-k, top-p, repetition penalty, per-request seeds.

Only one rank samples (the driver rank, which holds the full-vocabulary logits); the tokens
go back to the scheduler, which sends them to every rank in the next step's plan, so ranks
can never diverge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import SamplingError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0 = greedy
    top_k: int | None = None          # keep the k most likely tokens (None / 0: all)
    top_p: float = 1.0                # keep the smallest set with cumulative prob >= top_p
    repetition_penalty: float = 1.0   # HF/CTRL style: divide positive logits of seen tokens
    seed: int | None = None           # the request's own generator's seed (generate: seed + i for prompt i)

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
        return self.temperature == 0 or self.top_k == 1


class _RequestState:
    """One request's sampling state: its parameters, its generator, the ids it has seen."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], device: torch.device):
        self.params = params
        self.generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()))
            self.generator = torch.Generator(device).manual_seed(seed)
        self.seen: list[int] | None = list(prompt_ids) if params.repetition_penalty != 1.0 else None


class Sampler:
    """Next tokens for many requests at once, each with its own parameters and generator.

    A request's draws depend only on its own logits row and its own generator (seeded with
    ``params.seed``), never on the other rows of the batch, so its tokens do not depend on
    what it is batched with. Lives on the one rank that samples (the driver rank).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.requests: dict[int, _RequestState] = {}

    def add(self, request_id: int, params: SamplingParams, prompt_ids: Sequence[int] = ()) -> None:
        """Start sampling for a request (``prompt_ids``: for the repetition penalty)."""
        self.requests[request_id] = _RequestState(params, prompt_ids, self.device)

    def remove(self, request_id: int) -> None:
        self.requests.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, request_ids: Sequence[int]) -> list[int]:
        """logits: (R, V) float32, row i for ``request_ids[i]``. Returns R token ids."""
        states = [self.requests[r] for r in request_ids]
        out: list[int | None] = [None] * len(states)
        plain = [i for i, s in enumerate(states) if s.params.greedy and s.seen is None]
        if plain:   # the common case, one argmax for all of them
            for i, tok in zip(plain, logits[plain].argmax(dim=-1).tolist()):
                out[i] = tok
        for i, s in enumerate(states):
            if out[i] is None:
                out[i] = _sample_row(logits[i:i + 1], s)
            if s.seen is not None:
                s.seen.append(out[i])
        return out   # type: ignore[return-value]


def _sample_row(logits: torch.Tensor, s: _RequestState) -> int:
    """One request's token from its (1, V) logits."""
    p = s.params
    if s.seen is not None:
        logits = apply_repetition_penalty(logits, torch.tensor([s.seen], device=logits.device),
                                          p.repetition_penalty)
    if p.greedy:
        return int(logits.argmax(dim=-1))
    logits = logits / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        logits = _top_p_filter(logits, p.top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs[0], 1, generator=s.generator))


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

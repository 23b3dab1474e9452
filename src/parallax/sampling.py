"""Token sampling: greedy, temperature, top-k, top-p, repetition / presence / frequency
penalties, per-request seeds, and log-probabilities of the chosen tokens.

Per request, the logits row goes through the penalties (repetition, then presence and
frequency), which change the distribution the model's answer is judged by; log-probabilities
(``SamplingParams.logprobs``) are the log-softmax of these processed logits, before
temperature, top-k and top-p, which only choose how to draw from it (OpenAI's and vLLM's
"logprobs of the model": greedy requests get the same numbers as sampled ones).

Only one rank samples (the driver rank, which holds the full-vocabulary logits); the tokens
go back to the scheduler, which sends them to every rank in the next step's plan, so ranks
can never diverge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from . import ops
from .errors import SamplingError

MAX_LOGPROBS = 20       # alternatives per token at most (OpenAI's top_logprobs limit)


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
        presence_penalty: OpenAI's, in [-2, 2]: subtracted once from the logit of every token
            generated so far (the prompt does not count); 0 = off.
        frequency_penalty: OpenAI's, in [-2, 2]: subtracted from each token's logit once per
            time it was generated so far; 0 = off.
        logprobs: also return the chosen token's log-probability and those of the
            ``logprobs`` most likely tokens (0..20; 0: the chosen one only); None = off.

    Raises:
        SamplingError: a value outside the ranges above.
    """

    temperature: float = 0.0          # 0 = greedy
    top_k: int | None = None          # keep the k most likely tokens (None / 0: all)
    top_p: float = 1.0                # keep the smallest set with cumulative prob >= top_p
    repetition_penalty: float = 1.0   # HF/CTRL style: divide positive logits of seen tokens
    seed: int | None = None           # the request's own generator's seed (generate: seed + i for prompt i)
    presence_penalty: float = 0.0     # OpenAI: logit -= presence * (count > 0), generated tokens
    frequency_penalty: float = 0.0    # OpenAI: logit -= frequency * count, generated tokens
    logprobs: int | None = None       # top alternatives to report with each token (None: off)

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
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and -2 <= v <= 2):
                raise SamplingError(f"{name} must be a number in [-2, 2] (0 = off), got {v!r}")
        lp = self.logprobs
        if lp is not None and (not isinstance(lp, int) or isinstance(lp, bool)
                               or not 0 <= lp <= MAX_LOGPROBS):
            raise SamplingError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}] "
                                f"(alternatives per token), got {lp!r}")

    @property
    def greedy(self) -> bool:
        """Whether sampling reduces to argmax (temperature 0 or top_k 1)."""
        return self.temperature == 0 or self.top_k == 1

    @property
    def processed(self) -> bool:
        """Whether the logits are changed (penalties) or looked at (logprobs) beyond a draw."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0
                or self.frequency_penalty != 0 or self.logprobs is not None)


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities at one generated position (natural log, float32 precision).

    Attributes:
        token_id: the generated token.
        logprob: its log-probability under the processed logits (see the module docstring).
        top: (token_id, logprob) of the most likely tokens, most likely first;
            ``SamplingParams.logprobs`` of them.
    """
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class SampledTokens(list):
    """The token id of each sample row (a plain ``list`` of int to whoever wants only ids)
    and, in ``logprobs``, each row's ``TokenLogprobs`` (None where not asked for).

    ``+=`` joins both, so a step's micro-batches concatenate as plain lists do; pickles
    with its ``logprobs`` (it crosses process boundaries as a step's result).
    """

    def __init__(self, tokens=(), logprobs=None):
        super().__init__(tokens)
        self.logprobs: list[TokenLogprobs | None] = (list(logprobs) if logprobs is not None
                                                     else [None] * len(self))

    def __iadd__(self, other):
        super().__iadd__(other)
        self.logprobs += getattr(other, "logprobs", None) or [None] * len(other)
        return self


class _RequestState:
    """One request's sampling state: its parameters, its generator, the ids it has seen
    (repetition penalty: prompt and output) and the counts of the ids it generated
    (presence and frequency penalties)."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], device: torch.device):
        self.params = params
        self.generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()))
            self.generator = torch.Generator(device).manual_seed(seed)
        self.seen: list[int] | None = list(prompt_ids) if params.repetition_penalty != 1.0 else None
        self.counts: dict[int, int] | None = (
            {} if params.presence_penalty != 0 or params.frequency_penalty != 0 else None)

    def observe(self, token: int) -> None:
        """Remember a token this request generated."""
        if self.seen is not None:
            self.seen.append(token)
        if self.counts is not None:
            self.counts[token] = self.counts.get(token, 0) + 1

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """The penalties applied to this request's (1, V) logits (a new tensor or the same)."""
        p = self.params
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, torch.tensor([self.seen], device=logits.device),
                                              p.repetition_penalty)
        if self.counts:
            ids = torch.tensor([list(self.counts)], device=logits.device)
            counts = torch.tensor([list(self.counts.values())], dtype=logits.dtype,
                                  device=logits.device)
            logits = apply_presence_frequency_penalties(logits, ids, counts, p.presence_penalty,
                                                        p.frequency_penalty)
        return logits


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

    def __call__(self, logits: torch.Tensor, request_ids: Sequence[int]) -> SampledTokens:
        """logits: (R, V) float32, row i for ``request_ids[i]``. Returns R token ids (with
        their log-probabilities for the requests that asked)."""
        states = [self.requests[r] for r in request_ids]
        out: list[int | None] = [None] * len(states)
        lps: list[TokenLogprobs | None] = [None] * len(states)
        plain = [i for i, s in enumerate(states) if s.params.greedy and not s.params.processed]
        if plain:   # the common case, one argmax for all of them
            # All rows plain (the usual batch): no gather, which copies the (R, V) logits.
            picked = logits if len(plain) == len(states) else logits[plain]
            for i, tok in zip(plain, ops.argmax_rows(picked).tolist()):
                out[i] = tok
        for i, s in enumerate(states):
            if out[i] is None:
                out[i], lps[i] = _sample_row(logits[i:i + 1], s)
            s.observe(out[i])
        return SampledTokens(out, lps)


def _sample_row(logits: torch.Tensor, s: _RequestState) -> tuple[int, TokenLogprobs | None]:
    """One request's token (and its logprobs, when asked) from its (1, V) logits."""
    p = s.params
    logits = s.process(logits)
    token = _draw(logits, s)
    if p.logprobs is None:
        return token, None
    return token, token_logprobs(logits, token, p.logprobs)


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> TokenLogprobs:
    """The log-softmax of (1, V) ``logits`` at ``token``, and its ``k`` largest entries."""
    logp = torch.log_softmax(logits[0].float(), dim=-1)
    top = torch.topk(logp, k) if k else None
    pairs = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
    return TokenLogprobs(token, float(logp[token]), pairs)


def _draw(logits: torch.Tensor, s: _RequestState) -> int:
    """The token from processed (1, V) logits: argmax, or a draw from the request's
    generator after temperature, top-k and top-p."""
    p = s.params
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


def apply_presence_frequency_penalties(logits: torch.Tensor, ids: torch.Tensor,
                                       counts: torch.Tensor, presence: float,
                                       frequency: float) -> torch.Tensor:
    """OpenAI's penalties: ``logit[j] -= counts[j] * frequency + (counts[j] > 0) * presence``
    for each generated id j. logits (B, V); ids (B, L) distinct per row; counts (B, L)
    of logits' dtype, each >= 1."""
    picked = logits.gather(1, ids) - counts * frequency - presence
    return logits.scatter(1, ids, picked)


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

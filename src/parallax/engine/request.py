"""One request's state in the engine, and what it hands back to its caller.

A request owns its token ids (prompt + output), how many of them have their KV in the cache
(``num_computed_tokens``), its sampling and stop settings, and its text. The scheduler closes
the gap ``num_computed_tokens -> num_tokens`` a chunk per step; when the whole gap is closed
the model's last logits give the next token, which ``append_token`` adds (stops checked,
safe-to-show text worked out) and returns as a ``Delta``.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from ..sampling import SamplingParams, TokenLogprobs


class RequestStatus(enum.Enum):
    WAITING = "waiting"        # not admitted, or preempted (its KV freed, to be recomputed)
    RUNNING = "running"        # holds KV blocks; scheduled every step until it finishes
    FINISHED = "finished"


@dataclass(frozen=True)
class StopConditions:
    """When a request ends.

    max_new_tokens: output tokens at most (finish_reason "length").
    stop_token_ids: a sampled id in this set ends the request (kept in token_ids, not in text).
    stop_strings:   the text is cut before the first occurrence of any of these.
    """
    max_new_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()


@dataclass
class Usage:
    """Token counts of one request (OpenAI's ``usage``).

    Attributes:
        prompt_tokens: tokens in the prompt (after the chat template).
        completion_tokens: tokens generated.
    """
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        """prompt_tokens + completion_tokens."""
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Delta:
    """What one engine step added to a request.

    Attributes:
        text: new text that is safe to show (never part of a possible stop string).
        token_ids: new token ids (usually one; empty on a final delta that only flushes text).
        finish_reason: None until the last delta, then "length" | "stop" | "abort".
        logprobs: one ``TokenLogprobs`` per token id when the request asked for them
            (``logprobs=k``), else None.
    """
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class Completion:
    """One finished answer.

    Attributes:
        text: the answer's text (stop strings excluded).
        token_ids: the generated token ids (a stop token included).
        finish_reason: "length" (max_new_tokens), "stop" (stop id or string) or "abort"
            (cancelled).
        prompt_tokens: tokens in the prompt (after the chat template).
        time_to_first_token_s: seconds from submission to the first output token.
        tokens_per_s: decode speed after the first token (0 with fewer than 2 tokens).
        usage: prompt and completion token counts (OpenAI's ``usage``).
        logprobs: one ``TokenLogprobs`` per generated token when asked for, else None.
        queue_time_s: seconds from submission to the engine first scheduling the request.
    """
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    time_to_first_token_s: float
    tokens_per_s: float
    usage: Usage = field(default=None)   # type: ignore[assignment]
    logprobs: list[TokenLogprobs] | None = None
    queue_time_s: float = 0.0

    def __post_init__(self) -> None:
        if self.usage is None:
            self.usage = Usage(self.prompt_tokens, len(self.token_ids))


class Request:
    """Engine-side state of one request (touched only by the engine thread).

    Args:
        request_id: unique id within the engine.
        prompt_ids: the prompt's token ids (non-empty).
        sampling:   the request's sampling parameters (its seed is this request's own).
        stops:      when to end.
        decoder:    an ``IncrementalDecoder`` for text, or None (token ids only).
    """

    def __init__(self, request_id: int, prompt_ids: list[int], sampling: SamplingParams,
                 stops: StopConditions, decoder=None):
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.all_token_ids = list(prompt_ids)
        self.sampling, self.stops, self.decoder = sampling, stops, decoder
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.arrival_time = time.perf_counter()
        self.scheduled_time: float | None = None    # first admitted to the running batch
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.num_cached_tokens = 0      # prompt tokens found in the prefix cache at admission
        self.logprobs: list[TokenLogprobs] | None = [] if sampling.logprobs is not None else None
        self.text = ""
        self._emitted = 0               # chars of text already handed out

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def append_token(self, token: int, now: float | None = None,
                     logprobs: TokenLogprobs | None = None) -> Delta:
        """Add a sampled token (and its logprobs, when the request asked for them); sets
        ``finish_reason`` when a stop or the length limit hits."""
        now = time.perf_counter() if now is None else now
        lps = None
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)
            lps = [logprobs]
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now
        self.output_ids.append(token)
        self.all_token_ids.append(token)
        if token in self.stops.stop_token_ids:
            self.finish_reason = "stop"
        elif self.decoder is not None:
            self.text += self.decoder.push(token)
            self._check_stop_strings()
        if self.finish_reason is None and len(self.output_ids) >= self.stops.max_new_tokens:
            self.finish_reason = "length"
            if self.decoder is not None:
                self.text += self.decoder.flush()
        return Delta(self._take_text(), [token], self.finish_reason, lps)

    def abort(self) -> Delta:
        """End the request as cancelled; returns the final delta (its held-back text)."""
        self.finish_reason = "abort"
        return Delta(self._take_text(), [], "abort")

    def _take_text(self) -> str:
        held = 0 if self.finish_reason else self._held_back()
        safe = len(self.text) - held
        piece, self._emitted = self.text[self._emitted:safe], max(self._emitted, safe)
        return piece

    def _check_stop_strings(self) -> None:
        for stop in self.stops.stop_strings:
            i = self.text.find(stop, max(0, self._emitted - len(stop)))
            if i >= 0:
                self.text, self.finish_reason = self.text[:i], "stop"
                return

    def _held_back(self) -> int:
        """Length of the longest text suffix that could still grow into a stop string."""
        best = 0
        for stop in self.stops.stop_strings:
            for n in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def completion(self) -> Completion:
        n = len(self.output_ids)
        first = self.first_token_time or self.arrival_time
        decode_s = (self.last_token_time or first) - first
        queued = (self.scheduled_time or self.arrival_time) - self.arrival_time
        return Completion(self.text, list(self.output_ids), self.finish_reason or "length",
                          self.num_prompt_tokens, first - self.arrival_time,
                          (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
                          logprobs=list(self.logprobs) if self.logprobs is not None else None,
                          queue_time_s=queued)

    def __repr__(self) -> str:
        return (f"Request({self.request_id}, {self.status.value}, computed="
                f"{self.num_computed_tokens}/{self.num_tokens})")

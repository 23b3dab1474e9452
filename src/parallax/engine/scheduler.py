"""Iteration-level scheduling (Orca) over the paged cache (vLLM), with chunked prefill.

Every step closes, for as many requests as fit, the gap between ``num_computed_tokens`` (KV
in the cache) and ``num_tokens`` (prompt + output so far). Prefill and decode are not
separate phases: a decode is a gap of one token, a prompt a gap of many.

Rules, in order (docs/engine.md):
1. Running requests first, in admission order, each taking ``min(gap, budget left)`` tokens
   of the step's ``max_num_batched_tokens`` budget: a long prompt is prefilled in chunks
   across steps, and decodes never wait behind it.
2. A running request that needs a new block when none is free preempts the most recently
   admitted running request (its blocks freed, its computed tokens reset: it is recomputed
   later, with its output so far), possibly itself. Nothing is lost, nothing crashes.
3. Then waiting requests, first come first served, while the budget, ``max_num_seqs`` and
   free blocks allow; a waiting request first takes its prompt's cached prefix blocks.
   A request that cannot be admitted stops admission (FCFS: no overtaking).
4. Cancelled requests leave before anything is scheduled, so their blocks are free for the
   same step.
5. Pipeline parallel keeps up to ``steps_in_flight`` steps running at once (engine/core.py).
   A request is in at most one of them (its next token is not known before its step ends):
   requests in flight are skipped and never preempted, and each step takes at most
   1/``steps_in_flight`` of the requests (rounded up) so the steps in flight stay balanced.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .. import defaults as D
from ..errors import ParallaxError
from .block_manager import BlockManager
from .request import Request, RequestStatus


class CapacityError(ParallaxError):
    """A request cannot fit in the KV cache even alone."""


@dataclass
class ScheduledRequest:
    request: Request
    num_tokens: int                 # tokens computed for it this step (a chunk or 1)
    start: int                      # its num_computed_tokens before this step
    block_table: list[int]

    @property
    def samples(self) -> bool:
        """Whether this step reaches its last token (its logits give the next token)."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    """Decides each step's batch.

    Args:
        block_manager: the KV block allocator.
        max_num_seqs: running requests at most.
        max_num_batched_tokens: tokens computed per step at most.
        steps_in_flight: steps the executor runs at once (pp; rule 5).
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int = D.MAX_NUM_SEQS,
                 max_num_batched_tokens: int = D.MAX_NUM_BATCHED_TOKENS, steps_in_flight: int = 1):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ParallaxError(f"max_num_seqs and max_num_batched_tokens must be >= 1, got "
                                f"{max_num_seqs} and {max_num_batched_tokens}")
        self.bm = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.in_flight: set[int] = set()          # ids of requests in a step not yet done
        self.steps_in_flight = steps_in_flight
        self.num_preemptions = 0

    # ------------------------------------------------------------------ requests
    def check_fits(self, num_prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise CapacityError if a request of this size could not run even alone."""
        need = self.bm.blocks_needed(num_prompt_tokens + max_new_tokens)
        if need > self.bm.num_blocks:
            cap = self.bm.num_blocks * self.bm.block_size
            raise CapacityError(
                f"a request of {num_prompt_tokens} prompt tokens + max_new_tokens="
                f"{max_new_tokens} needs {need} KV blocks of {self.bm.block_size} tokens "
                f"({need * self.bm.block_size} tokens) but the cache holds {self.bm.num_blocks} "
                f"blocks ({cap} tokens); shorten the request or raise kv_cache_tokens")

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def finish(self, req: Request) -> None:
        """Remove a finished or cancelled request and free its blocks."""
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status == RequestStatus.WAITING:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        self.in_flight.discard(req.request_id)
        self.bm.free_request(req.request_id)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ the step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        seqs = -(-(len(self.running) + len(self.waiting)) // self.steps_in_flight)
        scheduled: dict[int, ScheduledRequest] = {}
        i = 0
        while i < len(self.running) and budget > 0 and len(scheduled) < seqs:
            req = self.running[i]
            if req.request_id in self.in_flight:
                i += 1
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.bm.allocate(req, n):
                victim = self._victim()
                if victim is None:                  # all others are in flight: wait for them
                    break
                budget += self._preempt(victim, scheduled, out)
                if victim is req:
                    break
            else:
                scheduled[req.request_id] = ScheduledRequest(
                    req, n, req.num_computed_tokens, self.bm.block_table(req.request_id))
                budget -= n
                i += 1
                continue
            break                                   # req was preempted (it was last) or waits
        if not out.preempted:
            while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
                   and len(scheduled) < seqs):
                req = self.waiting[0]
                hits = self.bm.get_computed_blocks(req) if req.num_computed_tokens == 0 else []
                cached = len(hits) * self.bm.block_size
                n = min(req.num_tokens - cached, budget)
                saved = req.num_computed_tokens
                req.num_computed_tokens = cached
                if not self.bm.allocate(req, n, hits):
                    req.num_computed_tokens = saved
                    break
                self.bm.record_prefix_lookup(req.num_tokens, cached)
                if req.num_cached_tokens == 0:
                    req.num_cached_tokens = cached
                self.waiting.popleft()
                req.status = RequestStatus.RUNNING
                if req.scheduled_time is None:         # the first time: its queue time ends
                    req.scheduled_time = time.perf_counter()
                self.running.append(req)
                scheduled[req.request_id] = ScheduledRequest(
                    req, n, cached, self.bm.block_table(req.request_id))
                budget -= n
        out.scheduled = list(scheduled.values())
        self.in_flight.update(scheduled)
        return out

    def _victim(self) -> Request | None:
        """The most recently admitted running request not in a step in flight."""
        for req in reversed(self.running):
            if req.request_id not in self.in_flight:
                return req
        return None

    def _preempt(self, victim: Request, scheduled: dict, out: SchedulerOutput) -> int:
        """Free victim's blocks; it goes back to the front of the queue, to be recomputed.
        Returns the budget it had taken this step (0 if it was not scheduled yet)."""
        self.running.remove(victim)
        refund = 0
        if victim.request_id in scheduled:          # it was scheduled earlier this step
            refund = scheduled.pop(victim.request_id).num_tokens
        self.bm.free_request(victim.request_id)
        victim.num_computed_tokens = 0
        victim.status = RequestStatus.WAITING
        self.waiting.appendleft(victim)
        self.num_preemptions += 1
        out.preempted.append(victim)
        return refund

    def update(self, out: SchedulerOutput) -> None:
        """After the step ran: the scheduled tokens are in the cache."""
        for s in out.scheduled:
            s.request.num_computed_tokens = s.start + s.num_tokens
            self.in_flight.discard(s.request.request_id)

"""EngineCore: the step loop. One step = schedule -> run the model on every rank -> sample
(on the driver rank) -> update requests -> emit deltas.

The core lives in the process that owns the ``LLM``. It reaches the ranks through an
executor: ``LocalExecutor`` (one process) or ``PoolExecutor`` over the ranks (spawned
workers, Ray actors, or torchrun's ranks through ``spmd.SpmdExecutor``: the driver rank
broadcasts each plan, the other ranks run them in a ``spmd.Follower``). Each step is one
``"execute"`` command on every rank; under pp up to pp of them are in flight. Steps run in
a background thread (``start``) fed by ``submit`` from any thread, in every case.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from typing import Any, Callable

from ..errors import WorkerError
from .block_manager import BlockManager
from .handle import EngineDeadError, RequestHandle
from .request import Request, StopConditions
from .runner import ModelRunner, NewRequest, StepPlan
from .scheduler import Scheduler, SchedulerOutput

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- executors
def in_own_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a fresh, short-lived thread; its result, or its exception raised here.

    Why: libgomp gives every thread that starts OpenMP parallel regions its own team of
    worker threads, and once a process has more team threads than cores it stops spinning
    between regions, so each of a decode step's ~150 regions (the C kernels, torch ops)
    waits for a wake-up. Model work done outside the engine thread (loading, side calls)
    therefore runs in a thread that ends, taking its team with it, and the engine
    thread's team stays the only one (benchmarks/bench_step.py measures the difference).
    """
    box: list = []

    def run() -> None:
        try:
            box.append((True, fn(*args)))
        except BaseException as exc:   # noqa: BLE001  re-raised in the caller
            box.append((False, exc))
    t = threading.Thread(target=run, name="parallax-side-call")
    t.start()
    t.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value


class LocalExecutor:
    """The runner in this process (one rank); side calls run in a short-lived thread
    (``in_own_thread``), steps in the engine thread.

    The executor interface the core uses: ``depth`` (steps that may be in flight),
    ``accepting()`` (whether a new step may start now), ``submit(plan)`` -> a ticket,
    ``collect(ticket)`` -> the sampled tokens (tickets collected oldest first), and
    ``call(method, *args)`` for side calls on every rank. Here a step runs inside
    ``submit``: depth 1.
    """

    depth = 1

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self._lock = threading.Lock()        # steps and side calls never overlap

    def accepting(self) -> bool:
        return True

    def submit(self, plan: StepPlan) -> list[int]:
        with self._lock:
            return self.runner.execute(plan)

    def collect(self, ticket: list[int]) -> list[int]:
        return ticket

    def call(self, method: str, *args: Any) -> Any:
        with self._lock:
            return in_own_thread(getattr(self.runner, method), *args)


class PoolExecutor:
    """Ranks reached through a pool (WorkerPool, RayExecutor, or torchrun's SpmdRanks): each
    step and side call goes to every rank. ``pool.submit`` sends a step without waiting and
    ``pool.collect`` takes the oldest one's tokens, so up to ``depth`` steps are in flight
    (pp: stage k runs step i while stage k+1 runs step i-1); a side call (``pool.call``)
    waits until none is, and no new step starts while one waits."""

    def __init__(self, pool, depth: int = 1):
        self.pool = pool
        self.depth = depth
        self._cv = threading.Condition()
        self._in_flight = 0
        self._side_waiting = 0
        self._side_running = False

    def accepting(self) -> bool:
        return self._side_waiting == 0

    def submit(self, plan: StepPlan) -> None:
        with self._cv:
            while self._side_running:
                self._cv.wait()
            self._in_flight += 1
        try:
            self.pool.submit("execute", plan)
        except BaseException:
            self._done()
            raise

    def collect(self, ticket: None) -> list[int]:
        try:
            return self.pool.collect()
        finally:
            self._done()

    def _done(self) -> None:
        with self._cv:
            self._in_flight -= 1
            self._cv.notify_all()

    def call(self, method: str, *args: Any) -> Any:
        with self._cv:
            self._side_waiting += 1
            while self._in_flight or self._side_running:
                self._cv.wait()
            self._side_waiting -= 1
            self._side_running = True
        try:
            return self.pool.call(method, *args)
        finally:
            with self._cv:
                self._side_running = False
                self._cv.notify_all()


def split_by_tokens(sizes: list[int], parts: int) -> list[int]:
    """Cut a list of sequence token counts into at most ``parts`` contiguous groups of
    about equal tokens; returns the number of sequences per group ([] for one group)."""
    parts = min(parts, len(sizes))
    if parts <= 1:
        return []
    bound, groups, count, acc = sum(sizes) / parts, [], 0, 0
    for n in sizes:
        # Cut before a sequence whose middle lies past the current group's share.
        if count and len(groups) < parts - 1 and acc + n / 2 > bound * (len(groups) + 1):
            groups.append(count)
            count = 0
        count, acc = count + 1, acc + n
    groups.append(count)
    return [g for g in groups if g]


# ---------------------------------------------------------------------------- the core
class EngineCore:
    """Requests in, deltas out, one model step at a time.

    Args:
        executor: how steps reach the ranks (see above).
        block_manager, scheduler: the KV bookkeeping and the batch policy.
        make_decoder: returns a fresh incremental detokenizer per request, or None.
        micro_batches: split each step's sequences into this many micro-batches (by tokens)
            so pipeline stages work at the same time (1 without pp).

    Under pp the executor takes up to ``depth`` steps before the first one's tokens are
    back; each is scheduled over requests not in any step in flight (the scheduler's
    ``in_flight``), so the stages work on different steps at once.
    """

    def __init__(self, executor, block_manager: BlockManager, scheduler: Scheduler,
                 make_decoder: Callable[[], Any] | None = None, micro_batches: int = 1):
        self.executor, self.bm, self.scheduler = executor, block_manager, scheduler
        self.make_decoder = make_decoder
        self.micro_batches = micro_batches
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self._inbox: list[tuple[Request, RequestHandle]] = []
        self._cancels: set[int] = set()
        self._live: dict[int, tuple[Request, RequestHandle]] = {}
        self._new: list[NewRequest] = []          # for the runner's sampler, next plan
        self._finished: list[int] = []
        self._in_flight: collections.deque = collections.deque()   # (SchedulerOutput, ticket)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None
        self.prompt_tokens = self.generation_tokens = 0

    # ------------------------------------------------------------------ any thread
    def submit(self, prompt_ids: list[int], sampling, stops: StopConditions) -> RequestHandle:
        """Queue a request (checked to fit the cache alone); returns at once."""
        self._check_alive()
        self.scheduler.check_fits(len(prompt_ids), stops.max_new_tokens)
        rid = next(self._ids)
        decoder = self.make_decoder() if self.make_decoder is not None else None
        req = Request(rid, prompt_ids, sampling, stops, decoder)
        handle = RequestHandle(rid, self.cancel)
        with self._cv:
            self._check_alive()
            self._inbox.append((req, handle))
            self._cv.notify()
        return handle

    def cancel(self, request_id: int) -> None:
        with self._cv:
            self._cancels.add(request_id)
            self._cv.notify()

    def stats(self) -> dict:
        """The serving counters (DESIGN.md "Serving"), a consistent snapshot."""
        with self._cv:
            waiting = len(self._inbox)
        return {"num_requests_running": len(self.scheduler.running),
                "num_requests_waiting": len(self.scheduler.waiting) + waiting,
                "kv_cache_usage": self.bm.usage(),
                "kv_cache_tokens": self.bm.num_blocks * self.bm.block_size,
                "num_preemptions": self.scheduler.num_preemptions,
                "prefix_cache_queries": self.bm.prefix_cache_queries,
                "prefix_cache_hits": self.bm.prefix_cache_hits,
                "prompt_tokens": self.prompt_tokens,
                "generation_tokens": self.generation_tokens}

    def start(self) -> None:
        """Run steps in a background thread whenever there is work."""
        self._thread = threading.Thread(target=self._loop, name="parallax-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the loop; unfinished requests fail with EngineDeadError."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
        self._fail_all(EngineDeadError("the LLM was closed"))

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._stopping or self._inbox or self._cancels
                               or self.scheduler.has_work or self._in_flight):
                        self._cv.wait()
                    if self._stopping:
                        return
                self.step()
        except BaseException as exc:   # noqa: BLE001  every waiting caller gets it
            logger.error("engine step failed: %s", exc)
            self.error = exc
            self._fail_all(exc)

    def step(self) -> bool:
        """One engine step: start a new model step if one may start and has work, else
        (or when the executor's pipeline is full) finish the oldest one in flight. False
        when there was nothing to do."""
        with self._cv:
            inbox, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, set()
        for req, handle in inbox:
            self._live[req.request_id] = (req, handle)
            self.scheduler.add(req)
            self.prompt_tokens += req.num_prompt_tokens
            self._new.append(NewRequest(req.request_id, req.sampling,
                                        req.prompt_ids if req.sampling.repetition_penalty != 1.0
                                        else []))
        for rid in cancels:
            if rid in self._live:
                req, handle = self._live[rid]
                self._end(req, handle, req.abort())
        ex = self.executor
        # A side call waiting (not accepting) first lets the steps in flight finish; with
        # none left, submit blocks until the side call is done.
        if len(self._in_flight) < ex.depth and (ex.accepting() or not self._in_flight):
            out = self.scheduler.schedule()
            # An empty plan still goes out when idle: the sampler forgets cancelled requests.
            if out.scheduled or (not self._in_flight and (self._new or self._finished)):
                self._in_flight.append((out, ex.submit(self._plan(out))))
                if out.scheduled and len(self._in_flight) < ex.depth:
                    return True             # room for another step over other requests
        if not self._in_flight:
            return False
        out, ticket = self._in_flight.popleft()
        tokens = ex.collect(ticket)
        self.scheduler.update(out)
        sampled = [s for s in out.scheduled if s.samples]
        logprobs = getattr(tokens, "logprobs", None) or [None] * len(tokens)
        for s, tok, lp in zip(sampled, tokens, logprobs):
            req = s.request
            if req.request_id not in self._live:    # cancelled while its step was in flight
                continue
            _, handle = self._live[req.request_id]
            delta = req.append_token(tok, logprobs=lp)
            self.generation_tokens += 1
            if delta.finish_reason is not None:
                self._end(req, handle, delta)
            else:
                handle._push(delta)
        return bool(out.scheduled)

    def _plan(self, out: SchedulerOutput) -> StepPlan:
        token_ids, seqs, rows, ids = [], [], [], []
        for s in out.scheduled:
            req = s.request
            token_ids += req.all_token_ids[s.start:s.start + s.num_tokens]
            seqs.append((s.start, s.num_tokens, s.block_table))
            if s.samples:
                rows.append(len(token_ids) - 1)
                ids.append(req.request_id)
        plan = StepPlan(token_ids, seqs, rows, ids, self._new, self._finished,
                        split_by_tokens([n for _, n, _ in seqs], self.micro_batches))
        self._new, self._finished = [], []
        return plan

    def _end(self, req: Request, handle: RequestHandle, last) -> None:
        self.scheduler.finish(req)
        self._finished.append(req.request_id)
        del self._live[req.request_id]
        handle._push(last, req.completion())

    def _fail_all(self, exc: BaseException) -> None:
        with self._cv:
            inbox, self._inbox = self._inbox, []
            self._stopping = True
        for _, handle in list(self._live.values()) + inbox:
            handle._fail(exc)
        self._live.clear()

    def _check_alive(self) -> None:
        if self.error is not None:
            kind = WorkerError if isinstance(self.error, WorkerError) else EngineDeadError
            raise kind(f"the engine is closed because a step failed: {self.error}") \
                from self.error
        if self._stopping:
            raise EngineDeadError("this LLM is closed; build a new one")

"""torchrun: the driver rank schedules, every other rank follows its messages.

Every rank builds the ``LLM`` (SPMD). The driver rank (tp rank 0 of the last stage) runs
the engine; ``SpmdRanks`` is its handle on all the ranks, with the worker pool's surface
(``submit`` / ``collect`` / ``call``), so the same ``PoolExecutor`` (engine/core.py) keeps up
to pp steps in flight under torchrun as with the pool. The other ranks run the driver's
messages in a ``Follower``.

Messages, broadcast by the driver on a gloo group of their own (``context.control_group``):
``("submit", method, args)`` (a step: run it, nothing comes back), ``("call", method,
args)`` (a side call: run it, then the driver's result is broadcast on the object group),
``("result", ok, value)`` (what an SPMD call returns or raises on every rank), ``("ping",)``
(sent whenever the driver has been quiet for ``timeout_s / 4``, so no follower's receive
times out), None (stop).

Why a group of its own: a follower receives the next message in one thread while it runs
the current step (stage 0 starts step i+1 while the last stage computes step i) or side
call (whose own collectives use the object group) in another. Two threads issuing
collectives on one group would pair them differently on different ranks.

Why the driver runs a step only in ``collect``: it is the last stage, so it can start a
step only once the stages before it have computed it anyway; running it in the engine
thread keeps that thread's OpenMP team the only one (``core.in_own_thread``).
"""

from __future__ import annotations

import collections
import logging
import pickle
import queue
import threading
import time
from typing import Any

from ..parallel import collectives as C
from .core import PoolExecutor, in_own_thread
from .handle import EngineDeadError
from .runner import ModelRunner

logger = logging.getLogger(__name__)


class SpmdRanks:
    """The driver rank's handle on every rank of a torchrun job (the pool surface).

    Args:
        runner: the driver rank's ModelRunner.
        group: the control group (``context.control_group``), on every rank alike.
    """

    def __init__(self, runner: ModelRunner, group):
        self.runner, self.group = runner, group
        self.ping_s = max(1.0, runner.ctx.timeout_s / 4)
        self._lock = threading.Lock()            # one message at a time, one order
        self._uncollected: collections.deque = collections.deque()   # (method, args)
        self._last_sent = time.monotonic()
        self._failed = False
        self._running = threading.Lock()         # held while this rank runs a step
        self._stopped = threading.Event()
        self._pinger = threading.Thread(target=self._ping_loop, name="parallax-ping",
                                        daemon=True)
        self._pinger.start()

    def _send(self, msg: Any) -> None:
        ctx = self.runner.ctx
        with self._lock:
            C.broadcast_object(msg, ctx, ctx.driver_rank, group=self.group)
            self._last_sent = time.monotonic()

    def submit(self, method: str, *args: Any) -> None:
        """Start ``runner.method(*args)`` on every other rank now; here in ``collect``."""
        self._send(("submit", method, args))
        self._uncollected.append((method, args))

    def collect(self) -> Any:
        """Run the oldest submitted command on this rank; its result."""
        method, args = self._uncollected.popleft()
        with self._running:
            try:
                return getattr(self.runner, method)(*args)
            except BaseException:
                self._failed = True
                raise

    def call(self, method: str, *args: Any) -> Any:
        """``runner.method(*args)`` on every rank (none submitted may be uncollected); the
        driver's result, which every other rank receives too."""
        if self._uncollected:
            raise RuntimeError(f"SpmdRanks: {method}() while submitted steps are uncollected")
        ctx = self.runner.ctx
        self._send(("call", method, args))
        out = in_own_thread(getattr(self.runner, method), *args)
        return C.broadcast_object(out, ctx, ctx.driver_rank)

    def publish(self, ok: bool, value: Any) -> None:
        """Hand every follower the result (ok) or the error of an SPMD call."""
        if not ok:
            try:
                pickle.dumps(value)
            except Exception:
                value = EngineDeadError(f"{type(value).__name__}: {value}")
        self._send(("result", ok, value))

    def stop(self) -> None:
        """Run the steps still submitted (the other ranks run them too), then release the
        followers. Idempotent."""
        if self._stopped.is_set():
            return
        # Not while the engine thread still runs one (it outlived close()'s wait).
        if self._running.acquire(blocking=False):
            self._running.release()
            while self._uncollected and not self._failed:
                try:
                    self.collect()
                except Exception as exc:         # noqa: BLE001  closing anyway
                    logger.warning("a step left in flight at close failed: %s", exc)
        self._stopped.set()
        self._pinger.join()
        self._send(None)

    def _ping_loop(self) -> None:
        while not self._stopped.wait(self.ping_s / 4):
            if time.monotonic() - self._last_sent < self.ping_s:
                continue
            try:
                self._send(("ping",))
            except Exception as exc:             # noqa: BLE001  the next step or call raises
                logger.error("pinging the other ranks failed: %s", exc)
                return


class SpmdExecutor(PoolExecutor):
    """torchrun, on the driver rank: ``PoolExecutor`` over ``SpmdRanks`` (up to ``depth``
    steps in flight), plus the SPMD results and the stop message."""

    def __init__(self, runner: ModelRunner, group, depth: int = 1):
        super().__init__(SpmdRanks(runner, group), depth)

    def publish(self, ok: bool, value: Any) -> None:
        self.pool.publish(ok, value)

    def stop(self) -> None:
        self.pool.stop()


class Follower:
    """torchrun, on every rank but the driver: one thread receives the driver's messages
    (``SpmdRanks``), another runs them in order, so the next step's plan is here while this
    one runs. Hands SPMD results to this rank's calls in order.
    """

    def __init__(self, runner: ModelRunner, group):
        self.runner, self.group = runner, group
        self._work: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self._ended = False
        self._receiver = threading.Thread(target=self._receive, name="parallax-follower-recv",
                                          daemon=True)
        self._thread = threading.Thread(target=self._run, name="parallax-follower", daemon=True)
        self._receiver.start()
        self._thread.start()

    def _receive(self) -> None:
        ctx = self.runner.ctx
        try:
            while not self._ended:
                msg = C.broadcast_object(None, ctx, ctx.driver_rank, group=self.group)
                if msg is None:
                    break
                if msg[0] != "ping":
                    self._work.put(msg)
            self._work.put(None)
        except BaseException as exc:   # noqa: BLE001  raised by the running thread, in turn
            self._work.put(exc)

    def _run(self) -> None:
        ctx, runner = self.runner.ctx, self.runner
        end: BaseException = EngineDeadError("the driver rank closed the LLM")
        try:
            while (msg := self._work.get()) is not None:
                if isinstance(msg, BaseException):
                    raise msg
                if msg[0] == "submit":
                    getattr(runner, msg[1])(*msg[2])
                elif msg[0] == "call":
                    out = getattr(runner, msg[1])(*msg[2])
                    self._results.put((True, C.broadcast_object(out, ctx, ctx.driver_rank)))
                elif msg[0] == "result":
                    self._results.put(msg[1:])
        except BaseException as exc:   # noqa: BLE001  handed to this rank's waiting calls
            logger.error("rank %d: following the driver failed: %s", ctx.rank, exc)
            end = exc
        self._ended = True
        self._results.put((None, end))                  # None: no more results, ever

    def result(self) -> Any:
        """The next SPMD result from the driver (blocks); its error raised here."""
        ok, value = self._results.get()
        if ok is None:
            self._results.put((ok, value))              # later calls fail the same way
        if not ok:
            raise value
        return value

    def join(self) -> None:
        """Wait until the driver stops (its LLM closed) or the link fails."""
        self._thread.join()
        self._receiver.join(timeout=self.runner.ctx.timeout_s)

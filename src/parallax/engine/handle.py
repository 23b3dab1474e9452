"""RequestHandle: what ``LLM.submit`` returns; the caller's side of one request.

The engine thread pushes ``Delta``s into the handle; the caller iterates them (plain or
``async for``), waits for the ``Completion`` with ``result()``, or ``cancel()``s.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import AsyncIterator, Callable, Iterator

from ..errors import EngineDeadError
from .request import Completion, Delta

__all__ = ["RequestHandle", "EngineDeadError"]     # EngineDeadError re-exported from errors


class RequestHandle:
    """One submitted request.

    Iterate it (``for d in handle`` or ``async for d in handle``) for ``Delta``s (``.text``,
    ``.token_ids``, ``.finish_reason`` — None until the last one); ``result()`` blocks until
    it finishes and returns the ``Completion``; ``cancel()`` ends it, freeing its KV blocks
    within one engine step (its ``finish_reason`` is then "abort"). A handle is iterated by
    one consumer; ``result()`` works whether or not it was iterated. ``async for`` holds no
    thread while it waits: the engine wakes the consumer's event loop.
    Errors of the engine (a dead worker, ...) are raised from iteration and ``result()``.

    Args:
        request_id: the engine's id of the request (unique per LLM).
        cancel: the engine's cancel function, called with request_id by ``cancel()``.
    """

    def __init__(self, request_id: int, cancel: Callable[[int], None]):
        self.request_id = request_id
        self._cancel = cancel
        self._deltas: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._completion: Completion | None = None
        self._error: BaseException | None = None
        # (loop, asyncio.Event) of each `async for` consumer: woken from the engine thread
        # with call_soon_threadsafe, so a waiting request holds no thread.
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._waiters_lock = threading.Lock()

    # ------------------------------------------------------------------ engine side
    def _push(self, delta: Delta, completion: Completion | None = None) -> None:
        if completion is not None:
            self._completion = completion
        self._deltas.put(delta)
        if completion is not None:
            self._done.set()
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if self._done.is_set():
            return
        self._error = error
        self._deltas.put(error)
        self._done.set()
        self._wake()

    def _wake(self) -> None:
        with self._waiters_lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:        # that consumer's loop is closed: nobody to wake
                pass

    # ------------------------------------------------------------------ caller side
    @property
    def finished(self) -> bool:
        """True once the request has ended (finished, cancelled or failed)."""
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop generating; the request's blocks are freed within one engine step."""
        if not self._done.is_set():
            self._cancel(self.request_id)

    def result(self, timeout: float | None = None) -> Completion:
        """Block until the request ends; its Completion. Raises the engine's error if it
        failed, TimeoutError after ``timeout`` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish in {timeout} s")
        if self._error is not None:
            raise self._error
        return self._completion   # type: ignore[return-value]

    def _next(self, item) -> Delta:
        if isinstance(item, BaseException):
            raise item
        return item

    def __iter__(self) -> Iterator[Delta]:
        while True:
            d = self._next(self._deltas.get())
            yield d
            if d.finish_reason is not None:
                return

    async def __aiter__(self) -> AsyncIterator[Delta]:
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._waiters_lock:
            self._waiters.append(waiter)
        try:
            while True:
                try:
                    item = self._deltas.get_nowait()
                except queue.Empty:
                    # Clear, then look again: a push after the clear schedules event.set
                    # behind us on this loop, so no wake-up is lost.
                    waiter[1].clear()
                    if self._deltas.empty():
                        await waiter[1].wait()
                    continue
                d = self._next(item)
                yield d
                if d.finish_reason is not None:
                    return
        finally:
            with self._waiters_lock:
                self._waiters.remove(waiter)

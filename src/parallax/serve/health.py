"""Engine liveness for /health, from ``LLM.stats()`` sampled in the background.

The engine is *dead* when stats() raises (a worker died, the LLM is closed) or does not
answer within ``timeout_s``; it is *stuck* when it holds work (running or waiting requests)
and its token counters have not moved for ``timeout_s``. Sampling runs in its own thread, so a
stats() that blocks can never stall the event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

logger = logging.getLogger(__name__)


class EngineMonitor:
    def __init__(self, stats: Callable[[], dict], timeout_s: float = 30.0):
        self.stats = stats
        self.timeout_s = timeout_s
        self.interval_s = min(1.0, timeout_s / 4)
        self.last_answer = time.monotonic()     # last time stats() returned
        self.progress_at = time.monotonic()     # last time the engine was idle or moved
        self.error: str | None = None           # set when stats() raised
        self.fatal: str | None = None           # set when a request saw the engine die
        self._tokens: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        """One stats() call (blocking); updates the liveness state."""
        try:
            s = self.stats()
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            return
        t = time.monotonic()
        self.last_answer, self.error = t, None
        tokens = int(s.get("prompt_tokens", 0)) + int(s.get("generation_tokens", 0))
        busy = s.get("num_requests_running", 0) + s.get("num_requests_waiting", 0) > 0
        if not busy or tokens != self._tokens:
            self.progress_at = t
        self._tokens = tokens

    def _loop(self) -> None:
        self.sample()
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> None:
        """Sample in a daemon thread: a stats() that never returns leaves only that thread
        behind (last_answer then ages), never the event loop or the process exit."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="parallax-health",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread = None

    def mark_dead(self, reason: str) -> None:
        """A request failed with the engine's own failure: unhealthy from now on (an engine
        that died stays dead; its stats() may keep answering with the last numbers)."""
        if self.fatal is None:
            logger.error("engine failed: %s", reason)
        self.fatal = reason

    def problem(self) -> str | None:
        """None when healthy, else why not."""
        now = time.monotonic()
        if self.fatal is not None:
            return f"engine is dead: {self.fatal}"
        if self.error is not None:
            return f"engine is dead: {self.error}"
        if now - self.last_answer > self.timeout_s:
            return f"engine has not answered stats() for {now - self.last_answer:.0f} s"
        if now - self.progress_at > self.timeout_s:
            return (f"engine holds requests but has made no progress for "
                    f"{now - self.progress_at:.0f} s")
        return None

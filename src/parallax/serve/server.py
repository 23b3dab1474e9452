"""Run the app under uvicorn: ``parallax serve`` (``main``), or in a background thread
(``BackgroundServer``, for tests and benchmarks).

SIGTERM / SIGINT drain: the listening socket closes at once, new requests on open
connections get 503, running requests finish until ``drain_timeout_s`` (then they are
cancelled), the engine is closed, and the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading

import uvicorn

from ..errors import ParallaxError

logger = logging.getLogger("parallax.serve")


class _Server(uvicorn.Server):
    """uvicorn.Server that marks the app as draining on SIGTERM and reports its address."""

    def __init__(self, config: uvicorn.Config, on_started=None):
        super().__init__(config)
        self.on_started = on_started
        self.url: str | None = None

    def handle_exit(self, sig, frame) -> None:
        state = getattr(self.config.app.state, "serve", None)
        if state is not None:
            state.draining = True
        super().handle_exit(sig, frame)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.url = f"http://{host}:{port}"
        if self.on_started is not None:
            self.on_started(self.url)


def _config(app, host: str, port: int, drain_timeout_s: float) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                          timeout_graceful_shutdown=drain_timeout_s, access_log=False)


def run(app, host: str = "127.0.0.1", port: int = 8000, drain_timeout_s: float = 30.0,
        on_started=None) -> None:
    """Serve ``app`` until SIGTERM/SIGINT, then drain. Call from the main thread."""
    server = _Server(_config(app, host, port, drain_timeout_s), on_started)
    # uvicorn re-raises a captured signal after its shutdown so that the default action
    # (death by SIGTERM) follows; with our own handlers installed, that re-raise lands here
    # instead and the drained process can exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    asyncio.run(server.serve())


class BackgroundServer:
    """Serve ``app`` from a daemon thread on ``host`` (loopback) and a free port.

        with BackgroundServer(build_app(llm, "m")) as srv:
            httpx.get(srv.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0,
                 drain_timeout_s: float = 10.0, start_timeout_s: float = 30.0):
        self.server = _Server(_config(app, host, port, drain_timeout_s))
        self.thread = threading.Thread(target=self.server.run, name="parallax-http",
                                       daemon=True)
        self.thread.start()
        for _ in range(int(start_timeout_s / 0.01)):
            if self.server.started or not self.thread.is_alive():
                break
            threading.Event().wait(0.01)
        if not self.server.started:
            raise ParallaxError(f"the HTTP server did not start on {host}:{port}")
        self.url = self.server.url

    def stop(self, timeout: float = 30.0) -> None:
        """Drain as SIGTERM would, and wait for the thread."""
        self.server.handle_exit(signal.SIGTERM, None)
        self.thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------- parallax serve
def cli_options(a: argparse.Namespace) -> tuple[str | None, dict]:
    """``parallax serve``'s arguments as (API key, ``LLM`` keywords besides the model);
    warns when serving beyond this machine without a key. Also used by ray_serve.main."""
    api_key = a.api_key or os.environ.get("PARALLAX_API_KEY") or None
    if a.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        logger.warning("serving on %s without --api-key: anyone who can reach it can use it",
                       a.host)
    engine_kw = {k: v for k, v in (("max_num_seqs", a.max_num_seqs),
                                   ("kv_cache_tokens", a.kv_cache_tokens)) if v is not None}
    return api_key, dict(tp=a.tp, pp=a.pp, ep=a.ep, dtype=a.dtype, device=a.device,
                         layer_split=a.layer_split,
                         **engine_kw)


def main(a: argparse.Namespace) -> int:
    """``parallax serve``: build the LLM, serve it, drain on SIGTERM, exit 0."""
    from ..api import LLM
    from .app import build_app
    api_key, llm_kw = cli_options(a)
    llm = LLM(a.model, **llm_kw)
    try:
        name = a.served_model_name or a.model
        app = build_app(llm, name, api_key=api_key, max_queue=a.max_queue,
                        health_timeout_s=a.health_timeout)
        kv = llm.stats().get("kv_cache_tokens")

        def started(url: str | None) -> None:
            # One line on stderr whatever the log level: scripts read the URL from it.
            print(f"parallax serve: {name} at {url} (tp={a.tp} pp={a.pp} ep={a.ep}, KV cache {kv} "
                  f"tokens, max queue {a.max_queue})", file=sys.stderr, flush=True)

        run(app, a.host, a.port, a.drain_timeout, started)
        logger.info("drained; shutting down the engine")
    finally:
        llm.close()
    return 0

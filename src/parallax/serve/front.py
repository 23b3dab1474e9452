"""The Ray Serve ingress before the engine replicas: forwards each HTTP request to a replica
through a deployment handle, retries the requests a dying replica took, and answers in
OpenAI's error body when it cannot.

Why a front at all: when a replica process dies, Ray Serve's HTTP proxy answers its
in-flight requests with a plain-text 500 that no OpenAI client can parse. Behind this front
the proxy only ever talks to the front; the front sees the replica's death as a
``RayActorError`` from the handle and decides:

* **Retried**: a request that had received nothing from the dead replica yet (every
  non-streaming request, whose response only starts when it is complete, and every stream
  before its first body chunk) is sent again, to whichever replica Serve's router picks
  (the dead one leaves the candidates), up to ``retries`` times with a short backoff.
  Generation is stateless per request, so a retry gives the answer the first try would
  have (greedy or seeded). The answer carries ``x-parallax-retries: N``. A request the
  dying replica had not accepted yet never reaches the front as an error: Serve's router
  waits for a replica to accept each request and itself routes it again when the replica
  dies first, so such an answer carries no header.
* **Error body**: a request still failing after the retries gets 503 with
  ``{"error": {...}}`` and ``Retry-After``; a stream cut after its first chunk (status 200
  is on the wire) ends with an SSE event ``data: {"error": {...}}`` and ``data: [DONE]``,
  as a stream failing inside the app does (serve/app.py). Any other failure of the
  forwarding is a 500 in the same body.

With ``prefix_chars`` set, each request's prompt prefix is its routing key (read by
serve/prefix_router.py's router); otherwise the key is empty and Serve's default router
(power of two choices on queue length) picks the replica.
"""

from __future__ import annotations

import asyncio
import json
import logging

from . import protocol as P
from .prefix_router import prefix_key

logger = logging.getLogger(__name__)

RETRY_HEADER = "x-parallax-retries"
DEFAULT_RETRIES = 3


def _error(status: int, message: str, type_: str, code: str):
    from starlette.responses import JSONResponse
    return JSONResponse(P.error_body(message, type_, code=code), status_code=status,
                        headers={"Retry-After": "1"} if status == 503 else None)


def _sse_error(message: str) -> bytes:
    body = json.dumps(P.error_body(message, "service_unavailable", code="replica_died"))
    return f"data: {body}\n\ndata: [DONE]\n\n".encode()


class Front:
    """Ingress deployment: forwards HTTP requests to ``engines`` (``ParallaxReplica``).

    Args:
        engines: the engine deployment's handle (Serve binds it).
        prefix_chars: route by the prompt's first ``prefix_chars`` characters (None: no key).
        retries: tries after the first for a request a dead replica took before answering.
    """

    def __init__(self, engines, prefix_chars: int | None = None,
                 retries: int = DEFAULT_RETRIES):
        self.engines = engines.options(stream=True)
        self.prefix_chars = prefix_chars
        self.retries = retries

    async def __call__(self, request):
        from ray.exceptions import RayActorError
        from starlette.responses import StreamingResponse

        body = await request.body()
        key = prefix_key(body, self.prefix_chars) if self.prefix_chars else ""
        headers = [(k.encode(), v.encode()) for k, v in request.headers.items()]
        path, root = request.url.path, request.scope.get("root_path", "")
        if root and path.startswith(root):        # the route prefix is the front's, not the app's
            path = path[len(root):] or "/"
        for attempt in range(self.retries + 1):
            gen = self.engines.forward.remote(key, request.method, path, request.url.query,
                                              headers, body)
            try:
                start = await gen.__anext__()     # (status, headers) first, then body chunks
                first = await anext(gen, None)
                break
            except RayActorError as e:            # the replica died before answering
                gen.cancel()
                logger.warning("%s %s: replica gone (try %d of %d): %s", request.method,
                               path, attempt + 1, self.retries + 1, e)
                if attempt < self.retries:
                    await asyncio.sleep(0.25 * 2 ** attempt)
            except Exception as e:                # noqa: BLE001  answered in OpenAI's body
                gen.cancel()
                logger.exception("forwarding %s %s failed", request.method, path)
                return _error(500, f"the engine replica failed: {e}", "internal_error",
                              "replica_error")
            except BaseException:                 # cancelled (the client left): stop the work
                gen.cancel()
                raise
        else:
            return _error(503, f"the engine replica serving this request died, and "
                          f"{self.retries} retries found no live one; retry later",
                          "service_unavailable", "replica_died")
        status, out_headers = start
        sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                  for k, v in out_headers)

        async def rest():
            try:
                if first is not None:
                    yield first
                async for chunk in gen:
                    yield chunk
            except RayActorError as e:
                logger.warning("%s %s: replica died mid-answer: %s", request.method, path, e)
                if sse:
                    yield _sse_error(f"the engine replica died mid-stream: {e}")
            finally:
                gen.cancel()          # the client left (or we are done): stop the replica's work

        keep = {k.decode(): v.decode() for k, v in out_headers
                if k.lower() not in (b"content-length", b"transfer-encoding")}
        if attempt:
            keep[RETRY_HEADER] = str(attempt)
        return StreamingResponse(rest(), status_code=status, headers=keep)


def front_app(engines, prefix_chars: int | None = None, retries: int = DEFAULT_RETRIES):
    """The bound ingress of ``build_app`` over the engine deployment ``engines``."""
    from ray import serve
    # No CPU reserved: the front only awaits I/O (like Serve's own proxies), and a
    # fraction here would leave less than a whole CPU for some replica's rank bundle.
    return serve.deployment(Front, name="parallax-front",
                            ray_actor_options={"num_cpus": 0},
                            max_ongoing_requests=1024).bind(engines, prefix_chars, retries)

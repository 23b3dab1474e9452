"""The OpenAI-compatible HTTP app on one ``parallax.LLM``: one implementation of the routes,
used by ``parallax serve`` (server.py), by the tests, and by a Ray Serve deployment.

    app = build_app(llm, "smollm2-135m", api_key="k", max_queue=64)

Each HTTP request becomes ``n x len(prompts)`` engine requests (``LLM.submit``), consumed with
``async for`` on the event loop; the engine batches them with everything else in flight. A
client that goes away cancels its engine requests (their KV blocks are freed within a step).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..errors import ParallaxError, PromptError
from . import protocol as P
from .errors import APIError, error_for, install_error_handlers
from .health import EngineMonitor
from .metrics import CONTENT_TYPE, ServerMetrics

logger = logging.getLogger(__name__)

FINISHED = ("stop", "length")       # finish reasons of a complete answer ("abort" is not)


@dataclass
class ServeState:
    llm: Any
    model_name: str
    api_key: str | None
    max_queue: int | None
    retry_after_s: int
    metrics: ServerMetrics
    monitor: EngineMonitor
    context_len: int
    draining: bool = False
    created: int = field(default_factory=P.now)

    def __post_init__(self) -> None:
        self.token_text = functools.lru_cache(maxsize=65536)(self._token_text)

    def _token_text(self, token_id: int) -> str:
        """A token's own text (logprobs name tokens by it); ``token_id:N`` without a
        tokenizer (vLLM's spelling). A byte-level piece of a longer character decodes to
        U+FFFD, as in other servers."""
        tok = self.llm.tokenizer
        if tok is None:
            return f"token_id:{token_id}"
        return tok.decode([token_id], skip_special_tokens=False)


@dataclass
class _Choice:
    """One engine request (one choice of one prompt) and what it produced so far."""
    index: int
    handle: Any
    prompt_tokens: int
    arrival: float
    response_id: str = ""
    logprobs: list | None = None          # TokenLogprobs per token, when asked
    text: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None
    first: float | None = None
    last: float | None = None
    gaps: list[tuple[float, int]] = field(default_factory=list)

    def add(self, delta) -> None:
        t = time.monotonic()
        k = len(delta.token_ids or ())
        if k:
            if self.first is None:
                self.first = t
            else:
                self.gaps.append((t - self.last, k))
            self.last = t
        self.completion_tokens += k
        if self.logprobs is not None and delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        self.text.append(delta.text or "")
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason


# ---------------------------------------------------------------------- building blocks
def _check_auth(state: ServeState, request: Request) -> None:
    if state.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # Constant-time comparison: the time taken must not reveal how much of a guess matched.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                             state.api_key.encode()):
        raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                       "authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def _check_model(state: ServeState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise APIError(404, f"The model {model!r} does not exist; this server serves "
                       f"{state.model_name!r}", param="model", code="model_not_found")


def _admit(state: ServeState) -> None:
    """Refuse new work while draining (503) or while the waiting queue is full (429)."""
    retry = {"Retry-After": str(state.retry_after_s)}
    if state.draining:
        state.metrics.observe_rejected(503)
        raise APIError(503, "the server is shutting down", "service_unavailable",
                       code="shutting_down", headers=retry)
    if state.max_queue is None:
        return
    waiting = state.llm.stats()["num_requests_waiting"]
    if waiting >= state.max_queue:
        state.metrics.observe_rejected(429)
        raise APIError(429, f"the server is overloaded: {waiting} requests are waiting "
                       f"(--max-queue {state.max_queue}); retry later", "rate_limit_error",
                       code="queue_full", headers=retry)


def _encode_text(state: ServeState, text: str, special: bool = True) -> list[int]:
    tok = state.llm.tokenizer
    if tok is None:
        raise PromptError("this model has no tokenizer; send the prompt as token ids")
    ids = tok.encode(text, add_special_tokens=special)
    if not ids:
        raise PromptError("the prompt is empty after tokenization; give at least one token")
    return ids


def _chat_ids(state: ServeState, messages: list[P.ChatMessage]) -> list[int]:
    tok = state.llm.tokenizer
    if tok is None or not tok.has_chat_template:
        raise PromptError("this model has no chat template; use /v1/completions")
    try:
        text = tok.apply_chat_template([m.as_template_dict() for m in messages])
    except ParallaxError:
        raise
    except Exception as e:       # the template's own raise_exception / jinja errors
        raise APIError(400, f"the chat template refused these messages: {e}",
                       param="messages") from None
    return _encode_text(state, text, special=False)


def _max_new_tokens(state: ServeState, ids: list[int], asked: int | None) -> int:
    if asked is not None:
        return asked            # the engine checks prompt + asked against the context
    room = state.context_len - len(ids)
    if room < 1:
        raise PromptError(f"the prompt has {len(ids)} tokens, which fills the model's context "
                          f"of {state.context_len} tokens; shorten it")
    return room


def _submit(state: ServeState, prompts: list[list[int]], max_tokens: int | None,
            req: P._SamplingRequest, response_id: str) -> list[_Choice]:
    """Submit n requests per prompt (choice index = prompt * n + i; choice i samples with
    seed + i); all or none: a refused one cancels those already submitted."""
    kw = req.sampling_kwargs()
    arrival = time.monotonic()
    choices: list[_Choice] = []
    try:
        for j, ids in enumerate(prompts):
            budget = _max_new_tokens(state, ids, max_tokens)
            for i in range(req.n):
                seed = None if req.seed is None else req.seed + i
                h = state.llm.submit(ids, max_new_tokens=budget, seed=seed, chat=False, **kw)
                choices.append(_Choice(j * req.n + i, h, len(ids), arrival, response_id,
                                       [] if req.num_logprobs is not None else None))
    except BaseException:
        for c in choices:
            c.handle.cancel()
        raise
    return choices


def _finish(state: ServeState, choices: list[_Choice], failure: str | None) -> None:
    """Record metrics once per choice; cancel what did not finish.

    A choice counts as a success (``request_success_total``) exactly when the server took
    its final delta (finish reason stop / length) from the engine before it learnt that the
    client had gone; otherwise it is ``request_failed_total{reason="aborted"}`` (or
    "error"). A client that hangs up just as its last token is on the wire may therefore
    miss an answer the server counted as complete; the per-choice DEBUG record below
    ("<response id> choice <i>: success|aborted|error ...") names which way each went.
    """
    now = time.monotonic()
    for c in choices:
        if c.finish_reason in FINISHED:
            state.metrics.observe_finished(c.finish_reason, c.arrival, c.first, c.last or now,
                                           c.gaps, _queue_time(c.handle))
            outcome = "success"
        else:           # cut short: the client left (the engine says "abort") or an error
            c.handle.cancel()
            outcome = failure or "aborted"
            state.metrics.observe_failed(outcome)
        logger.debug("%s choice %d: %s finish_reason=%s completion_tokens=%d", c.response_id,
                     c.index, outcome, c.finish_reason, c.completion_tokens)


def _queue_time(handle) -> float | None:
    """Seconds the engine kept the request waiting, when its Completion reports it."""
    try:
        return getattr(handle.result(timeout=0), "queue_time_s", None)
    except Exception:
        return None


async def _pump(choices: list[_Choice]) -> AsyncIterator[tuple[_Choice, Any]]:
    """Yield (choice, delta) from all engine requests as the deltas arrive."""
    if len(choices) == 1:
        c = choices[0]
        async for d in c.handle:
            c.add(d)
            yield c, d
        return
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def drain(c: _Choice) -> None:
        try:
            async for d in c.handle:
                await q.put((c, d))
            await q.put((c, done))
        except BaseException as e:
            await q.put((c, e))

    tasks = [asyncio.ensure_future(drain(c)) for c in choices]
    try:
        left = len(choices)
        while left:
            c, d = await q.get()
            if d is done:
                left -= 1
            elif isinstance(d, BaseException):
                raise d
            else:
                c.add(d)
                yield c, d
    finally:
        for t in tasks:
            t.cancel()


async def _watch_disconnect(request: Request, choices: list[_Choice]) -> None:
    """Cancel the engine requests when the client closes the connection (non-streaming)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for c in choices:
                c.handle.cancel()
            return


async def _collect(request: Request, state: ServeState, choices: list[_Choice]) -> None:
    watcher = asyncio.ensure_future(_watch_disconnect(request, choices))
    failure = "aborted"
    try:
        async for _ in _pump(choices):
            pass
        failure = None
    except Exception:
        failure = "error"
        raise
    finally:
        watcher.cancel()
        _finish(state, choices, failure)


def _usage(choices: list[_Choice], n: int) -> P.Usage:
    # A prompt's tokens count once, however many choices it has (OpenAI's accounting).
    prompt = sum(c.prompt_tokens for c in choices if c.index % n == 0)
    return P.Usage.of(prompt, sum(c.completion_tokens for c in choices))


def _sse(obj: P.BaseModel | dict) -> str:
    body = obj.model_dump_json() if isinstance(obj, P.BaseModel) else json.dumps(obj)
    return f"data: {body}\n\n"


async def _stream(state: ServeState, choices: list[_Choice], fmt,
                  usage_n: int | None) -> AsyncIterator[str]:
    """SSE body: ``fmt``'s chunks, a usage chunk when ``usage_n`` (the request's n) is
    given, then [DONE]. Cancellation (the client left) lands in ``finally`` and cancels."""
    failure = "aborted"
    try:
        for c in choices:
            opening = fmt.opening(c)
            if opening is not None:
                yield _sse(opening)
        async for c, d in _pump(choices):
            yield _sse(fmt.chunk(c, d))
        if usage_n is not None:
            yield _sse(fmt.usage(_usage(choices, usage_n)))
        failure = None
        yield "data: [DONE]\n\n"
    except Exception as e:
        failure = "error"
        logger.exception("stream failed")
        status, info = error_for(e, state.monitor)
        yield _sse(P.error_body(info.message, info.type, info.param, status))
        yield "data: [DONE]\n\n"
    finally:
        _finish(state, choices, failure)


async def _respond(state: ServeState, request: Request, body: P._SamplingRequest,
                   prompts: list[list[int]], max_tokens: int | None, fmt):
    choices = _submit(state, prompts, max_tokens, body, fmt.head["id"])
    if body.stream:
        return _sse_response(_stream(state, choices, fmt,
                                     body.n if body.include_usage else None))
    await _collect(request, state, choices)
    return fmt.full(choices, _usage(choices, body.n))


class _CompletionFormat:
    """/v1/completions bodies for one request."""

    def __init__(self, model: str, token_text):
        self.head = dict(id=P.new_id("cmpl"), created=P.now(), model=model)
        self.token_text = token_text
        self.offsets: dict[int, int] = {}       # choice index -> text offset of its next token

    def opening(self, c: _Choice) -> None:
        return None

    def logprobs(self, c: _Choice, lps) -> P.CompletionLogprobs | None:
        """OpenAI's legacy logprobs of ``lps`` (TokenLogprobs), continuing the choice's
        text offsets; the chosen token is among top_logprobs (so up to k + 1 entries)."""
        if c.logprobs is None:
            return None
        out = P.CompletionLogprobs()
        offset = self.offsets.get(c.index, 0)
        for x in lps or ():
            text = self.token_text(x.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(x.logprob)
            top = {self.token_text(t): v for t, v in x.top}
            top.setdefault(text, x.logprob)
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(text)
        self.offsets[c.index] = offset
        return out

    def chunk(self, c: _Choice, d) -> P.CompletionResponse:
        return P.CompletionResponse(**self.head, choices=[P.CompletionChoice(
            index=c.index, text=d.text or "", logprobs=self.logprobs(c, d.logprobs),
            finish_reason=d.finish_reason)])

    def usage(self, u: P.Usage) -> P.CompletionResponse:
        return P.CompletionResponse(**self.head, choices=[], usage=u)

    def full(self, choices: list[_Choice], u: P.Usage) -> P.CompletionResponse:
        return P.CompletionResponse(**self.head, usage=u, choices=[P.CompletionChoice(
            index=c.index, text="".join(c.text), logprobs=self.logprobs(c, c.logprobs),
            finish_reason=c.finish_reason) for c in choices])


class _ChatFormat:
    """/v1/chat/completions bodies for one request (a stream opens with the role)."""

    def __init__(self, model: str, token_text):
        self.head = dict(id=P.new_id("chatcmpl"), created=P.now(), model=model)
        self.token_text = token_text

    def _top(self, token_id: int, logprob: float) -> dict:
        text = self.token_text(token_id)
        return dict(token=text, logprob=logprob, bytes=list(text.encode()))

    def logprobs(self, c: _Choice, lps) -> P.ChatLogprobs | None:
        """OpenAI's chat logprobs of ``lps`` (TokenLogprobs): one content entry per token."""
        if c.logprobs is None:
            return None
        return P.ChatLogprobs(content=[P.ChatTokenLogprob(
            **self._top(x.token_id, x.logprob),
            top_logprobs=[P.TopLogprob(**self._top(t, v)) for t, v in x.top])
            for x in lps or ()])

    def opening(self, c: _Choice) -> P.ChatCompletionChunk:
        return P.ChatCompletionChunk(**self.head, choices=[P.ChatChunkChoice(
            index=c.index, delta=P.ChatDelta(role="assistant", content=""))])

    def chunk(self, c: _Choice, d) -> P.ChatCompletionChunk:
        return P.ChatCompletionChunk(**self.head, choices=[P.ChatChunkChoice(
            index=c.index, delta=P.ChatDelta(content=d.text or ""),
            logprobs=self.logprobs(c, d.logprobs), finish_reason=d.finish_reason)])

    def usage(self, u: P.Usage) -> P.ChatCompletionChunk:
        return P.ChatCompletionChunk(**self.head, choices=[], usage=u)

    def full(self, choices: list[_Choice], u: P.Usage) -> P.ChatCompletionResponse:
        return P.ChatCompletionResponse(**self.head, usage=u, choices=[P.ChatChoice(
            index=c.index, message=P.AssistantMessage(content="".join(c.text)),
            logprobs=self.logprobs(c, c.logprobs), finish_reason=c.finish_reason)
            for c in choices])


# ---------------------------------------------------------------------- the app
def build_app(llm, model_name: str, *, api_key: str | None = None, max_queue: int | None = None,
              health_timeout_s: float = 30.0, retry_after_s: int = 1) -> FastAPI:
    """The HTTP app on ``llm`` (which the caller owns and closes).

    Args:
        llm: a ``parallax.LLM`` (anything with submit / stats / tokenizer / config).
        model_name: the id clients send as ``model``; others get 404.
        api_key: when set, /v1 routes need ``Authorization: Bearer <api_key>``.
        max_queue: refuse new requests (429 + Retry-After) while this many wait.
        health_timeout_s: /health is 503 when the engine has not answered or has made no
            progress with work in hand for this long.
        retry_after_s: the Retry-After of 429 and 503 answers.
    """
    if max_queue is not None and max_queue < 0:
        raise ParallaxError(f"max_queue must be >= 0 or None, got {max_queue}")
    state = ServeState(llm, model_name, api_key, max_queue, retry_after_s,
                       ServerMetrics(llm.stats, model_name),
                       EngineMonitor(llm.stats, timeout_s=health_timeout_s),
                       context_len=llm.config.max_position_embeddings)

    async def lifespan(app: FastAPI):
        state.monitor.start()
        try:
            yield
        finally:
            state.monitor.stop()

    app = FastAPI(title="parallax", lifespan=lifespan)
    app.state.serve = state
    install_error_handlers(app, state.monitor)

    def auth(request: Request) -> None:
        _check_auth(state, request)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

    @v1.get("/models")
    async def models() -> P.ModelList:
        return P.ModelList(data=[P.ModelCard(id=model_name, created=state.created,
                                             max_model_len=state.context_len)])

    @v1.post("/completions")
    async def completions(body: P.CompletionRequest, request: Request):
        _check_model(state, body.model)
        _admit(state)
        prompts = [_encode_text(state, p) if isinstance(p, str) else p for p in body.prompts()]
        return await _respond(state, request, body, prompts, body.max_tokens,
                              _CompletionFormat(model_name, state.token_text))

    @v1.post("/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        _check_model(state, body.model)
        _admit(state)
        return await _respond(state, request, body, [_chat_ids(state, body.messages)],
                              body.max_new_tokens, _ChatFormat(model_name, state.token_text))

    app.include_router(v1)

    @app.get("/health")
    async def health():
        problem = "the server is shutting down" if state.draining else state.monitor.problem()
        if problem is None:
            return {"status": "ok"}
        return JSONResponse(P.error_body(problem, "service_unavailable", code="unhealthy"),
                            status_code=503, headers={"Retry-After": str(retry_after_s)})

    @app.get("/metrics")
    async def metrics():
        body = await asyncio.to_thread(state.metrics.render)    # stats() off the loop
        return Response(body, media_type=CONTENT_TYPE)

    return app


def _sse_response(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

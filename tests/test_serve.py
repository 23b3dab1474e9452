"""`parallax serve`: the OpenAI-compatible HTTP layer, driven by the real ``openai`` client
and raw httpx against a real uvicorn server on a free loopback port, on the real engine: a
tiny random Llama with a trained tokenizer (ChatML template, eos = id 2). One LLM and one
server are shared by the module; tests that need another engine configuration (a
one-sequence engine, a closed or stopped one) build their own, which takes milliseconds.
Multi-process tests (tp=2, pp=2, subprocess servers) are marked ``slow``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest

import parallax
from parallax.serve.app import build_app
from parallax.serve.server import BackgroundServer

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_checkpoint, make_tokenizer, wait_until  # noqa: E402

MODEL = "tiny"
CTX = 512           # the tiny model's context: long enough for a request to outlive a hang-up
LONG = CTX - 24     # max_tokens of a request that runs ~2 s unless cancelled


@pytest.fixture(scope="module")
def tiny_chat_ckpt(tmp_path_factory) -> str:
    """A tiny random Llama with a trained tokenizer and a ChatML template (eos = id 2)."""
    folder = str(tmp_path_factory.mktemp("tiny_chat"))
    vocab = make_tokenizer(folder)
    return make_checkpoint(folder, "llama", vocab_size=vocab, max_position_embeddings=CTX)


@pytest.fixture(scope="module")
def llm(tiny_chat_ckpt):
    with parallax.LLM(tiny_chat_ckpt, max_num_seqs=64, kv_cache_tokens=16384) as llm:
        yield llm


def serve(llm, **kw) -> BackgroundServer:
    return BackgroundServer(build_app(llm, MODEL, **kw))


@pytest.fixture(scope="module")
def srv(llm):
    with serve(llm) as s:
        yield s


@pytest.fixture
def submitted(llm, monkeypatch) -> list:
    """Records each ``llm.submit`` the server makes (prompt ids, keywords, the real handle)
    and passes it on to the real engine unchanged."""
    calls = []
    real_submit = llm.submit

    def spy(prompt, **kw):
        handle = real_submit(prompt, **kw)
        calls.append(SimpleNamespace(ids=list(prompt), kw=kw, handle=handle))
        return handle
    monkeypatch.setattr(llm, "submit", spy)
    return calls


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def oracle(llm, prompt, max_new_tokens: int, **kw):
    """What offline ``LLM.generate`` answers for this one prompt (text or token ids)."""
    return llm.generate([prompt], max_new_tokens=max_new_tokens, chat=False, **kw)[0]


def metric(url: str, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, value = line.rsplit(" ", 1)
        metric_name = head.split("{")[0]
        if metric_name != name or any(f'{k}="{v}"' not in head for k, v in labels.items()):
            continue
        total += float(value)
    return total


def sse_events(lines) -> list:
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def idle(llm) -> bool:
    s = llm.stats()
    return (s["num_requests_running"] == 0 and s["num_requests_waiting"] == 0
            and s["kv_cache_usage"] == 0)


# ---------------------------------------------------------------------- happy paths
def test_completion_text_and_usage(llm, srv, submitted):
    r = client(srv.url).completions.create(model=MODEL, prompt="Water boils at", max_tokens=7,
                                           temperature=0, extra_body={"ignore_eos": True})
    want = oracle(llm, "Water boils at", 7, ignore_eos=True)
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == "length" == want.finish_reason
    assert r.usage.prompt_tokens == len(llm.tokenizer.encode("Water boils at"))
    assert r.usage.completion_tokens == 7 and r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert r.id.startswith("cmpl-") and r.model == MODEL and r.object == "text_completion"
    # the server passes the sampling fields through as submit's arguments
    kw = submitted[0].kw
    assert kw["temperature"] == 0 and kw["chat"] is False and kw["max_new_tokens"] == 7
    assert submitted[0].handle.result().usage.completion_tokens == 7


def test_greedy_equals_offline_whatever_finishes_it(llm, srv):
    """Without ignore_eos the random model may end early on eos: the server says what
    LLM.generate says, finish_reason and usage included."""
    c = client(srv.url)
    for prompt in ("Water boils at", "The quick brown", "Paris is"):
        r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0)
        want = oracle(llm, prompt, 40)
        assert r.choices[0].text == want.text
        assert r.choices[0].finish_reason == want.finish_reason
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (
            want.usage.prompt_tokens, want.usage.completion_tokens)


def test_chat_uses_template_and_streams_same_text(llm, srv, submitted):
    c = client(srv.url)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    templated = llm.tokenizer.apply_chat_template(msgs)
    ids = llm.tokenizer.encode(templated, add_special_tokens=False)
    assert submitted[0].ids == ids
    assert r.choices[0].message.content == oracle(llm, ids, 6, ignore_eos=True).text
    assert r.choices[0].message.content == llm.chat(msgs, max_new_tokens=6,
                                                    ignore_eos=True).text
    assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens == len(ids)

    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_completion_stream_raw_sse(llm, srv):
    body = dict(model=MODEL, prompt="Hello", max_tokens=5, temperature=0, stream=True,
                stream_options={"include_usage": True}, ignore_eos=True)
    with httpx.stream("POST", srv.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = sse_events(raw.split("\n"))
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 5
    assert events[-2]["choices"] == []
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == oracle(
        llm, "Hello", 5, ignore_eos=True).text


def test_n2_seeded_sampling_reproducible(llm, srv):
    c = client(srv.url)
    kw = dict(model=MODEL, prompt="Hello", max_tokens=8, temperature=0.8, n=2, seed=1234,
              extra_body={"ignore_eos": True})
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert [ch.index for ch in a.choices] == [0, 1]
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    # choice i samples with seed + i, as LLM.generate seeds prompt i
    want = llm.generate(["Hello", "Hello"], max_new_tokens=8, temperature=0.8, seed=1234,
                        chat=False, ignore_eos=True)
    assert [ch.text for ch in a.choices] == [w.text for w in want]
    assert a.choices[0].text != a.choices[1].text
    assert a.usage.completion_tokens == 16
    other = c.completions.create(**{**kw, "seed": 99})
    assert [ch.text for ch in other.choices] != [ch.text for ch in a.choices]


def test_n2_streaming_both_choices(llm, srv):
    chunks = list(client(srv.url).completions.create(
        model=MODEL, prompt="Hi", max_tokens=4, n=2, seed=3, temperature=1.0, stream=True,
        extra_body={"ignore_eos": True}))
    texts = {0: "", 1: ""}
    reasons = {}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    assert reasons == {0: "length", 1: "length"}
    want = llm.generate(["Hi", "Hi"], max_new_tokens=4, temperature=1.0, seed=3, chat=False,
                        ignore_eos=True)
    assert [texts[0], texts[1]] == [w.text for w in want]


def test_stop_strings_and_fields_passed_to_engine(llm, srv, submitted):
    full = oracle(llm, "The quick brown", 16, ignore_eos=True).text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    r = client(srv.url).completions.create(model=MODEL, prompt="The quick brown",
                                           max_tokens=16, temperature=0, stop=[stop],
                                           extra_body={"ignore_eos": True})
    want = oracle(llm, "The quick brown", 16, ignore_eos=True, stop=[stop])
    assert r.choices[0].finish_reason == "stop" == want.finish_reason
    assert r.choices[0].text == want.text == full[:full.index(stop)]
    r = httpx.post(srv.url + "/v1/completions", json=dict(
        model=MODEL, prompt="Hello", max_tokens=12, temperature=0, stop_token_ids=[7],
        ignore_eos=True, repetition_penalty=1.3, top_k=5)).json()
    kw = submitted[-1].kw
    assert (kw["stop_token_ids"], kw["ignore_eos"], kw["repetition_penalty"], kw["top_k"]) == (
        [7], True, 1.3, 5)
    want = oracle(llm, "Hello", 12, stop_token_ids=[7], ignore_eos=True,
                  repetition_penalty=1.3, top_k=5)
    assert r["choices"][0]["text"] == want.text
    assert r["choices"][0]["finish_reason"] == want.finish_reason


def hf_free_logprobs(llm, prompt_ids: list[int], tokens: list[int]):
    """The oracle: log-softmax of one-process parallax's logits for the same prefix
    (``LLM.logits``, the offline forward over prompt + generated tokens)."""
    import torch
    logits = llm.logits([prompt_ids + tokens[:-1]])[0, len(prompt_ids) - 1:]
    return torch.log_softmax(logits, dim=-1)


def check_wire_logprobs(llm, prompt_ids, tokens, chosen, tops, k):
    """chosen: each token's logprob; tops: each position's {text: logprob} alternatives."""
    logp = hf_free_logprobs(llm, prompt_ids, tokens)
    assert len(chosen) == len(tokens) == len(tops)
    for i, tok in enumerate(tokens):
        assert abs(chosen[i] - float(logp[i, tok])) < 1e-4
        want = logp[i].topk(k).values.tolist()
        got = sorted(tops[i].values(), reverse=True)[:k]
        assert got == pytest.approx(want, abs=1e-4)


def test_completion_logprobs_openai_shape_stream_and_not(llm, srv):
    c = client(srv.url)
    kw = dict(model=MODEL, prompt="The quick brown", max_tokens=6, temperature=0,
              logprobs=3, extra_body={"ignore_eos": True})
    r = c.completions.create(**kw)
    lp = r.choices[0].logprobs
    ids = llm.tokenizer.encode("The quick brown")
    want = oracle(llm, "The quick brown", 6, ignore_eos=True, logprobs=3)
    assert lp.tokens == [llm.tokenizer.decode([t], skip_special_tokens=False)
                         for t in want.token_ids]
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert all(lp.tokens[i] in lp.top_logprobs[i] and len(lp.top_logprobs[i]) <= 4
               for i in range(6))
    check_wire_logprobs(llm, ids, want.token_ids, lp.token_logprobs, lp.top_logprobs, 3)
    streamed = [ch.choices[0].logprobs for ch in c.completions.create(stream=True, **kw)
                if ch.choices and ch.choices[0].logprobs is not None]
    assert sum((x.tokens for x in streamed), []) == lp.tokens
    assert sum((x.text_offset for x in streamed), []) == lp.text_offset
    assert sum((x.token_logprobs for x in streamed), []) == pytest.approx(lp.token_logprobs,
                                                                         abs=1e-6)
    assert c.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].logprobs \
        is None


def test_chat_logprobs_openai_shape_stream_and_not(llm, srv):
    c = client(srv.url)
    msgs = [{"role": "user", "content": "Say hi"}]
    kw = dict(model=MODEL, messages=msgs, max_tokens=5, temperature=0, logprobs=True,
              top_logprobs=2, extra_body={"ignore_eos": True})
    r = c.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(msgs), add_special_tokens=False)
    want = llm.generate([ids], max_new_tokens=5, ignore_eos=True, logprobs=2)[0]
    assert [e.token for e in content] == [llm.tokenizer.decode([t], skip_special_tokens=False)
                                          for t in want.token_ids]
    assert all(e.bytes == list(e.token.encode()) and len(e.top_logprobs) == 2 for e in content)
    check_wire_logprobs(llm, ids, want.token_ids, [e.logprob for e in content],
                        [{f"{j}": t.logprob for j, t in enumerate(e.top_logprobs)}
                         for e in content], 2)
    streamed = [e for ch in c.chat.completions.create(stream=True, **kw)
                if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == \
        [(e.token, round(e.logprob, 5)) for e in content]
    plain = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_presence_frequency_penalties_reach_the_engine(llm, srv, submitted):
    """Greedy with penalties over HTTP equals offline generate with the same penalties
    (and differs from the answer without: the penalties were applied)."""
    c = client(srv.url)
    kw = dict(model=MODEL, prompt="the the the", max_tokens=12, temperature=0,
              extra_body={"ignore_eos": True})
    r = c.completions.create(presence_penalty=1.5, frequency_penalty=0.7, **kw)
    sub = submitted[-1].kw
    assert (sub["presence_penalty"], sub["frequency_penalty"]) == (1.5, 0.7)
    want = oracle(llm, "the the the", 12, ignore_eos=True, presence_penalty=1.5,
                  frequency_penalty=0.7)
    assert r.choices[0].text == want.text
    assert want.text != oracle(llm, "the the the", 12, ignore_eos=True).text
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                     max_tokens=3, presence_penalty=-1.0, frequency_penalty=2.0)
    assert chat.choices[0].message.content is not None
    assert (submitted[-1].kw["presence_penalty"], submitted[-1].kw["frequency_penalty"]) == (
        -1.0, 2.0)


def test_token_id_prompts(llm, srv):
    c = client(srv.url)
    g = dict(temperature=0, extra_body={"ignore_eos": True})
    r = c.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=4, **g)
    assert r.choices[0].text == oracle(llm, [5, 6, 7, 8], 4, ignore_eos=True).text
    assert r.usage.prompt_tokens == 4
    r = c.completions.create(model=MODEL, prompt=[[5, 6], [9, 10, 11]], max_tokens=3, **g)
    assert [ch.text for ch in r.choices] == [oracle(llm, [5, 6], 3, ignore_eos=True).text,
                                             oracle(llm, [9, 10, 11], 3, ignore_eos=True).text]
    assert r.usage.prompt_tokens == 5
    r = c.completions.create(model=MODEL, prompt=["Hello", "Water"], max_tokens=3, n=2, **g)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.choices[2].text == oracle(llm, "Water", 3, ignore_eos=True).text


def test_models_route(srv):
    models = client(srv.url).models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_64_async_consumers_all_progress_without_threads(llm):
    """64 handles iterated with ``async for`` on one event loop: every stream gets its first
    delta before any stream finishes (the engine runs them as one batch and each consumer is
    woken as its deltas arrive), and waiting holds no thread (the loop's default executor
    never starts one)."""
    n, tokens = 64, 24
    events: list[tuple[str, int]] = []
    used_executor = []

    async def consume(i: int, handle) -> int:
        count = 0
        async for d in handle:
            if count == 0:
                events.append(("first", i))
            count += len(d.token_ids)
            if d.finish_reason is not None:
                events.append(("done", i))
        return count

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        real = loop.run_in_executor

        def watch(*a, **kw):
            used_executor.append(a)
            return real(*a, **kw)
        loop.run_in_executor = watch
        threads = threading.active_count()
        # all submitted before the loop runs a consumer: the engine admits them together
        handles = [llm.submit([5 + i % 50, 6], max_new_tokens=tokens, ignore_eos=True)
                   for i in range(n)]
        counts = await asyncio.gather(*(consume(i, h) for i, h in enumerate(handles)))
        assert threading.active_count() <= threads       # no thread started to wait
        return counts

    assert asyncio.run(main()) == [tokens] * n
    assert used_executor == []
    kinds = [k for k, _ in events]
    assert kinds.count("first") == n and kinds.count("done") == n
    assert kinds.index("done") > max(i for i, k in enumerate(kinds) if k == "first")
    assert wait_until(lambda: idle(llm))


# ---------------------------------------------------------------------- errors
def err(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("field,value,param", [
    ("temperature", -1, "temperature"), ("n", 0, "n"), ("max_tokens", 0, "max_tokens"),
    ("top_p", 0, "top_p"), ("prompt", [], "prompt"), ("bogus_field", 1, "bogus_field"),
    ("presence_penalty", 2.5, "presence_penalty"), ("frequency_penalty", -3,
                                                    "frequency_penalty"),
    ("logprobs", 21, "logprobs"), ("logprobs", -1, "logprobs"), ("echo", True, "echo"),
])
def test_bad_fields_are_400(srv, field, value, param):
    body = {"model": MODEL, "prompt": "Hi", field: value}
    e = err(httpx.post(srv.url + "/v1/completions", json=body), 400)
    assert e["param"] == param and e["type"] == "invalid_request_error"


def test_chat_logprobs_400_and_bad_role(srv):
    msgs = [{"role": "user", "content": "Hi"}]
    e = err(httpx.post(srv.url + "/v1/chat/completions",
                       json={"model": MODEL, "messages": msgs, "top_logprobs": 2}), 400)
    assert "logprobs=true" in e["message"] and e["param"] == "top_logprobs"
    e = err(httpx.post(srv.url + "/v1/chat/completions", json={
        "model": MODEL, "messages": msgs, "logprobs": True, "top_logprobs": 21}), 400)
    assert e["param"] == "top_logprobs"
    e = err(httpx.post(srv.url + "/v1/chat/completions",
                       json={"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
            400)
    assert e["param"].startswith("messages")
    err(httpx.post(srv.url + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"}), 400)


def test_engine_errors_are_400_naming_numbers(llm, srv):
    ctx = llm.config.max_position_embeddings
    e = err(httpx.post(srv.url + "/v1/completions", json={
        "model": MODEL, "prompt": [5] * (ctx - 10), "max_tokens": 50}), 400)
    assert str(ctx - 10) in e["message"] and str(ctx) in e["message"]
    e = err(httpx.post(srv.url + "/v1/completions", json={
        "model": MODEL, "prompt": [5] * ctx, "max_tokens": None}), 400)
    assert str(ctx) in e["message"]
    e = err(httpx.post(srv.url + "/v1/completions",
                       json={"model": MODEL, "prompt": [1, 99999], "max_tokens": 2}), 400)
    assert "vocabulary" in e["message"]
    assert wait_until(lambda: idle(llm))       # nothing refused was left in the engine


def test_openai_client_raises_typed_errors(srv):
    c = client(srv.url)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="Hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=5)


def test_unknown_model_and_route_404(srv):
    e = err(httpx.post(srv.url + "/v1/completions", json={"model": "gpt-4", "prompt": "Hi"}), 404)
    assert e["code"] == "model_not_found" and "gpt-4" in e["message"]
    err(httpx.get(srv.url + "/v1/nothing-here"), 404)


def test_api_key_401(llm):
    with serve(llm, api_key="s3cret") as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            e = err(httpx.get(s.url + "/v1/models", headers=headers), 401)
            assert e["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(s.url, "wrong").models.list()
        assert client(s.url, "s3cret").models.list().data[0].id == MODEL
        assert httpx.get(s.url + "/health").status_code == 200        # probes need no key


def test_queue_full_429_with_retry_after(tiny_chat_ckpt):
    """A one-sequence engine: one long generation runs, two requests wait (one submitted
    directly, a short stream over HTTP); with --max-queue 2 the next request gets 429."""
    short = {"model": MODEL, "prompt": "Hi", "max_tokens": 8, "ignore_eos": True}
    with parallax.LLM(tiny_chat_ckpt, max_num_seqs=1, kv_cache_tokens=4096) as one:
        runner = one.submit("Hello", max_new_tokens=LONG, chat=False, ignore_eos=True)
        waiter = one.submit("Hello", max_new_tokens=LONG, chat=False, ignore_eos=True)
        with serve(one, max_queue=2) as s, httpx.Client(timeout=30) as h:
            with h.stream("POST", s.url + "/v1/completions", json={**short, "stream": True}) as st:
                assert wait_until(lambda: one.stats()["num_requests_waiting"] == 2)
                assert one.stats()["num_requests_running"] == 1
                r = h.post(s.url + "/v1/completions", json=short)
                e = err(r, 429)
                assert r.headers["retry-after"] == "1" and e["code"] == "queue_full"
                assert "2 requests are waiting" in e["message"]
                assert metric(s.url, "parallax:request_rejected_total", status="429") == 1
                runner.cancel()
                waiter.cancel()
                events = sse_events(st.iter_lines())        # the queued stream now runs
            assert events[-1] == "[DONE]"
            assert events[-2]["choices"][0]["finish_reason"] == "length"
            r = h.post(s.url + "/v1/completions", json=short)
            assert r.status_code == 200
        assert runner.result().finish_reason == waiter.result().finish_reason == "abort"


# ---------------------------------------------------------------------- disconnects
def test_disconnect_mid_stream_cancels(llm, submitted):
    with serve(llm) as s:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": LONG, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(4)]
        assert any(x.startswith("data: ") for x in got)
        done = submitted[0].handle.result(timeout=30)
        assert done.finish_reason == "abort" and done.usage.completion_tokens < LONG
        assert wait_until(lambda: idle(llm))            # its KV blocks are free again
        assert wait_until(lambda: metric(s.url, "parallax:request_failed_total",
                                         reason="aborted") == 1)
        assert metric(s.url, "parallax:request_success_total") == 0


def test_disconnect_non_streaming_cancels(llm, submitted):
    with serve(llm) as s:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/completions", timeout=0.3, json={
                "model": MODEL, "prompt": "Hi", "max_tokens": LONG, "ignore_eos": True})
        done = submitted[0].handle.result(timeout=30)
        assert done.finish_reason == "abort" and done.usage.completion_tokens < LONG
        assert wait_until(lambda: idle(llm))
        assert wait_until(lambda: metric(s.url, "parallax:request_failed_total",
                                         reason="aborted") == 1)
        assert metric(s.url, "parallax:request_success_total") == 0


# ---------------------------------------------------------------------- health, metrics
def test_health_turns_503_when_engine_dies(tiny_chat_ckpt):
    """A real engine that goes away under the server (closed: stats() raises)."""
    dying = parallax.LLM(tiny_chat_ckpt, max_num_seqs=2, kv_cache_tokens=1024)
    with serve(dying, health_timeout_s=2.0) as s:
        assert httpx.get(s.url + "/health").status_code == 200
        dying.close()
        assert wait_until(lambda: httpx.get(s.url + "/health").status_code == 503, 5)
        assert "dead" in httpx.get(s.url + "/health").json()["error"]["message"]
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi"})
        assert err(r, 503)["code"] == "engine_failed"


@pytest.mark.slow
def test_health_turns_503_when_engine_stuck(tiny_chat_ckpt):
    """A tp=2 engine whose worker is SIGSTOPped mid-generation: the engine step waits on it,
    stats() still answers, so /health says "no progress" (503); after SIGCONT it moves
    again and /health is 200."""
    with parallax.LLM(tiny_chat_ckpt, tp=2, max_num_seqs=2, kv_cache_tokens=2048,
                      timeout_s=60) as stuck:
        victim = next(m["pid"] for m in stuck.memory() if m["pid"] != os.getpid())
        with serve(stuck, health_timeout_s=1.0) as s:
            assert httpx.get(s.url + "/health").status_code == 200
            h = stuck.submit("Hi", max_new_tokens=LONG, chat=False, ignore_eos=True)
            os.kill(victim, signal.SIGSTOP)
            try:
                assert wait_until(lambda: httpx.get(s.url + "/health").status_code == 503, 8)
                assert "no progress" in httpx.get(s.url + "/health").json()["error"]["message"]
            finally:
                os.kill(victim, signal.SIGCONT)
            assert wait_until(lambda: httpx.get(s.url + "/health").status_code == 200, 8)
            h.cancel()
            assert h.result(timeout=30).finish_reason in ("abort", "length")


def test_metrics_names_and_counts(llm):
    with serve(llm) as s:
        c = client(s.url)
        c.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, n=2,
                             extra_body={"ignore_eos": True})
        list(c.completions.create(model=MODEL, prompt="Hello", max_tokens=3, stream=True,
                                  extra_body={"ignore_eos": True}))
        text = httpx.get(s.url + "/metrics").text
        for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                     "prompt_tokens_total", "generation_tokens_total", "num_preemptions_total",
                     "prefix_cache_queries_total", "prefix_cache_hits_total",
                     "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                     "e2e_request_latency_seconds_bucket", "request_queue_time_seconds_bucket"):
            assert f"\nparallax:{name}" in text, name
        assert metric(s.url, "parallax:request_success_total", finished_reason="length") == 3
        assert metric(s.url, "parallax:time_to_first_token_seconds_count") == 3
        # the engine's queue time: one per choice, none negative, each below its e2e
        assert metric(s.url, "parallax:request_queue_time_seconds_count") == 3
        queued = metric(s.url, "parallax:request_queue_time_seconds_sum")
        assert 0 <= queued <= metric(s.url, "parallax:e2e_request_latency_seconds_sum")
        # 4 + 4 + 3 tokens: one inter-token gap per token after each choice's first
        assert metric(s.url, "parallax:inter_token_latency_seconds_count") == 8
        stats = llm.stats()
        assert metric(s.url, "parallax:generation_tokens_total") == stats["generation_tokens"]
        assert metric(s.url, "parallax:prompt_tokens_total") == stats["prompt_tokens"]


def test_draining_refuses_new_requests_503(llm):
    with serve(llm) as s:
        s.server.config.app.state.serve.draining = True
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi"})
        e = err(r, 503)
        assert e["code"] == "shutting_down" and r.headers["retry-after"] == "1"
        assert httpx.get(s.url + "/health").status_code == 503


def test_chat_content_parts_and_default_budget(llm, srv, submitted):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hel"},
                                         {"type": "text", "text": "lo"}]}]
    body = {"model": MODEL, "messages": msgs, "user": "someone", "stream": True}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert next(r.iter_lines()).startswith("data: ")     # then hang up: it is cancelled
    plain = [{"role": "user", "content": "Hello"}]
    ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(plain),
                               add_special_tokens=False)
    assert submitted[-1].ids == ids
    # chat without max_tokens: the rest of the context
    assert submitted[-1].kw["max_new_tokens"] == CTX - len(ids)
    assert submitted[-1].handle.result(timeout=30).finish_reason == "abort"
    e = err(httpx.post(srv.url + "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}]}), 400)
    assert e["param"].startswith("messages")


def test_loadgen_cli_table_and_replayed_arrivals(srv, capsys):
    from parallax.serve.loadgen import main, run_load
    assert main(["--url", srv.url, "--num-prompts", "6", "--rates", "50,inf",
                 "--max-tokens", "3"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 50")
            or line.startswith("| inf")]
    assert len(rows) == 2 and all(r.split("|")[2].strip() == "6" for r in rows)
    records, wall = run_load(srv.url, [[5, 6]] * 3, model=MODEL, max_tokens=4,
                             arrivals=[0.0, 0.2, 0.4], extra_body={"ignore_eos": True})
    assert all(abs(r.start_s - t) < 0.1 for r, t in zip(records, (0.0, 0.2, 0.4)))
    assert all(len(r.times) == 4 and r.times == sorted(r.times) for r in records)
    assert wall >= 0.4


# ---------------------------------------------------------------------- SIGTERM
DRAIN_SCRIPT = """
import parallax
from parallax.serve.app import build_app
from parallax.serve.server import run
llm = parallax.LLM({ckpt!r}, max_num_seqs=2, kv_cache_tokens=2048)
run(build_app(llm, "m"), "127.0.0.1", 0, drain_timeout_s=60,
    on_started=lambda url: print("URL", url, flush=True))
llm.close()
print("EXITED CLEANLY", flush=True)
"""


def stream_through_sigterm(p: subprocess.Popen, url: str, body: dict) -> None:
    """SIGTERM the server ``p`` once a greedy stream has started: the stream must finish
    (finish_reason "length", then [DONE]), the process exit 0 and the port close."""
    body = {**body, "stream": True, "temperature": 0}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        p.send_signal(signal.SIGTERM)
        events = sse_events(lines)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"     # finished, not cut
    assert p.wait(timeout=60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health")


def test_sigterm_drains_running_requests_and_exits_0(tiny_chat_ckpt):
    script = DRAIN_SCRIPT.format(ckpt=tiny_chat_ckpt)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.join(os.path.dirname(__file__), "..", "src"), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                         env=env)
    try:
        line = p.stdout.readline()
        assert line.startswith("URL "), line
        url = line.split()[1]
        stream_through_sigterm(p, url, {"model": "m", "prompt": "Hi", "max_tokens": 60,
                                        "ignore_eos": True})
        assert "EXITED CLEANLY" in p.stdout.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


# ---------------------------------------------------------------------- load (toy engine)
@pytest.fixture
def outcomes(caplog):
    """The server's own per-choice records (app.py's DEBUG line "<id> choice <i>: <outcome>
    ..."), read after a run: {response id: (outcome, finish_reason, completion_tokens)}
    for n=1 requests; a response id seen twice fails the test."""
    import logging
    caplog.set_level(logging.DEBUG, logger="parallax.serve.app")

    def read() -> dict:
        out: dict = {}
        for rec in caplog.records:
            if rec.name == "parallax.serve.app" and "choice %d:" in str(rec.msg):
                rid, _, outcome, reason, tokens = rec.args
                assert rid not in out, f"{rid} recorded twice"
                out[rid] = (outcome, reason, tokens)
        return out
    return read


def check_load(url: str, llm, budgets, oracle_texts, records, before: dict | None = None,
               server_records=None):
    """Every request answered once; completed greedy answers equal the oracle; the engine
    idle and its KV cache empty after; the server counted each request exactly once.

    A request counts as a success on the server exactly when the server took its final
    delta before it learnt that the client had gone (app.py ``_finish``); a client that
    hangs up just as its last token is on the wire sees a cut answer while the server
    counted a complete one. So the exact count is checked against the server's own
    per-request record (``server_records()``, keyed by the response id each client saw):
    every client-complete answer is a server success with the same finish reason and
    token count, every hang-up is a success or an abort there, no id is missing or
    doubled, and request_success_total equals the records' successes exactly."""
    from parallax.serve.loadgen import summarize
    before = before or {}
    assert [r.index for r in records] == list(range(len(budgets)))
    assert all(r.status == 200 and r.error is None for r in records), [
        r.error for r in records if r.error][:3]
    done = [r for r in records if r.ok]
    hung = [r for r in records if r.disconnected]
    assert hung and len(done) + len(hung) == len(records)
    ids = [r.response_id for r in records]
    assert None not in ids and len(set(ids)) == len(ids)
    for r in done:
        assert r.text == oracle_texts[r.index], r.index
        assert r.output_tokens <= budgets[r.index]
    assert wait_until(lambda: llm.stats()["num_requests_running"] == 0
                      and llm.stats()["num_requests_waiting"] == 0)
    assert wait_until(lambda: llm.stats()["kv_cache_usage"] == 0)
    assert metric(url, "parallax:kv_cache_usage_perc") == 0

    def count(name, **labels):
        return metric(url, name, **labels) - before.get((name, *labels.values()), 0)

    assert wait_until(lambda: count("parallax:request_success_total")
                      + count("parallax:request_failed_total", reason="aborted")
                      == len(records))
    success = count("parallax:request_success_total")
    assert len(done) <= success <= len(done) + len(hung)
    if server_records is not None:
        seen = server_records()
        mine = {i: seen.get(i) for i in ids}
        assert None not in mine.values() and len(mine) == len(records)
        for r in done:
            assert mine[r.response_id] == ("success", r.finish_reason, r.output_tokens), (
                r.index, mine[r.response_id], r.finish_reason, r.output_tokens)
        assert all(mine[r.response_id][0] in ("success", "aborted") for r in hung)
        late = sum(mine[r.response_id][0] == "success" for r in hung)
        assert success == len(done) + late == sum(o[0] == "success" for o in mine.values())
        print(f"\nload: {len(records)} requests, {len(done)} complete, {len(hung)} hung up "
              f"({late} of them after the server had finished), success_total {success:.0f}")
    assert count("parallax:request_failed_total", reason="error") == 0
    assert count("parallax:e2e_request_latency_seconds_count") == success
    # the engine's queue time, once per success, never above the request's whole latency
    assert count("parallax:request_queue_time_seconds_count") == success
    assert 0 <= count("parallax:request_queue_time_seconds_sum") \
        <= count("parallax:e2e_request_latency_seconds_sum")
    s = summarize(records, 1.0)
    assert s["completed"] == len(done) and s["failed"] == 0


def counters(url: str) -> dict:
    """The counters check_load compares, before a run."""
    names = [("parallax:request_success_total",), ("parallax:request_failed_total", "aborted"),
             ("parallax:request_failed_total", "error"),
             ("parallax:e2e_request_latency_seconds_count",),
             ("parallax:e2e_request_latency_seconds_sum",),
             ("parallax:request_queue_time_seconds_count",),
             ("parallax:request_queue_time_seconds_sum",)]
    return {n: metric(url, n[0], **({"reason": n[1]} if len(n) > 1 else {})) for n in names}


def test_load_mixed(llm, srv, outcomes):
    """120 requests at concurrency 32, half streaming, mixed lengths, ~20% hanging up."""
    from parallax.serve.loadgen import run_load, synthetic_prompts
    prompts = synthetic_prompts(120, (2, 20), seed=1)
    budgets = [4 + (i * 7) % 29 for i in range(len(prompts))]
    want = offline(llm, prompts, budgets)
    before = counters(srv.url)
    records, _ = run_load(srv.url, prompts, model=MODEL, max_tokens=budgets, concurrency=32,
                          stream=0.5, disconnect_fraction=0.2, seed=2, timeout_s=60)
    assert any(r.disconnected for r in records) and any(not r.stream for r in records)
    check_load(srv.url, llm, budgets, want, records, before, outcomes)


def test_hang_ups_racing_the_last_token_count_once(llm, srv, outcomes):
    """Two-token streams whose clients hang up after the first chunk: the server often has
    the last token already. Each request still counts once, on the side the server's own
    record names, and request_success_total equals that count exactly."""
    from parallax.serve.loadgen import run_load, synthetic_prompts
    prompts = synthetic_prompts(40, (2, 10), seed=11)
    budgets = [2] * len(prompts)
    want = offline(llm, prompts, budgets, ignore_eos=True)
    before = counters(srv.url)
    records, _ = run_load(srv.url, prompts, model=MODEL, max_tokens=budgets, concurrency=16,
                          stream=True, disconnect_fraction=1.0, seed=4, timeout_s=60,
                          extra_body={"ignore_eos": True})
    check_load(srv.url, llm, budgets, want, records, before, outcomes)


def test_success_is_decided_by_the_final_delta_not_by_the_client(llm, outcomes):
    """The definition, without network timing: a stream closed (the client gone) after the
    server took its final delta counts as a success, even though the client never read
    that chunk; closed one delta earlier, it counts as aborted. Once each."""
    from parallax.serve import app as A
    from parallax.serve import protocol as P
    state = build_app(llm, MODEL).state.serve
    body = P.CompletionRequest(prompt=[5, 6, 7], max_tokens=3, temperature=0, stream=True,
                               ignore_eos=True)

    async def run(chunks_before_close: int) -> str:
        fmt = A._CompletionFormat(MODEL, state.token_text)
        choices = A._submit(state, [[5, 6, 7]], 3, body, fmt.head["id"])
        gen = A._stream(state, choices, fmt, None)
        for _ in range(chunks_before_close):
            await gen.__anext__()
        await gen.aclose()                    # what the server does when the client leaves
        return fmt.head["id"]

    late = asyncio.run(run(3))                # the 3rd chunk holds the last token
    early = asyncio.run(run(2))
    seen = outcomes()
    assert seen[late] == ("success", "length", 3) and seen[early][0] == "aborted"
    assert metric_value(state, "request_success_total") == 1
    assert metric_value(state, "request_failed_total") == 1
    assert wait_until(lambda: idle(llm))


def metric_value(state, name: str) -> float:
    """Sum of an app's counter samples, read from its own registry (no server needed)."""
    return sum(s.value for m in state.metrics.registry.collect()
               for s in m.samples if s.name == "parallax:" + name)


# ====================================================================== the real engine
def offline(llm, prompts, budgets, **kw) -> list[str]:
    """LLM.generate's texts for (prompt, max_new_tokens) pairs, one generate per budget."""
    out = [None] * len(prompts)
    for b in sorted(set(budgets)):
        idx = [i for i, x in enumerate(budgets) if x == b]
        texts = llm.generate([prompts[i] for i in idx], max_new_tokens=b, chat=False, **kw)
        for i, c in zip(idx, texts):
            out[i] = c.text
    return out


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def load_200(url: str, llm, outcomes) -> None:
    """200 requests at concurrency 32, half streaming, mixed lengths, ~10% hanging up,
    after a warm-up; answers, counts and KV checked (check_load), and this process's RSS
    after the run within 10% of after the warm-up."""
    from parallax.serve.loadgen import run_load, synthetic_prompts
    prompts = synthetic_prompts(200, (2, 40), seed=5)
    budgets = [2 + (i * 11) % 30 for i in range(len(prompts))]
    want = offline(llm, prompts, budgets)
    run_load(url, prompts[:32], model=MODEL, max_tokens=budgets[:32], concurrency=32)
    warm_rss = rss_bytes()
    before = counters(url)
    t0 = time.monotonic()
    records, wall = run_load(url, prompts, model=MODEL, max_tokens=budgets, concurrency=32,
                             stream=0.5, disconnect_fraction=0.2, seed=9, timeout_s=180)
    assert time.monotonic() - t0 < 180
    assert 10 <= sum(r.disconnected for r in records) <= 40
    check_load(url, llm, budgets, want, records, before, outcomes)
    assert rss_bytes() < 1.1 * warm_rss, (rss_bytes(), warm_rss)
    print(f"load run: {wall:.1f} s")


@pytest.mark.slow
def test_real_load_200_requests(llm, srv, outcomes):
    load_200(srv.url, llm, outcomes)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_real_load_parallel_layouts(tiny_chat_ckpt, tp, pp, outcomes):
    """The same load on a tp=2 and a pp=2 engine (worker processes)."""
    import parallax
    with parallax.LLM(tiny_chat_ckpt, tp=tp, pp=pp, max_num_seqs=32,
                      kv_cache_tokens=8192) as llm:
        with BackgroundServer(build_app(llm, MODEL)) as s:
            load_200(s.url, llm, outcomes)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:          # a zombie is dead too
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.slow
def test_real_worker_killed_under_load(tiny_chat_ckpt):
    """Kill a tp=2 worker mid-load: in-flight requests end with a 5xx error (no hang),
    /health turns 503 within its timeout, and closing leaves no worker behind."""
    import parallax
    from parallax.serve.loadgen import run_load_async, synthetic_prompts
    import asyncio
    prompts = synthetic_prompts(24, (2, 10), seed=11)
    llm = parallax.LLM(tiny_chat_ckpt, tp=2, max_num_seqs=8, kv_cache_tokens=4096,
                       timeout_s=10)
    pids = [m["pid"] for m in llm.memory()]
    victim = next(p for p in pids if p != os.getpid())
    try:
        with BackgroundServer(build_app(llm, MODEL, health_timeout_s=3.0)) as s:
            async def scenario():
                load = asyncio.create_task(run_load_async(
                    s.url, prompts, model=MODEL, max_tokens=200, concurrency=24,
                    stream=0.5, seed=1, timeout_s=60, extra_body={"ignore_eos": True}))
                await asyncio.sleep(1.0)
                os.kill(victim, signal.SIGKILL)
                return await load
            t0 = time.monotonic()
            records, _ = asyncio.run(scenario())
            assert time.monotonic() - t0 < 60
            failed = [r for r in records if r.error is not None]
            assert failed, "no request saw the dead worker"
            for r in failed:
                assert r.status is None or r.status >= 500 or r.stream, (r.status, r.error)
                assert "503" in r.error or "engine" in r.error.lower(), r.error
            # at once: requests saw the engine die (else within health_timeout_s)
            assert httpx.get(s.url + "/health").status_code == 503
            r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi"})
            assert r.status_code == 503, r.text
    finally:
        llm.close()
    assert wait_until(lambda: not any(pid_alive(p) for p in pids if p != os.getpid()), 20)


@pytest.mark.slow
def test_cli_serve_sigterm_drains_and_exits_0(tiny_chat_ckpt):
    """`parallax serve` on loopback: logs URL, layout and KV capacity; SIGTERM lets a
    running stream finish, refuses new connections, exits 0."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.join(os.path.dirname(__file__), "..", "src"), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, "-m", "parallax", "serve", tiny_chat_ckpt,
                          "--port", "0", "--served-model-name", MODEL,
                          "--kv-cache-tokens", "2048"],
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "parallax serve:" not in line and time.monotonic() < deadline:
            line = p.stderr.readline()
            assert line or p.poll() is None, "server exited before starting"
        url = line.split(" at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        assert "tp=1 pp=1" in line and "KV cache 2048 tokens" in line
        stream_through_sigterm(p, url, {"model": MODEL, "prompt": "Hi", "max_tokens": 80,
                                        "ignore_eos": True})
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()

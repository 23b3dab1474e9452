"""An HTTP load driver for any OpenAI-compatible server (parallax, vLLM, llama.cpp, TGI).

Requests go out at Poisson arrival times (a fixed seed) or all at once, up to a concurrency
limit, streaming or not, and optionally hang up mid-stream; each request's time to first
token, inter-token gaps and end-to-end time are recorded from the SSE stream.

    records, wall = run_load("http://127.0.0.1:8000", prompts, model="m", rate=4.0)
    print(summarize(records, wall))

``python -m parallax.serve.loadgen --url URL --rates 1,2,4`` sweeps rates and prints a
table. benchmarks/bench_serving.py calls ``run_load`` / ``summarize`` for its --url mode.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Sequence

import httpx


@dataclass
class RequestRecord:
    """What one request saw (times in seconds from its own send)."""
    index: int
    stream: bool
    status: int | None = None
    error: str | None = None
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    output_tokens: int = 0
    start_s: float = 0.0                # send time, from the start of the run
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)   # each chunk's arrival, from run start
    disconnected: bool = False          # hung up on purpose mid-stream
    response_id: str | None = None      # the answer's ``id`` (from its first chunk)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and not self.disconnected

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def _body(model: str | None, prompt, max_tokens: int, stream: bool, temperature: float,
          seed: int | None, extra: dict | None) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
            "stream": stream, **(extra or {})}
    if model is not None:
        body["model"] = model
    if seed is not None:
        body["seed"] = seed
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def _one(client: httpx.AsyncClient, url: str, rec: RequestRecord, body: dict,
               hang_up_after: int | None, run_t0: float) -> None:
    t0 = time.perf_counter()
    last = None
    try:
        if not rec.stream:
            r = await client.post(url, json=body)
            rec.status = r.status_code
            rec.e2e_s = rec.ttft_s = time.perf_counter() - t0
            data = r.json()
            if r.status_code != 200:
                rec.error = json.dumps(data.get("error", data))
                return
            rec.response_id = data.get("id")
            rec.text = data["choices"][0]["text"]
            rec.finish_reason = data["choices"][0]["finish_reason"]
            rec.prompt_tokens = data["usage"]["prompt_tokens"]
            rec.output_tokens = data["usage"]["completion_tokens"]
            return
        async with client.stream("POST", url, json=body) as r:
            rec.status = r.status_code
            if r.status_code != 200:
                rec.error = (await r.aread()).decode(errors="replace")
                return
            chunks = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    break
                data = json.loads(payload)
                if "error" in data:
                    rec.error = json.dumps(data["error"])
                    break
                rec.response_id = rec.response_id or data.get("id")
                if data.get("usage"):
                    rec.prompt_tokens = data["usage"]["prompt_tokens"]
                    rec.output_tokens = data["usage"]["completion_tokens"]
                for ch in data.get("choices") or ():
                    # One chunk per generated token (parallax sends one per engine delta,
                    # text or not), so chunk times are token times.
                    now = time.perf_counter()
                    if ch.get("finish_reason") != "abort":
                        if rec.ttft_s is None:
                            rec.ttft_s = now - t0
                        else:
                            rec.itl_s.append(now - last)
                        last = now
                        rec.times.append(now - run_t0)
                    rec.text += ch.get("text") or ""
                    rec.finish_reason = ch.get("finish_reason") or rec.finish_reason
                chunks += 1
                if hang_up_after is not None and chunks >= hang_up_after \
                        and rec.finish_reason is None:
                    # (A client that already has the whole answer reads on to [DONE].)
                    rec.disconnected = True
                    break           # leaving the block closes the connection
            rec.e2e_s = time.perf_counter() - t0
    except Exception as e:      # a load driver records failures instead of stopping
        rec.error = f"{type(e).__name__}: {e}"


async def run_load_async(url: str, prompts: Sequence, *, model: str | None = None,
                         max_tokens: int | Sequence[int] = 64, rate: float = math.inf,
                         concurrency: int | None = None, stream: bool | float = True,
                         temperature: float = 0.0, seed: int = 0,
                         request_seed: int | None = None, disconnect_fraction: float = 0.0,
                         api_key: str | None = None, timeout_s: float = 600.0,
                         extra_body: dict | None = None,
                         arrivals: Sequence[float] | None = None
                         ) -> tuple[list[RequestRecord], float]:
    """Send one /v1/completions request per prompt; returns (records in prompt order,
    wall seconds).

    Args:
        url: the server's base URL (without /v1).
        prompts: strings or token-id lists.
        max_tokens: one value, or one per prompt.
        rate: Poisson arrival rate in requests/s (inf: all at once).
        concurrency: requests in flight at most (None: no limit).
        stream: True / False, or the fraction of requests that stream.
        seed: drives arrival times, which requests stream and which hang up.
        request_seed: the sampling ``seed`` sent with every request (None: not sent).
        disconnect_fraction: streaming requests that hang up after 1-4 chunks.
        extra_body: more request fields (e.g. {"ignore_eos": True}).
        arrivals: send times in seconds from the start, one per prompt (instead of ``rate``),
            to replay another benchmark's arrival process exactly.
    """
    rng = random.Random(seed)
    n = len(prompts)
    budgets = [max_tokens] * n if isinstance(max_tokens, int) else list(max_tokens)
    frac = float(stream)
    streams = [rng.random() < frac for _ in range(n)]
    hang = [rng.randint(1, 4) if s and rng.random() < disconnect_fraction else None
            for s in streams]
    gaps = [0.0 if math.isinf(rate) else rng.expovariate(rate) for _ in range(n)]
    if arrivals is not None:
        gaps = [b - a for a, b in zip([0.0, *arrivals[:-1]], arrivals)]
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency or n, max_keepalive_connections=None)
    records = [RequestRecord(i, streams[i]) for i in range(n)]
    endpoint = url.rstrip("/") + "/v1/completions"
    async with httpx.AsyncClient(timeout=timeout_s, headers=headers, limits=limits) as client:
        t0 = time.perf_counter()

        async def go(i: int) -> None:
            if sem is not None:
                await sem.acquire()
            try:
                records[i].start_s = time.perf_counter() - t0
                body = _body(model, prompts[i], budgets[i], streams[i], temperature,
                             request_seed, extra_body)
                await _one(client, endpoint, records[i], body, hang[i], t0)
            finally:
                if sem is not None:
                    sem.release()

        tasks = []
        due = 0.0
        for i in range(n):
            due += gaps[i]
            delay = t0 + due - time.perf_counter()     # against the schedule: no drift
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(go(i)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    return records, wall


def run_load(url: str, prompts: Sequence, **kwargs) -> tuple[list[RequestRecord], float]:
    """``run_load_async`` from synchronous code."""
    return asyncio.run(run_load_async(url, prompts, **kwargs))


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def summarize(records: list[RequestRecord], wall_s: float) -> dict:
    """Throughput and latency percentiles (milliseconds) over the completed requests."""
    done = [r for r in records if r.ok]
    out = {"requests": len(records), "completed": len(done),
           "failed": sum(1 for r in records if r.error is not None),
           "disconnected": sum(r.disconnected for r in records), "wall_s": wall_s,
           "request_throughput": len(done) / wall_s if wall_s else float("nan"),
           "output_throughput": sum(r.output_tokens for r in done) / wall_s if wall_s
           else float("nan")}
    series = {"ttft": [r.ttft_s for r in done if r.stream and r.ttft_s is not None],
              "tpot": [r.tpot_s for r in done if r.tpot_s is not None],
              "itl": [x for r in done for x in r.itl_s],
              "e2e": [r.e2e_s for r in done if r.e2e_s is not None]}
    for name, xs in series.items():
        ms = [1e3 * x for x in xs]
        out[f"mean_{name}_ms"] = statistics.fmean(ms) if ms else float("nan")
        for q in (50, 90, 99):
            out[f"p{q}_{name}_ms"] = _pct(ms, q)
    return out


WORDS = ("the quick brown fox jumps over a lazy dog while water boils at one hundred degrees "
         "and people ask what the capital of france is on a sunny day in the park").split()


def synthetic_prompts(n: int, words: tuple[int, int] = (8, 64), seed: int = 0) -> list[str]:
    """``n`` prompts of a random number of common words (fixed seed; nothing downloaded)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) for _ in range(n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", help="model id to send (default: the server's first model)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--rates", default="inf", help="comma-separated requests/s (inf = burst)")
    p.add_argument("--concurrency", type=int)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", default="8,64", help="min,max words per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key")
    a = p.parse_args(argv)
    model = a.model
    if model is None:
        headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
        model = httpx.get(a.url.rstrip("/") + "/v1/models", headers=headers).json()["data"][0]["id"]
    lo, hi = (int(x) for x in a.prompt_words.split(","))
    prompts = synthetic_prompts(a.num_prompts, (lo, hi), a.seed)
    cols = ("rate", "completed", "request_throughput", "output_throughput", "mean_ttft_ms",
            "p50_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p50_itl_ms", "p99_itl_ms",
            "p50_e2e_ms")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---:|" * len(cols))
    for rate in (float(x) for x in a.rates.split(",")):
        records, wall = run_load(a.url, prompts, model=model, max_tokens=a.max_tokens,
                                 rate=rate, concurrency=a.concurrency, seed=a.seed,
                                 api_key=a.api_key)
        s = {"rate": rate, **summarize(records, wall)}
        print("| " + " | ".join(f"{s[c]:.2f}" if isinstance(s[c], float) else str(s[c])
                                for c in cols) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

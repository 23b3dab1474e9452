"""Test helpers for the HTTP server: a tiny trained tokenizer (with a chat template) for the
random checkpoints, and FakeLLM, a stand-in that follows DESIGN.md's serving contract
(submit / iteration / cancel / stats) with a deterministic toy "model", so the HTTP layer's
own behaviour (fields, errors, cancellation, backpressure, health) is tested on its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

from parallax.errors import PromptError, SamplingError

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog. Water boils at 100 degrees.",
          "Hello, how are you? I am fine, thank you. What is the capital of France?",
          "Paris is the capital of France; Berlin is the capital of Germany. 0123456789"]


def make_tokenizer(folder: str) -> int:
    """Train a byte-level BPE on a few sentences and save tokenizer.json and
    tokenizer_config.json (ChatML template, eos <|im_end|> = id 2) into ``folder``.
    Returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE}, f)
    return tok.get_vocab_size()


# ---------------------------------------------------------------------- FakeLLM
@dataclass
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: str | None


class FakeRequest:
    """A request handle: sync and async iteration over deltas, cancel(), result()."""

    def __init__(self, llm: "FakeLLM", ids: list[int], kw: dict):
        self.llm, self.ids, self.kw = llm, ids, kw
        self.deltas: list[Delta] = []
        self.generated: list[int] = []
        self.finished = threading.Event()
        self.cancelled = False
        self.scheduled = False
        self._cond = threading.Condition()
        self._waiters: list = []       # (loop, asyncio.Event) of async consumers

    def _push(self, d: Delta) -> None:
        with self._cond:
            self.deltas.append(d)
            if d.finish_reason is not None:
                self.finished.set()
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, ev in waiters:
            loop.call_soon_threadsafe(ev.set)

    def cancel(self) -> None:
        self.llm._cancel(self)

    def __iter__(self):
        i = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: len(self.deltas) > i or self.cancelled)
                if len(self.deltas) <= i:
                    return
                d = self.deltas[i]
            i += 1
            yield d
            if d.finish_reason is not None:
                return

    async def __aiter__(self):
        loop, ev = asyncio.get_running_loop(), asyncio.Event()
        with self._cond:
            self._waiters.append((loop, ev))
        i = 0
        while True:
            with self._cond:
                have = len(self.deltas) > i
                d = self.deltas[i] if have else None
                stop = not have and self.cancelled
                if not have:
                    ev.clear()
            if stop:
                return
            if d is None:
                await ev.wait()
                continue
            i += 1
            yield d
            if d.finish_reason is not None:
                return

    def result(self):
        self.finished.wait()
        text = "".join(d.text for d in self.deltas)
        return SimpleNamespace(text=text, token_ids=list(self.generated),
                               finish_reason=self.deltas[-1].finish_reason,
                               usage=SimpleNamespace(prompt_tokens=len(self.ids),
                                                     completion_tokens=len(self.generated)))


class FakeLLM:
    """Deterministic toy engine: token t of a greedy request is 3 + (7 sum(prompt) + 13 t) %
    (vocab - 3) (never a special token); a sampled one draws from random.Random(seed) (or
    fresh entropy). Each step (``step_s``) advances up to ``max_running`` requests by one
    token; the rest wait. Stop strings and max_new_tokens end a request as the contract
    says; ``kill()`` makes stats() raise and ``stall()`` stops the loop while keeping
    stats() answering."""

    def __init__(self, tokenizer, context: int = 256, step_s: float = 0.002,
                 max_running: int = 4):
        vocab = tokenizer.vocab_size
        self.tokenizer = tokenizer
        self.config = SimpleNamespace(max_position_embeddings=context, vocab_size=vocab)
        self.vocab, self.step_s, self.max_running = vocab, step_s, max_running
        self.lock = threading.Lock()
        self.waiting: list[FakeRequest] = []
        self.running: list[FakeRequest] = []
        self.submitted: list[FakeRequest] = []
        self.counters = dict(prompt_tokens=0, generation_tokens=0, num_preemptions=0,
                             prefix_cache_queries=0, prefix_cache_hits=0)
        self.dead = False
        self.stalled = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    # contract
    def submit(self, prompt, max_new_tokens: int = 32, temperature: float = 0.0,
               top_k=None, top_p: float = 1.0, seed=None, stop=None, ignore_eos=False,
               chat=None, repetition_penalty: float = 1.0, stop_token_ids=None) -> FakeRequest:
        if isinstance(prompt, str):
            prompt = self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        if not ids:
            raise PromptError("a prompt is empty; give at least one token")
        if any(not 0 <= t < self.vocab for t in ids):
            raise PromptError(f"token ids outside the vocabulary [0, {self.vocab})")
        if temperature < 0:
            raise SamplingError("temperature must be >= 0")
        limit = self.config.max_position_embeddings
        if len(ids) + max_new_tokens > limit:
            raise PromptError(f"prompt has {len(ids)} tokens; with max_new_tokens="
                              f"{max_new_tokens} that exceeds the model's context of {limit}")
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                  top_p=top_p, seed=seed, stop=stop, ignore_eos=ignore_eos, chat=chat,
                  repetition_penalty=repetition_penalty, stop_token_ids=stop_token_ids)
        r = FakeRequest(self, ids, kw)
        r.rng = random.Random(seed) if temperature > 0 else None
        with self.lock:
            self.waiting.append(r)
            self.submitted.append(r)
        return r

    def stats(self) -> dict:
        if self.dead:
            raise RuntimeError("engine loop died")
        with self.lock:
            return dict(num_requests_running=len(self.running),
                        num_requests_waiting=len(self.waiting),
                        kv_cache_usage=len(self.running) / self.max_running,
                        kv_cache_tokens=self.max_running * self.config.max_position_embeddings,
                        **self.counters)

    # test controls
    def kill(self) -> None:
        self.dead = True

    def stall(self) -> None:
        self.stalled.set()

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)

    # the toy engine
    def _cancel(self, r: FakeRequest) -> None:
        """As the engine does: drop it from the queues and end it with an "abort" delta."""
        with self.lock:
            queued = [q for q in (self.waiting, self.running) if r in q]
            for q in queued:
                q.remove(r)
            r.cancelled = True
        if not r.finished.is_set():
            r._push(Delta("", [], "abort"))

    def _next_token(self, r: FakeRequest) -> int:
        if r.rng is not None:
            return r.rng.randrange(3, self.vocab)
        return 3 + (7 * sum(r.ids) + 13 * len(r.generated)) % (self.vocab - 3)

    def _loop(self) -> None:
        while not self.stopping.wait(self.step_s):
            if self.dead or self.stalled.is_set():
                continue
            with self.lock:
                while self.waiting and len(self.running) < self.max_running:
                    r = self.waiting.pop(0)
                    self.running.append(r)
                    self.counters["prompt_tokens"] += len(r.ids)
                batch = list(self.running)
            for r in batch:
                self._advance(r)

    def _advance(self, r: FakeRequest) -> None:
        t = self._next_token(r)
        r.generated.append(t)
        piece = self.tokenizer.decode([t]) if t >= 3 else ""
        text_before = "".join(d.text for d in r.deltas)
        text = text_before + piece
        reason = None
        for s in r.kw["stop"] or ():
            if s in text:
                piece, reason = text[:text.index(s)][len(text_before):], "stop"
                break
        stop_ids = set(r.kw["stop_token_ids"] or ())
        if reason is None and (t in stop_ids or (t == 2 and not r.kw["ignore_eos"])):
            reason = "stop"
        if reason is None and len(r.generated) >= r.kw["max_new_tokens"]:
            reason = "length"
        with self.lock:
            self.counters["generation_tokens"] += 1
            if reason is not None and r in self.running:
                self.running.remove(r)
        r._push(Delta(piece, [t], reason))


def wait_until(pred, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()

"""The user-facing surface: ``LLM`` and ``Completion``.

``LLM`` validates everything it can in the calling process (paths, layout, prompts,
sampling values) before any worker is involved, then drives the Engine(s): in-process for
one device or under torchrun (SPMD), or through a WorkerPool of spawned processes.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from .engine.runner import Engine, parse_dtype
from .errors import ParallaxError, PromptError, SamplingError
from .generation import GenerationConfig, SequenceOutput
from .loading import DEFAULT_MODEL, load_tokenizer, open_checkpoint
from .parallel import collectives as C
from .parallel.context import DEFAULT_TIMEOUT_S, ParallelContext, launched_by_torchrun
from .parallel.sharding import check_layout
from .sampling import SamplingParams

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]


@dataclass
class Completion:
    """One generated answer."""
    text: str
    token_ids: list[int]
    finish_reason: str                # "length" | "stop"
    prompt_tokens: int
    time_to_first_token_s: float
    tokens_per_s: float               # decode speed after the first token

    @classmethod
    def _from(cls, out: SequenceOutput) -> "Completion":
        return cls(out.text, out.token_ids, out.finish_reason, out.prompt_tokens,
                   out.time_to_first_token_s, out.decode_tokens_per_s)


class LLM:
    """A model spread over ``tp * pp`` ranks, with ``generate``, ``stream`` and ``logits``.

    Args:
        model: HF checkpoint folder, ``.gguf`` file, or ``"smollm2-135m"``.
        tp, pp: tensor- and pipeline-parallel sizes (world = tp * pp processes).
        dtype: "float32" | "bfloat16" | "float16" weights and activations.
        device: "cpu" or "cuda".
        layer_split: per-stage layer counts (default: balanced by decode cost, parallel/sharding.py).
        quantize: None or "int8" (weight-only, per-channel scales).
        micro_batches: micro-batches in flight in the pipeline (default: pp).
        timeout_s: how long a collective or a worker may stall before it is an error.
        threads_per_rank: torch threads per worker process (default: cores / world).
    """

    def __init__(self, model: str = DEFAULT_MODEL, tp: int = 1, pp: int = 1,
                 dtype: str | torch.dtype = "float32", device: str = "cpu", *,
                 layer_split: list[int] | None = None, quantize: str | None = None,
                 micro_batches: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 threads_per_rank: int | None = None):
        self._engine: Engine | None = None
        self._pool = None
        parse_dtype(dtype)
        if quantize not in (None, "int8"):
            raise ParallaxError(f"quantize={quantize!r} is not supported; use None or 'int8'")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ParallaxError("device='cuda' but torch sees no GPU; use device='cpu'")
        if micro_batches is not None and micro_batches < 1:
            raise ParallaxError(f"micro_batches must be >= 1, got {micro_batches}")
        # Read only the config (and tokenizer) here: the layout is checked before any weight.
        ckpt = open_checkpoint(model)
        try:
            self.config = ckpt.config
            check_layout(self.config, tp, pp, layer_split)
            self.tokenizer = load_tokenizer(model, ckpt)
            self.tp, self.pp = tp, pp
            args = (model, dtype, layer_split, quantize, micro_batches)
            if tp * pp == 1:
                self._ctx = ParallelContext.single(device)
                self._engine = Engine(self._ctx, *args, tokenizer=self.tokenizer, checkpoint=ckpt)
            elif launched_by_torchrun():
                self._ctx = ParallelContext.from_torchrun_env(tp, pp, device, timeout_s)
                self._engine = Engine(self._ctx, *args, tokenizer=self.tokenizer, checkpoint=ckpt)
            else:
                from .parallel.launch import WorkerPool
                self._pool = WorkerPool(Engine, args, tp_size=tp, pp_size=pp, device=device,
                                        timeout_s=timeout_s, threads_per_rank=threads_per_rank)
        finally:
            ckpt.close()

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: Prompt | list[Prompt], max_new_tokens: int = 32,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
                 seed: int | None = None, stop: str | list[str] | None = None,
                 ignore_eos: bool = False, chat: bool | None = None,
                 repetition_penalty: float = 1.0,
                 stop_token_ids: list[int] | None = None) -> list[Completion]:
        """Generate for each prompt (a string or a list of token ids); one Completion each, in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids, cfg = self._prepare(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop,
                                 ignore_eos, chat, repetition_penalty, stop_token_ids)
        return [Completion._from(o) for o in self._run("generate", ids, cfg)]

    def stream(self, prompt: Prompt, max_new_tokens: int = 32, **kwargs: Any) -> Iterator[str]:
        """Yield the answer to one prompt piece by piece, as it is generated."""
        ids, cfg = self._prepare([prompt], max_new_tokens, **kwargs)
        for _, piece in self._run_stream(ids, cfg):
            yield piece

    def logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """float32 (batch, seq, vocab) logits on the CPU for token-id prompts (ragged: NaN past
        each prompt's end)."""
        ids = [self._check_ids(p) for p in prompts]
        return self._run("logits", ids)

    def generation_stats(self) -> list[dict]:
        """Per-rank ``busy_s`` / ``wall_s`` of the last generate; sum(busy) / (ranks * wall)
        is the pipeline's busy fraction."""
        return self._run("generation_stats")

    def memory(self) -> list[dict]:
        """Per-rank weight bytes and peak resident memory."""
        return self._run("all_memory")

    def close(self) -> None:
        """Shut down worker processes (idempotent)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._engine is not None:
            self._ctx.destroy()
            self._engine = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ plumbing
    def _run(self, method: str, *args):
        if self._pool is not None:
            return self._pool.call(method, *args)
        if self._engine is None:
            raise ParallaxError("this LLM is closed; build a new one")
        out = getattr(self._engine, method)(*args)
        # SPMD (torchrun): the driver's result goes to every rank.
        return C.broadcast_object(out, self._ctx, self._ctx.driver_rank)

    def _run_stream(self, ids: list[list[int]], cfg: GenerationConfig) -> Iterator[tuple[int, str]]:
        if self._pool is not None:
            yield from self._pool.call_stream("generate", ids, cfg)
            return
        if self._engine is None:
            raise ParallaxError("this LLM is closed; build a new one")
        if self._ctx.world_size > 1:
            # torchrun: pieces appear on the driver rank only; every rank gets them at the end.
            pieces: list = []
            self._engine.generate(ids, cfg, emit=pieces.append)
            yield from C.broadcast_object(pieces, self._ctx, self._ctx.driver_rank)
            return
        yield from _stream_in_thread(self._engine, ids, cfg)

    def _prepare(self, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=1.0,
                 seed=None, stop=None, ignore_eos=False, chat=None, repetition_penalty=1.0,
                 stop_token_ids=None):
        if not prompts:
            raise PromptError("no prompts given; pass a string, a list of token ids, or a list of those")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        sampling = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if any(not isinstance(s, str) or not s for s in stops):
            raise SamplingError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        if stops and self.tokenizer is None:
            raise SamplingError("stop strings need a tokenizer and this checkpoint has none; "
                                "use stop_token_ids")
        stop_ids = set(stop_token_ids or ())
        if not ignore_eos:
            stop_ids |= set(self.config.eos_token_ids)
            if self.tokenizer is not None:
                stop_ids |= set(self.tokenizer.eos_token_ids)
        ids = [self._encode(p, chat) for p in prompts]
        limit = self.config.max_position_embeddings
        for i, p in enumerate(ids):
            if len(p) + max_new_tokens > limit:
                raise PromptError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that "
                    f"exceeds the model's context of {limit} tokens. Shorten the prompt or lower "
                    f"max_new_tokens to at most {limit - len(p)}")
        return ids, GenerationConfig(max_new_tokens, sampling, frozenset(stop_ids), stops)

    def _encode(self, prompt: Prompt, chat: bool | None) -> list[int]:
        if not isinstance(prompt, str):
            return self._check_ids(prompt)
        if self.tokenizer is None:
            raise PromptError("this checkpoint has no tokenizer.json; pass prompts as token ids")
        if chat is None:
            chat = self.tokenizer.has_chat_template
        if chat:
            if not self.tokenizer.has_chat_template:
                raise PromptError("chat=True but the model has no chat template; use chat=False")
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = self.tokenizer.encode(prompt)
        if not ids:
            raise PromptError("the prompt is empty after tokenization; give at least one token")
        return ids

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(t) for t in ids]
        if not ids:
            raise PromptError("a prompt is empty; give at least one token")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise PromptError(f"token ids {bad[:5]} are outside the vocabulary "
                              f"[0, {self.config.vocab_size})")
        return ids


def _stream_in_thread(engine: Engine, ids, cfg) -> Iterator[tuple[int, str]]:
    """Run a local generate in a thread and yield its emitted pieces as they come."""
    q: queue.Queue = queue.Queue()
    done = object()

    def work() -> None:
        try:
            engine.generate(ids, cfg, emit=q.put)
            q.put(done)
        except BaseException as e:     # re-raised in the caller's thread
            q.put(e)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
    t.join()

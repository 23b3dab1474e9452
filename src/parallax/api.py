"""The user-facing surface: ``LLM``, ``Completion`` and request handles.

``LLM`` validates everything it can in the calling process (paths, layout, prompts,
sampling values) before any worker is involved. It owns one serving engine
(engine/core.py): a scheduler and paged-KV block manager in this process, a background
thread that steps them, and a ModelRunner per rank reached in-process (one device), through
a WorkerPool of spawned processes (tp * pp > 1), or by broadcasting each step's plan
(torchrun, SPMD). Every entry point (generate, stream, chat, submit) feeds that engine.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Iterator, Sequence

import torch

from . import defaults as D
from . import ops
from .engine.block_manager import BlockManager
from .engine.core import EngineCore, LocalExecutor, PoolExecutor, in_own_thread
from .engine.handle import RequestHandle
from .engine.request import Completion, Delta, StopConditions, Usage
from .engine.runner import ModelRunner, parse_dtype
from .engine.scheduler import Scheduler
from .engine.spmd import Follower, SpmdExecutor
from .errors import EngineDeadError, ParallaxError, PromptError, SamplingError
from .loading import DEFAULT_MODEL, load_tokenizer, open_checkpoint
from .models.loader import check_tensor_names
from .parallel import collectives as C
from .parallel.context import (DEFAULT_TIMEOUT_S, ParallelContext, control_group,
                               launched_by_torchrun)
from .parallel.sharding import check_expert_layout, check_layout
from .sampling import SamplingParams

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]

__all__ = ["LLM", "Completion", "Delta", "RequestHandle", "Usage"]

_CPU_KV_BUDGET = 1 << 30    # default KV cache bytes per rank on the CPU, at most


def _runner_with_ep(ep: int, ctx: ParallelContext, *args: Any) -> ModelRunner:
    """A worker's ModelRunner with the expert-parallel size set on its context."""
    ctx.ep_size = ep
    return ModelRunner(ctx, *args)


class LLM:
    """A model spread over ``tp * pp`` ranks, served by one continuous-batching engine.

    Args:
        model: HF checkpoint folder, ``.gguf`` file, or ``"smollm2-135m"``.
        tp: tensor-parallel size: ranks that split every layer (attention by whole KV groups).
        pp: pipeline-parallel size: stages of contiguous layers (world = tp * pp processes).
        ep: expert parallelism of a mixture-of-experts model: its experts are split into
            ``ep`` groups over the ranks of each tp group (ep divides tp; ep == tp: each rank
            holds whole experts; default 1: every expert cut like a dense MLP). docs/models.md.
        dtype: "float32" | "bfloat16" | "float16" weights and activations.
        device: "cpu" or "cuda".
        layer_split: per-stage layer counts (default: balanced by decode cost, parallel/sharding.py).
        quantize: None or "int8" (weight-only, per-channel scales).
        micro_batches: under pp, each step's batch is cut into this many micro-batches (by
            tokens) that flow through the stages one behind the other (default 1: the
            engine keeps ``pp`` steps in flight over disjoint requests instead).
        timeout_s: how long a collective or a worker may stall before it is an error.
        threads_per_rank: torch threads per worker process (default: cores / world).
        max_num_seqs: requests decoded together at most (default 64).
        max_num_batched_tokens: tokens computed per engine step at most; longer prompts are
            prefilled in chunks (default 512).
        kv_cache_tokens: KV cache capacity in tokens; None sizes it from memory (on the
            CPU: at most 1 GiB per rank and 10% of available memory, and no more than
            ``max_num_seqs`` full contexts).
        block_size: tokens per KV cache block (default 16).
        prefix_caching: reuse the KV blocks of prompt prefixes seen before (default True).
        executor: how tp * pp > 1 ranks run outside torchrun: "pool" (spawned processes on
            this machine) or "ray" (Ray actors in a placement group, parallel/ray_executor.py);
            None: "ray" inside a Ray task or actor (a Ray Serve replica), else "pool".

    Raises:
        LayoutError: tp/pp the model cannot take (found before any worker starts).
        CheckpointError: a bad path, a corrupt file or an unsupported architecture or config.
        ParallaxError: any other bad setting.
    """

    def __init__(self, model: str = DEFAULT_MODEL, tp: int = D.TP, pp: int = D.PP,
                 dtype: str | torch.dtype = D.DTYPE, device: str = D.DEVICE, *,
                 layer_split: list[int] | None = None, quantize: str | None = None,
                 micro_batches: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 threads_per_rank: int | None = None, max_num_seqs: int = D.MAX_NUM_SEQS,
                 max_num_batched_tokens: int = D.MAX_NUM_BATCHED_TOKENS,
                 kv_cache_tokens: int | None = None,
                 block_size: int = 16, prefix_caching: bool = True,
                 executor: str | None = None, ep: int = 1):
        self._core: EngineCore | None = None
        self._follower: Follower | None = None
        self._runner: ModelRunner | None = None
        self._pool = None
        self._closed = False
        torch_dtype = parse_dtype(dtype)
        if quantize not in (None, "int8"):
            raise ParallaxError(f"quantize={quantize!r} is not supported; use None or 'int8'")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ParallaxError("device='cuda' but torch sees no GPU; use device='cpu'")
        if executor not in (None, "pool", "ray"):
            raise ParallaxError(f"executor={executor!r} is not supported; use 'pool' or 'ray'")
        if micro_batches is not None and micro_batches < 1:
            raise ParallaxError(f"micro_batches must be >= 1, got {micro_batches}")
        for name, value in (("max_num_seqs", max_num_seqs), ("block_size", block_size),
                            ("max_num_batched_tokens", max_num_batched_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ParallaxError(f"{name} must be an integer >= 1, got {value!r}")
        if kv_cache_tokens is not None and (not isinstance(kv_cache_tokens, int)
                                            or kv_cache_tokens < block_size):
            raise ParallaxError(f"kv_cache_tokens must be an integer >= block_size "
                                f"({block_size}), got {kv_cache_tokens!r}")
        # Read only the config (and tokenizer) here: the layout is checked before any weight.
        ckpt = open_checkpoint(model)
        try:
            self.config = ckpt.config
            check_layout(self.config, tp, pp, layer_split)
            check_expert_layout(self.config, tp, ep)
            check_tensor_names(ckpt)        # before any worker starts
            self.tokenizer = load_tokenizer(model, ckpt)
            self.tp, self.pp, self.ep = tp, pp, ep
            if kv_cache_tokens is None:
                kv_cache_tokens = self._default_kv_tokens(torch_dtype, device, max_num_seqs)
            num_blocks = max(1, kv_cache_tokens // block_size)
            args = (model, dtype, layer_split, quantize, num_blocks, block_size)
            if tp * pp == 1:
                self._ctx = ParallelContext.single(device)
                # Loaded in a thread of its own (see engine.core.in_own_thread).
                self._runner = in_own_thread(lambda: ModelRunner(self._ctx, *args, checkpoint=ckpt))
                steps = LocalExecutor(self._runner)
            elif launched_by_torchrun():
                self._ctx = ctx = ParallelContext.from_torchrun_env(tp, pp, device, timeout_s)
                ctx.ep_size = ep
                # Every rank's cache must have the driver's size (free memory differs a bit).
                num_blocks = C.broadcast_object(num_blocks, ctx, ctx.driver_rank)
                control = control_group(ctx)          # the driver's messages (engine/spmd.py)
                args = (model, dtype, layer_split, quantize, num_blocks, block_size)
                self._runner = in_own_thread(lambda: ModelRunner(ctx, *args, checkpoint=ckpt))
                # The driver rank schedules and broadcasts; the others follow in a thread.
                steps = SpmdExecutor(self._runner, control, depth=pp) if ctx.is_driver \
                    else LocalExecutor(self._runner)
            else:
                from .parallel.ray_executor import inside_ray_worker
                if executor == "ray" or (executor is None and inside_ray_worker()):
                    from .parallel.ray_executor import RayExecutor as Ranks
                else:
                    from .parallel.launch import WorkerPool as Ranks
                factory = ModelRunner if ep == 1 else functools.partial(_runner_with_ep, ep)
                self._pool = Ranks(factory, args, tp_size=tp, pp_size=pp, device=device,
                                   timeout_s=timeout_s, threads_per_rank=threads_per_rank)
                steps = PoolExecutor(self._pool, depth=pp)
        finally:
            ckpt.close()
        self._executor = steps
        if prefix_caching and ops.ggml.enabled():
            # llama.cpp computes every prompt in full; a cached prefix would change how many
            # rows a prefill has, and with it ggml's attention algorithm (ops/ggml.py)
            logger.info("PARALLAX_NUMERICS=ggml: prefix caching off")
            prefix_caching = False
        bm = BlockManager(num_blocks, block_size, prefix_caching,
                          window=self.config.cache_window)
        scheduler = Scheduler(bm, max_num_seqs, max_num_batched_tokens, steps.depth)
        make_decoder = None
        if self.tokenizer is not None:
            from .loading.tokenizer import IncrementalDecoder
            tok = self.tokenizer
            make_decoder = lambda: IncrementalDecoder(tok)   # noqa: E731
        # pp steps in flight already keep the stages busy: one micro-batch per step unless
        # asked (micro-batches flow through the stages one behind the other).
        self._core = EngineCore(steps, bm, scheduler, make_decoder,
                                micro_batches=(micro_batches or 1) if pp > 1 else 1)
        if self._spmd and not self._ctx.is_driver:
            self._follower = Follower(self._runner, control)
        else:
            self._core.start()
        logger.info("KV cache: %d blocks of %d tokens (%d tokens)", num_blocks, block_size,
                    num_blocks * block_size)

    def _default_kv_tokens(self, dtype: torch.dtype, device: str, max_num_seqs: int) -> int:
        """Capacity from memory: the largest rank's KV bytes per token against a budget."""
        cfg = self.config
        layers = -(-cfg.num_layers // self.pp)
        kv_heads = -(-cfg.num_kv_heads // self.tp)
        per_token = 2 * layers * kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()
        if device.startswith("cuda"):
            budget = int(0.5 * torch.cuda.mem_get_info()[0])
        else:
            budget = min(_CPU_KV_BUDGET, int(0.1 * _available_memory_bytes()))
        return max(16, min(budget // per_token, max_num_seqs * cfg.max_position_embeddings))

    @property
    def _spmd(self) -> bool:
        return self._pool is None and self._runner is not None and self._ctx.world_size > 1

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: Prompt | list[Prompt], max_new_tokens: int = D.MAX_NEW_TOKENS,
                 temperature: float = D.TEMPERATURE, top_k: int | None = None, top_p: float = D.TOP_P,
                 seed: int | None = None, stop: str | list[str] | None = None,
                 ignore_eos: bool = False, chat: bool | None = None,
                 repetition_penalty: float = D.REPETITION_PENALTY,
                 stop_token_ids: list[int] | None = None, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, logprobs: int | None = None) -> list[Completion]:
        """Generate for each prompt; one Completion each, in order.

        All prompts are submitted to the engine at once and their results awaited; each
        answer equals the one the prompt would get alone.

        Args:
            prompts: a prompt or a list of prompts; a prompt is a string or a list of token
                ids (ragged lengths are fine).
            max_new_tokens: tokens to generate at most per prompt (>= 1).
            temperature: 0 is greedy; > 0 samples from softmax(logits / temperature).
            top_k: sample among the k most likely tokens only (None: all).
            top_p: sample among the smallest set of tokens whose probability reaches top_p,
                in (0, 1]; 1 is off.
            seed: seed of the sampler; prompt i is seeded with ``seed + i`` (None: random).
            stop: a string or strings that end the answer (not included in the text).
            ignore_eos: keep generating past the end-of-sequence token.
            chat: apply the model's chat template to string prompts; None applies it when the
                model has one. Message lists go to ``LLM.chat``.
            repetition_penalty: > 1 makes tokens already in the prompt or answer less likely.
            stop_token_ids: token ids that end the answer (included in ``token_ids``).
            presence_penalty: OpenAI's, in [-2, 2]: lowers the logit of every token generated
                so far once (0: off; see ``SamplingParams``).
            frequency_penalty: OpenAI's, in [-2, 2]: lowers each token's logit once per time
                it was generated so far (0: off).
            logprobs: return each generated token's log-probability and those of its
                ``logprobs`` most likely alternatives (0..20) in ``Completion.logprobs``
                (and ``Delta.logprobs``); None: off.

        Returns:
            One Completion per prompt, in order.

        Raises:
            PromptError: an empty prompt, ids outside the vocabulary, chat messages, or a
                prompt plus max_new_tokens longer than the model's context.
            SamplingError: a sampling value out of range.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids, sampling, stops = self._prepare(prompts, max_new_tokens, temperature, top_k,
                                             top_p, seed, stop, ignore_eos, chat,
                                             repetition_penalty, stop_token_ids,
                                             presence_penalty, frequency_penalty, logprobs)
        return self._run_all(ids, sampling, stops)

    def submit(self, prompt: Prompt, max_new_tokens: int = D.MAX_NEW_TOKENS, **kwargs: Any) -> RequestHandle:
        """Queue one request and return its handle at once. Thread-safe.

        Takes ``generate``'s keyword arguments (temperature, top_k, top_p, seed, stop,
        ignore_eos, chat, repetition_penalty, stop_token_ids, presence_penalty,
        frequency_penalty, logprobs) for one prompt.
        Iterate the handle (``for`` or ``async for``) for Deltas, call ``result()`` for the
        Completion, ``cancel()`` to stop it (its KV blocks are freed within one step).
        Under torchrun only the driver rank (tp rank 0 of the last stage, global rank
        ``(pp - 1) * tp``) submits: the other ranks run its steps in a background thread
        and wait in ``close()`` until the driver closes.

        Args:
            prompt: a string or a list of token ids.
            max_new_tokens: tokens to generate at most (>= 1).

        Raises:
            PromptError, SamplingError: as ``generate``.
        """
        if self._follower is not None:
            raise ParallaxError(
                f"under torchrun only the driver rank (rank {self._ctx.driver_rank}) takes "
                f"submit(); this is rank {self._ctx.rank}, which runs the driver's steps. Call "
                f"submit() on rank {self._ctx.driver_rank} only, or generate()/stream() on every rank")
        ids, sampling, stops = self._prepare([prompt], max_new_tokens, **kwargs)
        return self._engine().submit(ids[0], sampling[0], stops)

    def stream(self, prompt: Prompt, max_new_tokens: int = D.MAX_NEW_TOKENS, **kwargs: Any) -> Iterator[str]:
        """Yield the answer to one prompt piece by piece, as it is generated.

        Takes ``generate``'s keyword arguments. Leaving the loop early (or dropping the
        iterator) cancels the request.

        Args:
            prompt: a string or a list of token ids.
            max_new_tokens: tokens to generate at most (>= 1).
        """
        if self._follower is not None:   # torchrun: the driver's pieces, once it is done
            ids, _, stops = self._prepare([prompt], max_new_tokens, **kwargs)
            self._engine().scheduler.check_fits(len(ids[0]), stops.max_new_tokens)   # as the driver
            yield from self._follower.result()
            return
        handle = self.submit(prompt, max_new_tokens, **kwargs)
        pieces: list[str] = []
        try:
            for d in handle:
                if d.text:
                    pieces.append(d.text)
                    yield d.text
        finally:
            handle.cancel()
            if self._spmd:
                self._executor.publish(True, pieces)

    def chat(self, messages: list[dict] | list[list[dict]], max_new_tokens: int = D.MAX_NEW_TOKENS,
             **kwargs: Any) -> Completion | list[Completion]:
        """Answer a conversation with the model's chat template.

        Takes ``generate``'s keyword arguments except ``chat``.

        Args:
            messages: one conversation (a list of ``{"role": ..., "content": ...}`` dicts) or a
                list of conversations.
            max_new_tokens: tokens to generate at most per answer (>= 1).

        Returns:
            A Completion for one conversation, a list of them for a list.

        Raises:
            PromptError: the model has no chat template, or the messages are malformed.
        """
        if self.tokenizer is None or not self.tokenizer.has_chat_template:
            raise PromptError("chat() needs a model with a chat template")
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        if not convs or any(not c or not all(isinstance(m, dict) and "role" in m
                                              and "content" in m for m in c) for c in convs):
            raise PromptError("chat() takes a list of {'role': ..., 'content': ...} messages "
                              "or a list of such lists")
        ids = [self.tokenizer.encode(self.tokenizer.apply_chat_template(c),
                                     add_special_tokens=False) for c in convs]
        outs = self.generate(ids, max_new_tokens, **kwargs)
        return outs[0] if convs is not messages else outs

    def logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """float32 (batch, seq, vocab) logits on the CPU for token-id prompts (ragged: NaN past
        each prompt's end)."""
        ids = [self._check_ids(p) for p in prompts]
        return self._call("logits", ids)

    def stats(self) -> dict:
        """Serving counters: num_requests_running, num_requests_waiting, kv_cache_usage
        (0..1), kv_cache_tokens, num_preemptions, prefix_cache_queries, prefix_cache_hits
        (both in tokens), prompt_tokens, generation_tokens (counters since start).
        Under torchrun, on the driver rank only (it holds the scheduler)."""
        if self._follower is not None:
            raise ParallaxError(f"under torchrun the serving counters live on the driver rank "
                                f"(rank {self._ctx.driver_rank}); call stats() there")
        return self._engine().stats()

    def generation_stats(self) -> list[dict]:
        """Per-rank ``busy_s``: seconds spent inside engine steps since start."""
        return self._call("all_stats")

    def memory(self) -> list[dict]:
        """Per-rank weight bytes, KV cache bytes and peak resident memory."""
        return self._call("all_memory")

    def close(self) -> None:
        """Stop the engine and shut down worker processes (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._core is not None:
            self._core.shutdown()
        if self._spmd and self._follower is None:
            self._executor.stop()                   # release the followers
        elif self._follower is not None:
            self._follower.join()                   # until the driver closes
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._runner is not None:
            self._ctx.destroy()
            self._runner = None

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
    def _engine(self) -> EngineCore:
        if self._closed or self._core is None:
            raise EngineDeadError("this LLM is closed; build a new one")
        return self._core

    def _call(self, method: str, *args):
        """A side call (logits, memory, stats) on every rank; the driver rank's result."""
        self._engine()
        if self._follower is not None:               # torchrun: the driver sends the call
            return self._follower.result()
        return self._executor.call(method, *args)

    def _run_all(self, ids: list[list[int]], sampling: list[SamplingParams],
                 stops: StopConditions) -> list[Completion]:
        core = self._engine()
        for p in ids:        # refuse before anything is queued (on every rank alike)
            core.scheduler.check_fits(len(p), stops.max_new_tokens)
        if self._follower is not None:               # torchrun: the driver's completions
            return self._follower.result()
        try:
            handles = [core.submit(p, s, stops) for p, s in zip(ids, sampling)]
            outs = [h.result() for h in handles]
        except BaseException as exc:
            if self._spmd:
                self._executor.publish(False, exc)
            raise
        if self._spmd:
            self._executor.publish(True, outs)
        return outs

    def _prepare(self, prompts, max_new_tokens, temperature=D.TEMPERATURE, top_k=None, top_p=D.TOP_P,
                 seed=None, stop=None, ignore_eos=False, chat=None, repetition_penalty=D.REPETITION_PENALTY,
                 stop_token_ids=None, presence_penalty=0.0, frequency_penalty=0.0, logprobs=None):
        if not prompts:
            raise PromptError("no prompts given; pass a string, a list of token ids, or a list of those")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        extra = dict(presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                     logprobs=logprobs)
        sampling = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed, **extra)
        per_prompt = [sampling if seed is None else
                      SamplingParams(temperature, top_k, top_p, repetition_penalty, seed + i,
                                     **extra)
                      for i in range(len(prompts))]
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
        return ids, per_prompt, StopConditions(max_new_tokens, frozenset(stop_ids), stops)

    def _encode(self, prompt: Prompt, chat: bool | None) -> list[int]:
        if _is_messages(prompt):
            raise PromptError("generate() and stream() take prompts (a string or token ids); "
                              "a list of {'role', 'content'} messages goes to LLM.chat(messages)")
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


def _is_messages(prompt) -> bool:
    """A chat message, or a conversation, given where a prompt belongs."""
    return isinstance(prompt, dict) or (isinstance(prompt, (list, tuple)) and bool(prompt)
                                        and isinstance(prompt[0], dict))


def _available_memory_bytes() -> int:
    """Memory the OS can give without swapping (MemAvailable), else the free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

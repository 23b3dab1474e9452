"""The generation loop: prefill, then decode one token per step, over micro-batches that
flow through the pipeline stages at the same time.

Every rank runs ``generate`` (SPMD). The driver rank (tp rank 0 of the last stage) samples,
tracks stops and text, and sends each micro-batch's new tokens (plus a "finished" flag) to
every rank outside its tp group, which the first stage feeds back in. With pp = 1 this
reduces to prefill + decode_step on one stage; with pp = P and M >= P micro-batches, stage
k works on micro-batch i while stage k+1 works on i-1 (docs/parallel.md).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .kv_cache import KVCache
from .models.llama import ForwardBatch
from .parallel import collectives as C
from .parallel.context import ParallelContext
from .parallel.sharding import split_evenly
from .sampling import Sampler, SamplingParams


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()


@dataclass
class SequenceOutput:
    token_ids: list[int]
    text: str
    finish_reason: str               # "length" | "stop"
    prompt_tokens: int
    time_to_first_token_s: float
    decode_tokens_per_s: float


@dataclass
class _MicroBatch:
    rows: slice
    lengths: torch.Tensor            # (b,) long prompt lengths
    prompt: torch.Tensor             # (b, T) long, right-padded
    tokens: torch.Tensor | None = None   # (b,) last sampled tokens
    alive: bool = True

    @property
    def size(self) -> int:
        return self.rows.stop - self.rows.start


class _Sequence:
    """Driver-side state of one sequence: its tokens, text and stop checks."""

    def __init__(self, prompt_len: int, cfg: GenerationConfig, decoder, t0: float):
        self.cfg, self.decoder, self.t0 = cfg, decoder, t0
        self.prompt_len = prompt_len
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finish_reason: str | None = None
        self.t_first = self.t_last = t0

    def add(self, token: int, now: float) -> str:
        """Append a token; returns the text that is now safe to stream."""
        if not self.token_ids:
            self.t_first = now
        self.t_last = now
        self.token_ids.append(token)
        if token in self.cfg.stop_token_ids:
            self.finish_reason = "stop"
        elif self.decoder is not None:
            self.text += self.decoder.push(token)
            self._check_stop_strings()
        if self.finish_reason is None and len(self.token_ids) >= self.cfg.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None and self.decoder is not None and \
                self.finish_reason == "length":
            self.text += self.decoder.flush()
        safe = len(self.text) if self.finish_reason else len(self.text) - self._held_back()
        piece, self.emitted = self.text[self.emitted:safe], max(self.emitted, safe)
        return piece

    def _check_stop_strings(self) -> None:
        for stop in self.cfg.stop_strings:
            i = self.text.find(stop, max(0, self.emitted - len(stop)))
            if i >= 0:
                self.text, self.finish_reason = self.text[:i], "stop"
                return

    def _held_back(self) -> int:
        """Length of the longest text suffix that could still grow into a stop string."""
        best = 0
        for stop in self.cfg.stop_strings:
            for n in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def output(self) -> SequenceOutput:
        n = len(self.token_ids)
        decode_s = self.t_last - self.t_first
        return SequenceOutput(self.token_ids, self.text, self.finish_reason or "length",
                              self.prompt_len, self.t_first - self.t0,
                              (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0)


def _step_inputs(mb: _MicroBatch, step: int) -> tuple[torch.Tensor, ForwardBatch]:
    """mb's token ids and positions at ``step``: the padded prompt at 0, then the last token."""
    if step == 0:
        pos = torch.arange(mb.prompt.shape[1], device=mb.prompt.device).expand_as(mb.prompt)
        return mb.prompt, ForwardBatch(pos, rows=mb.rows)
    pos = (mb.lengths + step - 1).unsqueeze(1)                                   # (b, 1)
    return mb.tokens.unsqueeze(1), ForwardBatch(pos, (pos[:, 0] + 1).to(torch.int32), mb.rows)


class _Driver:
    """The sampling rank's part of generate: the sampler, each sequence's state, streaming."""

    def __init__(self, prompts: list[list[int]], cfg: GenerationConfig, tokenizer,
                 cache_len: int, dev: torch.device, t0: float, emit):
        from .loading.tokenizer import IncrementalDecoder
        self.prompts, self.emit = prompts, emit
        self.seqs = [_Sequence(len(p), cfg, IncrementalDecoder(tokenizer) if tokenizer else None, t0)
                     for p in prompts]
        self.sampler = Sampler(cfg.sampling, len(prompts), dev)
        self.seen = None
        if cfg.sampling.repetition_penalty != 1.0:
            # Pad with each row's first token: penalising it twice is the same as once.
            self.seen = torch.tensor([p + [p[0]] * (cache_len - len(p)) for p in prompts], device=dev)

    def sample(self, mb: _MicroBatch, logits: torch.Tensor, step: int) -> tuple[torch.Tensor, bool]:
        """Sample mb's next tokens from (b, V) logits; returns (tokens, all of mb finished)."""
        rows = mb.rows
        seen = None if self.seen is None else self.seen[rows, :int(mb.lengths.max()) + step]
        toks = self.sampler(logits, seen, rows)
        now = time.perf_counter()
        for i, tok in enumerate(toks.tolist(), start=rows.start):
            seq = self.seqs[i]
            if seq.finish_reason is None:
                piece = seq.add(tok, now)
                if piece and self.emit is not None:
                    self.emit((i, piece))
                if self.seen is not None:
                    self.seen[i, len(self.prompts[i]) + step] = tok
        return toks, all(self.seqs[i].finish_reason for i in range(rows.start, rows.stop))

    def outputs(self) -> list[SequenceOutput]:
        return [s.output() for s in self.seqs]


def _pad(prompts: list[list[int]], pad_id: int = 0) -> torch.Tensor:
    width = max(len(p) for p in prompts)
    return torch.tensor([p + [pad_id] * (width - len(p)) for p in prompts], dtype=torch.long)


def _micro_batches(prompts: list[list[int]], n_micro: int, device: torch.device) -> list[_MicroBatch]:
    mbs = []
    for m in range(min(n_micro, len(prompts))):
        start, n = split_evenly(len(prompts), min(n_micro, len(prompts)), m)
        part = prompts[start:start + n]
        mbs.append(_MicroBatch(slice(start, start + n),
                               torch.tensor([len(p) for p in part], device=device),
                               _pad(part).to(device)))
    return mbs


class _Messenger:
    """Moves activations between stages and sampled tokens from the driver to every rank.

    Shapes are known on every rank from the prompts, so nothing but the tensors is sent.
    """

    def __init__(self, ctx: ParallelContext, hidden: int, dtype: torch.dtype, n_micro: int = 1):
        # A pair of ranks carries up to 2 messages per micro-batch per step (tokens and tied
        # embeddings, driver -> stage 0); a shared-memory ring must never fill up, or the
        # sender would wait on a receiver that waits on it.
        if ctx.p2p_shm is not None and 2 * n_micro >= ctx.p2p_shm.RING:
            ctx = dataclasses.replace(ctx, p2p_shm=None)
        self.ctx, self.hidden, self.dtype = ctx, hidden, dtype
        # Ranks outside the driver's tp group get tokens point-to-point.
        self.token_peers = [r for r in range(ctx.world_size)
                            if r // ctx.tp_size != ctx.pp_size - 1]
        self.pending: list = []

    def recv_hidden(self, b: int, t: int) -> torch.Tensor:
        buf = torch.empty(b, t, self.hidden, dtype=self.dtype, device=self.ctx.device)
        return C.recv_prev_stage(buf, self.ctx)

    def send_hidden(self, h: torch.Tensor) -> None:
        self._track(C.send_next_stage(h, self.ctx), h)

    def send_embeddings(self, h: torch.Tensor) -> None:
        """Last stage -> first stage (same tp rank): embeddings when the tied embedding
        lives with the LM head."""
        self._track(C.send_to(h, self.ctx.stage_rank(0), self.ctx), h)

    def recv_embeddings(self, b: int, t: int) -> torch.Tensor:
        buf = torch.empty(b, t, self.hidden, dtype=self.dtype, device=self.ctx.device)
        return C.recv_from(buf, self.ctx.stage_rank(self.ctx.pp_size - 1), self.ctx)

    def share_tokens(self, msg: torch.Tensor) -> torch.Tensor:
        """On the last stage: tp rank 0's (b+1,) message to its tp group and to all other stages."""
        C.broadcast_tp(msg, self.ctx)
        if self.ctx.is_driver:
            for r in self.token_peers:
                self._track(C.send_to(msg, r, self.ctx), msg)
        self._prune()
        return msg

    def recv_tokens(self, b: int) -> torch.Tensor:
        msg = torch.empty(b + 1, dtype=torch.long, device=self.ctx.device)
        return C.recv_from(msg, self.ctx.driver_rank, self.ctx)

    def _track(self, work, tensor: torch.Tensor) -> None:
        """Keep an in-flight send's tensor alive until it completes (None: delivered)."""
        if work is not None:
            self.pending.append((work, tensor))

    def _prune(self) -> None:
        self.pending = [(w, t) for w, t in self.pending if not w.is_completed()]

    def finish(self) -> None:
        for w, _ in self.pending:
            w.wait()
        self.pending.clear()


def generate(model, ctx: ParallelContext, prompts: list[list[int]], cfg: GenerationConfig,
             tokenizer=None, n_micro: int = 1,
             emit: Callable[[tuple[int, str]], None] | None = None,
             stats: dict | None = None) -> list[SequenceOutput] | None:
    """Run generation for a batch of token-id prompts on this rank.

    Returns one SequenceOutput per prompt on the driver rank, None elsewhere. ``emit`` (driver
    only) receives (prompt index, new text) as text becomes safe to show.
    """
    t0 = time.perf_counter()
    dev, dtype = ctx.device, next(model.parameters()).dtype
    b_total = len(prompts)
    cache = KVCache(len(model.layers), b_total, model.num_kv_heads_local,
                    max(map(len, prompts)) + cfg.max_new_tokens, model.cfg.head_dim, dtype, dev)
    mbs = _micro_batches(prompts, n_micro, dev)
    io = _Messenger(ctx, model.cfg.hidden_size, dtype, len(mbs))
    driver = _Driver(prompts, cfg, tokenizer, cache.max_len, dev, t0, emit) if ctx.is_driver else None

    busy = 0.0
    embeds_on_last = model.embeds_on_last_stage
    with torch.inference_mode():
        if embeds_on_last and ctx.is_last_stage:
            for mb in mbs:
                io.send_embeddings(model.embed(mb.prompt))
        for step in range(cfg.max_new_tokens + 1):
            for mb in mbs:
                if not mb.alive:
                    continue
                if step > 0 and not ctx.is_driver and not ctx.is_last_stage:
                    msg = io.recv_tokens(mb.size)
                    mb.tokens, mb.alive = msg[:-1], not bool(msg[-1])
                    if not mb.alive:
                        continue
                if step == cfg.max_new_tokens:
                    continue
                x, fb = _step_inputs(mb, step)
                if not ctx.is_first_stage:
                    x = io.recv_hidden(mb.size, x.shape[1])
                elif embeds_on_last:
                    x = io.recv_embeddings(mb.size, x.shape[1])
                t_busy = time.perf_counter()
                h = model(x, fb, cache)
                if not ctx.is_last_stage:
                    busy += time.perf_counter() - t_busy
                    io.send_hidden(h)
                    continue
                last = h[torch.arange(mb.size, device=dev), mb.lengths - 1] if step == 0 else h[:, 0]
                logits = model.compute_logits(last)                              # (b, V) fp32
                msg = torch.zeros(mb.size + 1, dtype=torch.long, device=dev)
                if driver is not None:
                    msg[:-1], msg[-1] = driver.sample(mb, logits, step)
                busy += time.perf_counter() - t_busy
                io.share_tokens(msg)
                mb.tokens, mb.alive = msg[:-1], not bool(msg[-1])
                if embeds_on_last and mb.alive and step + 1 < cfg.max_new_tokens:
                    io.send_embeddings(model.embed(mb.tokens.unsqueeze(1)))
            if not any(mb.alive for mb in mbs):
                break
        io.finish()
    if stats is not None:
        stats.update(busy_s=busy, wall_s=time.perf_counter() - t0)
    return driver.outputs() if driver is not None else None


def prompt_logits(model, ctx: ParallelContext, prompts: list[list[int]]) -> torch.Tensor | None:
    """Full-vocabulary float32 logits (B, T, V) for each prompt position, on the driver rank
    (None elsewhere). Positions past a prompt's end are NaN."""
    dev, dtype = ctx.device, next(model.parameters()).dtype
    x = _pad(prompts).to(dev)
    b, t = x.shape
    cache = KVCache(len(model.layers), b, model.num_kv_heads_local, t, model.cfg.head_dim, dtype, dev)
    io = _Messenger(ctx, model.cfg.hidden_size, dtype)
    with torch.inference_mode():
        if model.embeds_on_last_stage and ctx.is_last_stage:
            io.send_embeddings(model.embed(x))
        if not ctx.is_first_stage:
            x = io.recv_hidden(b, t)
        elif model.embeds_on_last_stage:
            x = io.recv_embeddings(b, t)
        h = model(x, ForwardBatch(torch.arange(t, device=dev).expand(b, t)), cache)
        if not ctx.is_last_stage:
            io.send_hidden(h)
            io.finish()
            return None
        logits = model.compute_logits(h)
        if not ctx.is_driver:
            return None
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        logits[torch.arange(t, device=dev)[None, :] >= lengths[:, None]] = float("nan")
    return logits.cpu().clone()   # a normal tensor, not an inference-mode one

"""ModelRunner: one rank's model shard, its paged KV cache, and the execution of a step.

Every rank of a layout holds one ModelRunner and executes the same ``StepPlan``s (SPMD):
stage 0 embeds the plan's tokens, each stage runs its layers over the flat batch and hands
the hidden states to the next, the last stage computes logits for the rows the plan
samples, and the driver rank (tp rank 0 of the last stage) samples and returns the tokens.
The scheduler (engine/core.py) runs elsewhere: in the LLM's process, which reaches the
ranks in-process, through the worker pool, or (torchrun) by broadcasting the plan.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass, field

import torch

from ..errors import ParallaxError
from ..loading import open_checkpoint
from ..models.attention import AttentionMetadata
from ..models.loader import build_model
from ..parallel import collectives as C
from ..parallel.context import ParallelContext
from ..parallel.sharding import check_layout
from ..sampling import SampledTokens, Sampler, SamplingParams

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ParallaxError(f"dtype {dtype!r} is not supported; use float32, bfloat16 or float16")


def peak_rss_bytes() -> int:
    """Peak resident memory of this process. VmHWM, not ru_maxrss: the latter survives
    exec, so a spawned worker would report its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class NewRequest:
    """What the sampling rank needs to know about a request it has not seen yet."""
    request_id: int
    sampling: SamplingParams
    prompt_ids: list[int] = field(default_factory=list)   # only for a repetition penalty


@dataclass
class StepPlan:
    """One engine step, the same on every rank (the scheduler's output, made concrete).

    token_ids:    (T,) the new tokens of every scheduled sequence, concatenated.
    seqs:         per sequence (num_computed_tokens, num_new_tokens, block_table).
    sample_rows:  flat indices whose logits give a next token (a sequence's last token).
    sample_ids:   the request id of each sample row.
    new_requests: requests to start sampling state for (driver rank).
    finished:     request ids whose sampling state can go.
    groups:       sequences per micro-batch, in order (sums to len(seqs)); under pp the
                  micro-batches flow through the stages one behind the other, so stage k
                  works on micro-batch i while stage k+1 works on i-1. Empty: one batch.
    """
    token_ids: list[int]
    seqs: list[tuple[int, int, list[int]]]
    sample_rows: list[int]
    sample_ids: list[int]
    new_requests: list[NewRequest] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)

    def micro_batches(self) -> list[tuple[slice, slice]]:
        """(sequence slice, token slice) of each micro-batch."""
        out, s, t = [], 0, 0
        for n in self.groups or [len(self.seqs)]:
            tokens = sum(q for _, q, _ in self.seqs[s:s + n])
            out.append((slice(s, s + n), slice(t, t + tokens)))
            s, t = s + n, t + tokens
        return out


def kv_bytes_per_token(model) -> int:
    """KV cache bytes one token takes on this rank (all its layers, k and v)."""
    dtype = next(model.parameters()).dtype
    return (2 * len(model.layers) * model.num_kv_heads_local * model.cfg.head_dim
            * torch.empty((), dtype=dtype).element_size())


class ModelRunner:
    """One rank's model and KV cache.

    Args:
        ctx: this rank's ParallelContext.
        model: checkpoint path (see ``parallax.LLM``).
        dtype, layer_split, quantize: as ``parallax.LLM``.
        num_blocks, block_size: the paged KV cache, allocated once here.
        checkpoint: an already open checkpoint (closed here), else ``model`` is opened.
    """

    def __init__(self, ctx: ParallelContext, model: str, dtype: str | torch.dtype = "float32",
                 layer_split: list[int] | None = None, quantize: str | None = None,
                 num_blocks: int = 256, block_size: int = 16, checkpoint=None):
        t0 = time.perf_counter()
        self.ctx = ctx
        ckpt = checkpoint if checkpoint is not None else open_checkpoint(model)
        self.config = ckpt.config
        check_layout(self.config, ctx.tp_size, ctx.pp_size, layer_split)
        self.model = build_model(ckpt, ctx, parse_dtype(dtype), layer_split, quantize)
        ckpt.close()
        self.dtype = next(self.model.parameters()).dtype
        self.block_size = block_size
        self.kv_caches = self._allocate_cache(num_blocks)
        per_token = kv_bytes_per_token(self.model)
        logger.info("rank %d: KV cache of %d blocks x %d tokens = %d tokens, %.1f MiB",
                    ctx.rank, num_blocks, block_size, num_blocks * block_size,
                    num_blocks * block_size * per_token / 2**20)
        self.sampler = Sampler(ctx.device) if ctx.is_driver else None
        self.load_time_s = time.perf_counter() - t0
        self.busy_s = 0.0

    def _allocate_cache(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        m = self.model
        shape = (num_blocks, m.num_kv_heads_local, self.block_size, m.cfg.head_dim)
        # Zeros (calloc: pages are touched only when written), not empty: no NaN garbage.
        return [(torch.zeros(shape, dtype=self.dtype, device=self.ctx.device),
                 torch.zeros(shape, dtype=self.dtype, device=self.ctx.device))
                for _ in m.layers]

    # ------------------------------------------------------------------ the step
    def execute(self, plan: StepPlan) -> list[int] | None:
        """Run one step on this rank. The driver rank returns the sampled token of each
        sample row (in order, with their logprobs where asked: ``SampledTokens``); other
        ranks return None."""
        t0 = time.perf_counter()
        if self.sampler is not None:
            for r in plan.new_requests:
                self.sampler.add(r.request_id, r.sampling, r.prompt_ids)
            for rid in plan.finished:
                self.sampler.remove(rid)
        if not plan.seqs:
            return SampledTokens() if self.ctx.is_driver else None
        ids = torch.tensor(plan.token_ids, device=self.ctx.device)
        tokens = SampledTokens()
        pending: list = []
        with torch.inference_mode():
            for seq, tok in plan.micro_batches():
                meta = AttentionMetadata.build(plan.seqs[seq], self.block_size, self.ctx.device)
                h = self._forward(ids[tok], meta, self.kv_caches, pending)
                rows = [r - tok.start for r in plan.sample_rows if tok.start <= r < tok.stop]
                if h is not None and rows:
                    # Every token a sample row (a decode-only batch): no gather copy.
                    every = len(rows) == h.shape[0] and rows[-1] == len(rows) - 1
                    logits = self.model.compute_logits(h if every else h[rows])  # (R, V) fp32
                    if self.sampler is not None:
                        first = sum(1 for r in plan.sample_rows if r < tok.start)
                        tokens += self.sampler(logits, plan.sample_ids[first:first + len(rows)])
            for work, _ in pending:   # keep each sent tensor alive until its send completes
                if work is not None:
                    work.wait()
        self.busy_s += time.perf_counter() - t0
        return tokens if self.ctx.is_driver else None

    def _forward(self, ids: torch.Tensor, meta: AttentionMetadata, kv_caches,
                 pending: list) -> torch.Tensor | None:
        """This stage's part of the forward of one (micro-)batch; the last stage returns the
        normed hidden states (T, d), other stages None (their output went on, its send
        appended to ``pending``)."""
        ctx, model = self.ctx, self.model
        t, hidden = ids.shape[0], model.cfg.hidden_size
        if ctx.is_first_stage:
            x = ids
        else:
            x = C.recv_prev_stage(torch.empty(t, hidden, dtype=self.dtype, device=ctx.device), ctx)
        h = model(x, meta, kv_caches)
        if not ctx.is_last_stage:
            pending.append((C.send_next_stage(h, ctx), h))
            h = None
        return h

    # ------------------------------------------------------------------ other calls
    def logits(self, prompts: list[list[int]]) -> torch.Tensor | None:
        """Full-vocabulary float32 logits (B, T, V) of every prompt position on the driver
        rank (None elsewhere), NaN past each prompt's end. Runs the flat forward over a
        temporary cache of the prompts' size (the serving cache is left alone)."""
        bs = self.block_size
        seqs, start = [], 0
        for p in prompts:
            n = -(-len(p) // bs)
            seqs.append((0, len(p), list(range(start, start + n))))
            start += n
        caches = self._allocate_cache(start)
        meta = AttentionMetadata.build(seqs, bs, self.ctx.device)
        ids = torch.tensor([t for p in prompts for t in p], device=self.ctx.device)
        with torch.inference_mode():
            pending: list = []
            h = self._forward(ids, meta, caches, pending)
            for work, _ in pending:
                if work is not None:
                    work.wait()
            if h is None:
                return None
            flat = self.model.compute_logits(h)                          # (sum T, V)
        if not self.ctx.is_driver:
            return None
        width = max(map(len, prompts))
        out = torch.full((len(prompts), width, flat.shape[-1]), float("nan"))
        offset = 0
        for i, p in enumerate(prompts):
            out[i, :len(p)] = flat[offset:offset + len(p)]
            offset += len(p)
        return out

    def stats(self) -> dict:
        """This rank's busy seconds (time inside steps) since start."""
        return {"rank": self.ctx.rank, "busy_s": self.busy_s}

    def all_stats(self) -> list[dict]:
        return C.all_gather_object(self.stats(), self.ctx)

    def memory(self) -> dict:
        """This rank's weight bytes, KV cache bytes and peak resident memory."""
        tensors = {t.data_ptr(): t for t in self.model.state_dict().values()}   # tied: once
        weights = sum(t.numel() * t.element_size() for t in tensors.values())
        kv = sum(k.numel() * k.element_size() * 2 for k, _ in self.kv_caches)
        return {"rank": self.ctx.rank, "weight_bytes": weights, "kv_cache_bytes": kv,
                "peak_rss_bytes": peak_rss_bytes(), "load_time_s": self.load_time_s,
                "pid": os.getpid()}

    def all_memory(self) -> list[dict]:
        """memory() of every rank, gathered on every rank."""
        return C.all_gather_object(self.memory(), self.ctx)

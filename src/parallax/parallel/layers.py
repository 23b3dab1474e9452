"""Tensor-parallel layers (Megatron style), allocated at shard size.

Every parameter carries ``param.chunks``: the checkpoint pieces (name, dim, start, length)
that, concatenated along dim 0 (or read as one slice), make this rank's shard. The loader
(models/loader.py) reads exactly those pieces, so a rank never materialises a full tensor.
With a size-1 ParallelContext each layer is its plain torch counterpart.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .. import ops
from . import collectives as C
from .context import ParallelContext
from .quant import UNQUANTIZED, QuantMethod
from .sharding import split_evenly


class Chunk(NamedTuple):
    """``[start, start+length)`` of checkpoint tensor ``name`` along ``dim`` (dim None: all)."""
    name: str
    dim: int | None = None
    start: int = 0
    length: int | None = None


def _param(shape: tuple[int, ...], dtype: torch.dtype, chunks: list[Chunk]) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    p.chunks = chunks
    return p


class _Linear(nn.Module):
    """y = x W^T (+ b) on this rank's shard, in float, weight-only int8 or a GGUF block
    format (``quant_method``, set by the loader; parallel/quant.py)."""

    quant_method: QuantMethod = UNQUANTIZED

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype,
                 weight_chunks: list[Chunk], bias_chunks: list[Chunk] | None):
        super().__init__()
        self.weight = _param((out_features, in_features), dtype, weight_chunks)
        self.bias = _param((out_features,), dtype, bias_chunks) if bias_chunks else None
        # Buffers, not plain attributes: state_dict() (and so memory()) counts them.
        self.register_buffer("qweight", None)
        self.register_buffer("scales", None)

    def quantize_int8_(self) -> None:
        """Replace the float weight with int8 + per-output-channel scales (weight-only)."""
        self.qweight, self.scales = ops.quantize_int8(self.weight.data)
        self.weight = None

    def _local(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.qweight is not None:
            return ops.int8_linear(x, self.qweight, self.scales, bias)
        return self.quant_method.apply(self, x, bias)


class ColumnParallelLinear(_Linear):
    """Y_r = X A_r + b_r with A split along its output dim: rank r computes its columns.

    ``pieces`` lists the (checkpoint name, global start row, rows) blocks this rank owns, in
    output order; several checkpoint matrices fused into one matmul (q|k|v, gate|up) are just
    several pieces. No communication: the output stays split (``gather_output=False``).
    """

    def __init__(self, in_features: int, pieces: list[tuple[str, int, int]], dtype: torch.dtype,
                 bias: bool = False):
        out = sum(n for _, _, n in pieces)
        w = [Chunk(f"{name}.weight", 0, s, n) for name, s, n in pieces]
        b = [Chunk(f"{name}.bias", 0, s, n) for name, s, n in pieces] if bias else None
        super().__init__(out, in_features, dtype, w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (..., in) -> (..., out_local)
        return self._local(x, self.bias)


class RowParallelLinear(_Linear):
    """Y = sum_r X_r A_r + b with A split along its input dim; X arrives already split
    (``input_is_parallel``). Partial products are all-reduced over tp; the bias is added
    once, after the reduction. ``reduce=False`` returns the partial product (no bias), for
    callers that sum several of them before one all-reduce (MoE experts)."""

    def __init__(self, name: str, in_start: int, in_local: int, out_features: int,
                 dtype: torch.dtype, ctx: ParallelContext, bias: bool = False, reduce: bool = True):
        if bias and not reduce:
            raise ValueError("a row-parallel bias is added after the reduction: needs reduce=True")
        b = [Chunk(f"{name}.bias")] if bias else None
        super().__init__(out_features, in_local, dtype, [Chunk(f"{name}.weight", 1, in_start, in_local)], b)
        self.ctx, self.reduce = ctx, reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (..., in_local) -> (..., out)
        if not self.reduce:
            return self._local(x, None)
        y = C.all_reduce_tp(self._local(x, None), self.ctx)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split in contiguous row blocks; ids outside this rank's
    block look up zeros, and the all-reduce over tp sums the one real row into place."""

    quant_method: QuantMethod = UNQUANTIZED

    def __init__(self, vocab: int, dim: int, dtype: torch.dtype, ctx: ParallelContext,
                 name: str = "model.embed_tokens.weight"):
        super().__init__()
        self.ctx = ctx
        self.vocab_sizes = [split_evenly(vocab, ctx.tp_size, r)[1] for r in range(ctx.tp_size)]
        self.start, n = split_evenly(vocab, ctx.tp_size, ctx.tp_rank)
        self.weight = _param((n, dim), dtype, [Chunk(name, 0, self.start, n)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:   # (B, T) long -> (B, T, dim)
        if self.ctx.tp_size == 1:
            return self.quant_method.embedding(self, ids)
        local = ids - self.start
        outside = (local < 0) | (local >= self.vocab_sizes[self.ctx.tp_rank])
        x = self.quant_method.embedding(self, local.masked_fill(outside, 0))
        x = x.masked_fill(outside.unsqueeze(-1), 0.0)
        return C.all_reduce_tp(x, self.ctx)


class ParallelLMHead(nn.Module):
    """logits = h E^T with the vocabulary split like VocabParallelEmbedding; the rank-local
    logits are gathered over tp into the full vocabulary. With tied embeddings it reuses the
    embedding's parameter (one tensor in memory; packed for the CPU kernel, the embedding
    reads its rows from the panels); on a pipeline stage without the embedding
    it reads the embedding matrix under ``name``. A tied head shares the embedding's
    ``quant_method`` too."""

    quant_method: QuantMethod = UNQUANTIZED

    def __init__(self, vocab: int, dim: int, dtype: torch.dtype, ctx: ParallelContext,
                 name: str = "lm_head.weight", tied: VocabParallelEmbedding | None = None):
        super().__init__()
        self.ctx = ctx
        self.vocab_sizes = [split_evenly(vocab, ctx.tp_size, r)[1] for r in range(ctx.tp_size)]
        if tied is not None:
            self.weight = tied.weight
        else:
            start, n = split_evenly(vocab, ctx.tp_size, ctx.tp_rank)
            self.weight = _param((n, dim), dtype, [Chunk(name, 0, start, n)])

    def forward(self, h: torch.Tensor) -> torch.Tensor:   # (..., dim) -> (..., vocab) float32
        logits = self.quant_method.apply(self, h).float()
        return C.gather_tp(logits, self.ctx, self.vocab_sizes)

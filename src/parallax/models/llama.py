"""Llama-family decoder (llama, mistral, qwen2) built from tensor-parallel layers.

Design choices:
- One file serves the family: which projections carry a bias, the gate activation and the
  rope variant come from ModelConfig (config.py refuses what this file does not implement).
- q|k|v and gate|up are fused into one column-parallel matmul each (two weight sweeps fewer
  per layer); o_proj and down_proj are row-parallel (one all-reduce each per layer).
- Attention is split by whole KV groups (parallel/sharding.py), so uneven tp splits work.
- The residual stream is carried next to the layer output and folded in by the fused
  add + RMSNorm op, as vLLM does; a pipeline stage hands on their sum.
- A module holds only its pipeline stage's layers (``layers`` range); the embedding lives on
  the first stage, the final norm and LM head on the last.
- Rotary cos/sin are computed per forward from positions (no max-length table), once for
  all layers.
"""

from __future__ import annotations

import math
import torch
from torch import nn

from .. import ops
from ..config import ModelConfig
from ..errors import CheckpointError
from ..parallel.context import ParallelContext
from .attention import AttentionMetadata, PagedAttention
from .fused import layers_plan
from ..parallel.layers import (Chunk, ColumnParallelLinear, ParallelLMHead, RowParallelLinear,
                               VocabParallelEmbedding, _param)
from ..parallel.sharding import head_partition, split_evenly


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, name: str):
        super().__init__()
        self.weight = _param((dim,), dtype, [Chunk(name)])
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: rms_norm(x). With: (rms_norm(x + residual), x + residual)."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """(D/2,) float32 inverse frequencies, with llama3 or linear scaling applied, divided by
    the GGUF frequency factors if any (as llama.cpp does with ``rope_freqs.weight``)."""
    inv = _scaled_inv_freq(cfg)
    if cfg.rope_freq_factors is not None:
        inv = inv / torch.tensor(cfg.rope_freq_factors, dtype=torch.float32, device="cpu")
    return inv


def _scaled_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    # Explicitly on the CPU: the model is built under a meta-device context.
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    kind = rs["rope_type"]
    if kind == "linear":
        return inv / rs["factor"]
    if kind == "llama3":
        factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise CheckpointError(f"rope_scaling type {kind!r} is not supported (llama3, linear are)")


class Attention(nn.Module):
    """q|k|v (one column-parallel matmul) -> PagedAttention -> o_proj (row-parallel).

    Hooks for families that differ only here: ``qkv_pieces`` (where this rank's q/k/v rows
    live in the checkpoint: separate q_proj/k_proj/v_proj here, a fused qkv_proj in Phi-3)
    and ``norm_qk`` (per-head q/k norms before rotary in Qwen3). ``window``: the layer's
    sliding window (``ModelConfig.layer_window``), None for full attention."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, prefix: str, dtype: torch.dtype,
                 window: int | None = None):
        super().__init__()
        part = head_partition(cfg, ctx.tp_size, ctx.tp_rank)
        d = cfg.head_dim
        self.n_q, self.n_kv, self.head_dim = part.n_q, part.n_kv, d
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, self.qkv_pieces(cfg, part, prefix),
                                             dtype, bias=cfg.attention_bias)
        self.o_proj = RowParallelLinear(f"{prefix}.o_proj", part.q_start * d, part.n_q * d,
                                        cfg.hidden_size, dtype, ctx, bias=cfg.o_proj_bias)
        self.attn = PagedAttention(part.n_q, part.n_kv, d, d ** -0.5, window=window,
                                   rope_base=cfg.rope_theta)

    @staticmethod
    def qkv_pieces(cfg: ModelConfig, part, prefix: str) -> list[tuple[str, int, int]]:
        """(checkpoint name, start row, rows) of this rank's q, then k, then v rows."""
        d = cfg.head_dim
        kv = kv_row_runs(part.kv_heads, d)
        return ([(f"{prefix}.q_proj", part.q_start * d, part.n_q * d)]
                + [(f"{prefix}.k_proj", s, n) for s, n in kv]
                + [(f"{prefix}.v_proj", s, n) for s, n in kv])

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, Hq, D), (T, Hk, D) before rotary; the identity for the Llama family."""
        return q, k

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)                                            # (T, (Hq+2Hk)*D)
        q, k, v = qkv.split([self.n_q * self.head_dim, self.n_kv * self.head_dim,
                             self.n_kv * self.head_dim], dim=-1)
        q = q.view(t, self.n_q, self.head_dim)                            # (T, Hq, D)
        k = k.view(t, self.n_kv, self.head_dim)                           # (T, Hk, D)
        v = v.view(t, self.n_kv, self.head_dim)
        q, k = self.norm_qk(q, k)
        out = self.attn(q, k, v, cos, sin, meta, k_cache, v_cache)        # (T, Hq, D)
        return self.o_proj(out.reshape(t, self.n_q * self.head_dim))


def kv_row_runs(kv_heads: tuple[int, ...], d: int) -> list[tuple[int, int]]:
    """Contiguous runs of the given KV heads as (start_row, rows) of a (H*D, ...) matrix."""
    runs: list[tuple[int, int]] = []
    for h in kv_heads:
        if runs and runs[-1][0] + runs[-1][1] == h * d:
            runs[-1] = (runs[-1][0], runs[-1][1] + d)
        else:
            runs.append((h * d, d))
    return runs


# Gate activations other than silu (which has a fused op); names as HF's ``hidden_act``.
GATE_ACTIVATIONS = {
    "gelu": nn.functional.gelu,
    "gelu_new": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "relu": nn.functional.relu,
}


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), gate|up fused and split by columns over tp;
    act is silu (SwiGLU) unless the config names another. ``gate_up_pieces`` is the hook
    for checkpoints that store gate|up fused (Phi-3).

    MoE experts (models/moe.py) are MLPs too: ``rows`` (start, n) of an inner width
    ``width`` this rank holds, checkpoint ``names`` of gate/up/down, and ``reduce=False``
    to return the partial down product that the MoE block all-reduces once."""

    NAMES = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, prefix: str, dtype: torch.dtype,
                 width: int | None = None, rows: tuple[int, int] | None = None,
                 names: tuple[str, str, str] = NAMES, reduce: bool = True):
        super().__init__()
        start, n = rows or split_evenly(width or cfg.intermediate_size, ctx.tp_size, ctx.tp_rank)
        self.names, self.inner = names, n       # inner: this rank's intermediate width
        self.gate_up_proj = ColumnParallelLinear(
            cfg.hidden_size, self.gate_up_pieces(cfg, prefix, start, n), dtype, bias=cfg.mlp_bias)
        self.down_proj = RowParallelLinear(f"{prefix}.{names[2]}", start, n, cfg.hidden_size, dtype,
                                           ctx, bias=cfg.mlp_bias, reduce=reduce)
        self.act = None if cfg.hidden_act == "silu" else GATE_ACTIVATIONS[cfg.hidden_act]

    def gate_up_pieces(self, cfg: ModelConfig, prefix: str, start: int, n: int) -> list[tuple[str, int, int]]:
        """(checkpoint name, start row, rows) of this rank's gate rows, then its up rows."""
        return [(f"{prefix}.{self.names[0]}", start, n), (f"{prefix}.{self.names[1]}", start, n)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)                                    # (..., 2 * F_local)
        if self.act is None:
            return self.down_proj(ops.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    attention_cls = Attention      # hooks for families that change only these modules
    mlp_cls = MLP
    rope_kind = "full_attention"   # which of the model's rotary tables the layer uses

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, index: int, dtype: torch.dtype):
        super().__init__()
        prefix = f"model.layers.{index}"
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype,
                                       f"{prefix}.input_layernorm.weight")
        self.self_attn = self.attention_cls(cfg, ctx, f"{prefix}.self_attn", dtype,
                                            window=cfg.layer_window(index))
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype,
                                                f"{prefix}.post_attention_layernorm.weight")
        self.mlp = self.make_mlp(cfg, ctx, index, dtype)

    def make_mlp(self, cfg: ModelConfig, ctx: ParallelContext, index: int, dtype: torch.dtype) -> nn.Module:
        """The feed-forward block of layer ``index`` (a hook: MoE layers build experts)."""
        return self.mlp_cls(cfg, ctx, f"model.layers.{index}.mlp", dtype)

    def forward(self, x, residual, cos, sin, meta, k_cache, v_cache):
        """Returns (this layer's output, residual stream before it)."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, meta, k_cache, v_cache)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    """One pipeline stage of the model: layers ``layers`` on this tp rank's shard."""

    layer_cls = DecoderLayer
    norm_cls = RMSNorm

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, layers: range, dtype: torch.dtype):
        super().__init__()
        self.cfg, self.ctx, self.layer_ids = cfg, ctx, layers
        # The first stage embeds. Tied embeddings under pp are read twice: by the first
        # stage's embedding and the last stage's LM head (vLLM does the same). One copy would
        # make the first stage wait for the last one to embed each step, so steps in flight
        # could not overlap across stages (engine/core.py).
        self.embed_tokens = (VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, ctx)
                             if ctx.is_first_stage else None)
        self.layers = nn.ModuleList(self.layer_cls(cfg, ctx, i, dtype) for i in layers)
        self.norm = self.lm_head = None
        if ctx.is_last_stage:
            self.norm = self.norm_cls(cfg.hidden_size, cfg.rms_norm_eps, dtype, "model.norm.weight")
            tied = cfg.tie_word_embeddings
            self.lm_head = ParallelLMHead(
                cfg.vocab_size, cfg.hidden_size, dtype, ctx,
                name="model.embed_tokens.weight" if tied else "lm_head.weight",
                tied=self.embed_tokens if tied else None)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.num_kv_heads_local = self.layers[0].self_attn.n_kv

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(T,) token ids -> (T, d) embeddings, on the stage that owns the embedding."""
        return self.embed_tokens(ids)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One step over a flat batch of T new tokens from any number of sequences.

        x: token ids (T,) long, or hidden states (T, d) from the previous stage; meta: the step's attention
        metadata; kv_caches: (k_cache, v_cache) per layer of this stage, each
        (num_blocks, Hk_local, block_size, D), written in place.

        Returns the hidden stream (T, d) for the next stage, or on the last stage the
        final-normed hidden, ready for ``compute_logits`` on the rows that need them.
        """
        if x.dtype == torch.long:
            x = self.embed(x)                                             # (T, d)
        ropes = self.rotary(meta.positions)
        residual = None
        # Each layer, or where it can take it its fused CPU path (models/fused.py).
        layers = (kv_caches and layers_plan(self, x.shape[0], kv_caches[0][0].shape[2])) or self.layers
        for layer, (k_cache, v_cache) in zip(layers, kv_caches):
            cos, sin = ropes[layer.rope_kind]
            x, residual = layer(x, residual, cos, sin, meta, k_cache, v_cache)
        if self.norm is not None:
            return self.norm(x, residual)[0]
        return x + residual

    def rotary(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(T,) positions -> {rope_kind: (cos, sin)}, each (T, D/2) float32."""
        freqs = positions.unsqueeze(-1).float() * self.inv_freq           # (T, D/2)
        return {"full_attention": (freqs.cos(), freqs.sin())}

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d) normed hidden -> (..., vocab) float32 logits, full vocabulary."""
        return self.lm_head(h)

    def linear_layers(self):
        return [m for m in self.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]

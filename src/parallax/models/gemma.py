"""Gemma 2 and Gemma 3 (text) decoders, on the Llama-family parallel layers.

What differs from models/llama.py, following HF's modeling_gemma2 / modeling_gemma3:
- RMSNorm scales by (1 + weight) (``GemmaRMSNorm``).
- Sandwich norms: each sublayer's output is normed before it joins the residual stream
  (post_attention_layernorm, post_feedforward_layernorm); the MLP input is normed by
  pre_feedforward_layernorm. The fused add + RMSNorm op still carries the residual.
- Token embeddings are multiplied by sqrt(hidden_size) (rounded to the weight dtype, as HF).
- GeGLU MLP (gelu_pytorch_tanh gate): llama's MLP with ``hidden_act`` from the config.
- Attention scale query_pre_attn_scalar**-0.5; Gemma 2 soft-caps the attention scores and
  the final logits (c * tanh(x / c)).
- Layers alternate sliding-window and global attention (``layer_types``); the window is
  applied in the paged attention (ops.paged_attention_with_kvcache, ``window``).
- Gemma 3 norms each q and k head (like Qwen3, with the (1 + weight) norm) and gives the
  sliding layers their own rope base (``rope_local_theta``, no scaling) while the global
  layers use rope_theta with rope_scaling.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .. import ops
from ..config import ModelConfig
from ..parallel.context import ParallelContext
from .attention import PagedAttention
from .llama import MLP, Attention, LlamaForCausalLM, RMSNorm, rope_inv_freq


class GemmaRMSNorm(RMSNorm):
    """RMSNorm with the scale stored as an offset from 1: x / rms(x) * (1 + weight)."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        w = self.weight + 1
        if residual is None:
            return ops.rms_norm(x, w, self.eps)
        return ops.add_rms_norm(x, residual, w, self.eps)


class GemmaAttention(Attention):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, prefix: str, dtype: torch.dtype,
                 window: int | None):
        super().__init__(cfg, ctx, prefix, dtype)
        self.attn = PagedAttention(self.n_q, self.n_kv, self.head_dim,
                                   cfg.query_pre_attn_scalar ** -0.5, window=window,
                                   softcap=cfg.attn_logit_softcapping)
        self.q_norm = self.k_norm = None
        if cfg.architecture == "gemma3":
            self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, f"{prefix}.q_norm.weight")
            self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, f"{prefix}.k_norm.weight")

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.q_norm is None:
            return q, k
        return self.q_norm(q.contiguous()), self.k_norm(k.contiguous())


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, index: int, dtype: torch.dtype):
        super().__init__()
        prefix = f"model.layers.{index}"
        self.rope_kind = cfg.layer_types[index]

        def norm(name: str) -> GemmaRMSNorm:
            return GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, f"{prefix}.{name}.weight")

        self.input_layernorm = norm("input_layernorm")
        self.self_attn = GemmaAttention(cfg, ctx, f"{prefix}.self_attn", dtype,
                                        cfg.layer_window(index))
        self.post_attention_layernorm = norm("post_attention_layernorm")
        self.pre_feedforward_layernorm = norm("pre_feedforward_layernorm")
        self.mlp = MLP(cfg, ctx, f"{prefix}.mlp", dtype)
        self.post_feedforward_layernorm = norm("post_feedforward_layernorm")

    def forward(self, x, residual, cos, sin, meta, k_cache, v_cache):
        """Returns (this layer's output, residual stream before it), as llama's layer."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.post_attention_layernorm(self.self_attn(h, cos, sin, meta, k_cache, v_cache))
        h, residual = self.pre_feedforward_layernorm(h, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma 2 / Gemma 3 text: one pipeline stage on this tp rank's shard."""

    layer_cls = GemmaDecoderLayer
    norm_cls = GemmaRMSNorm

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, layers: range, dtype: torch.dtype):
        super().__init__(cfg, ctx, layers, dtype)
        self.embed_scale = cfg.hidden_size ** 0.5
        local = cfg.rope_local_theta
        if local is not None:   # Gemma 3: sliding layers rotate with their own base, unscaled
            local_cfg = dataclasses.replace(cfg, rope_theta=local, rope_scaling=None)
            self.register_buffer("inv_freq_local", rope_inv_freq(local_cfg), persistent=False)
        else:
            self.inv_freq_local = None

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        return x * torch.tensor(self.embed_scale, dtype=x.dtype)

    def rotary(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        ropes = super().rotary(positions)
        if self.inv_freq_local is None:
            ropes["sliding_attention"] = ropes["full_attention"]
        else:
            freqs = positions.unsqueeze(-1).float() * self.inv_freq_local
            ropes["sliding_attention"] = (freqs.cos(), freqs.sin())
        return ropes

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h)
        cap = self.cfg.final_logit_softcapping
        return logits if cap is None else cap * torch.tanh(logits / cap)

"""Qwen3 decoder: the Llama-family layer with an RMSNorm over each q and k head (weights of
size head_dim, shared by all heads) applied before rotary, as HF's ``Qwen3Attention`` does.

Everything else (no q/k/v bias unless ``attention_bias``, which then covers o_proj too,
head_dim from the config, SwiGLU MLP) is models/llama.py.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..parallel.context import ParallelContext
from .llama import Attention, DecoderLayer, LlamaForCausalLM, RMSNorm


class Qwen3Attention(Attention):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, prefix: str, dtype: torch.dtype,
                 window: int | None = None):
        super().__init__(cfg, ctx, prefix, dtype, window)
        # Per-head norms: every tp rank holds the whole (head_dim,) weight.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, f"{prefix}.q_norm.weight")
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, f"{prefix}.k_norm.weight")

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, Hq, D), (T, Hk, D) -> each head RMS-normed over D."""
        return self.q_norm(q.contiguous()), self.k_norm(k.contiguous())


class Qwen3DecoderLayer(DecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen3DecoderLayer

"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE and Qwen3-MoE, on the Llama-family layer.

The attention is the family's (Mixtral: llama's; Qwen2-MoE: llama's with q/k/v bias;
Qwen3-MoE: Qwen3's per-head q/k norms); the MLP of a sparse layer is ``SparseMoE``:

- The router (a replicated (E, d) matrix) scores every token; softmax in float32, top-k,
  then renormalised to sum 1 where the model does (Mixtral always; Qwen ``norm_topk_prob``).
- Each expert is a gated MLP. Experts are spread over the tp group (``expert_partition``):
  with ep 1 every rank holds every expert, cut along its inner width like a dense MLP; with
  ep = tp each rank holds whole experts (uneven counts allowed); in between, groups of
  tp / ep ranks share a subset of experts. The hidden states entering the MLP are already
  the same on every tp rank (attention ends in an all-reduce), so "routing tokens to their
  experts' ranks" needs no exchange: each rank runs its experts on the tokens routed to
  them, and the weighted partial outputs of all ranks are summed by the one all-reduce that
  a dense MLP's down projection does anyway.
- Qwen2-MoE adds a shared expert on every token, scaled by sigmoid(shared_expert_gate(x)).
- Qwen layers in ``dense_layers`` (``mlp_only_layers`` / ``decoder_sparse_step``) keep a
  dense MLP.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..parallel import collectives as C
from ..parallel.context import ParallelContext
from ..parallel.layers import Chunk, _param
from ..parallel.sharding import expert_partition
from .llama import MLP, DecoderLayer, LlamaForCausalLM
from .qwen3 import Qwen3Attention

# Checkpoint names per family: the sparse block's prefix under the layer, and an expert's
# gate / up / down projections.
_MIXTRAL = ("block_sparse_moe", ("w1", "w3", "w2"))
_QWEN = ("mlp", MLP.NAMES)


class SparseMoE(nn.Module):
    """Top-k routed experts (+ Qwen2-MoE's shared expert). (T, d) -> (T, d), replicated over tp."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, prefix: str, dtype: torch.dtype,
                 names: tuple[str, str, str]):
        super().__init__()
        self.ctx, self.top_k, self.renormalise = ctx, cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = _param((cfg.num_experts, cfg.hidden_size), dtype, [Chunk(f"{prefix}.gate.weight")])
        part = expert_partition(cfg.num_experts, cfg.moe_intermediate_size, ctx.tp_size,
                                ctx.tp_rank, ctx.ep_size)
        self.expert_ids = list(part.experts)
        self.experts = nn.ModuleList(
            MLP(cfg, ctx, f"{prefix}.experts.{e}", dtype, rows=(part.f_start, part.f_len),
                names=names, reduce=False) for e in part.experts)
        self.shared_expert = self.shared_expert_gate = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg, ctx, f"{prefix}.shared_expert", dtype,
                                     width=cfg.shared_expert_intermediate_size, reduce=False)
            self.shared_expert_gate = _param((1, cfg.hidden_size), dtype,
                                             [Chunk(f"{prefix}.shared_expert_gate.weight")])

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, d) -> top-k (weights (T, k) in x's dtype, expert ids (T, k) long)."""
        probs = torch.softmax(nn.functional.linear(x, self.gate).float(), dim=-1)  # (T, E)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        out = torch.zeros_like(x)
        for e, expert in zip(self.expert_ids, self.experts):
            tok, slot = torch.where(ids == e)                   # tokens routed to expert e
            if tok.numel():
                out.index_add_(0, tok, expert(x[tok]) * weights[tok, slot, None])
        if self.shared_expert is not None:
            gate = torch.sigmoid(nn.functional.linear(x, self.shared_expert_gate))   # (T, 1)
            out += gate * self.shared_expert(x)
        return C.all_reduce_tp(out, self.ctx)


class MoeDecoderLayer(DecoderLayer):
    block = _QWEN

    def make_mlp(self, cfg: ModelConfig, ctx: ParallelContext, index: int, dtype: torch.dtype) -> nn.Module:
        if index in cfg.dense_layers:
            return super().make_mlp(cfg, ctx, index, dtype)
        name, names = self.block
        return SparseMoE(cfg, ctx, f"model.layers.{index}.{name}", dtype, names)


class MixtralDecoderLayer(MoeDecoderLayer):
    block = _MIXTRAL


class Qwen3MoeDecoderLayer(MoeDecoderLayer):
    attention_cls = Qwen3Attention


class MixtralForCausalLM(LlamaForCausalLM):
    layer_cls = MixtralDecoderLayer


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    layer_cls = MoeDecoderLayer


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen3MoeDecoderLayer

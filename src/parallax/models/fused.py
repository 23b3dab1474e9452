"""The fused CPU path of a Llama-family decoder layer: each half of the layer one C op.

A decode step of a small model spends a good part of its time between the matmuls: module
calls, q/k/v splits and views, per-call kernel choices and layout checks (~125 us a layer
for SmolLM2 at batch 1). Where a layer can take it, the step instead makes two calls per
layer, ``ops.cpu.attention_half`` (add + RMSNorm -> q|k|v matmul -> rotary, paged cache
write and attention -> o_proj matmul) and ``ops.cpu.mlp_half`` (add + RMSNorm -> gate|up
matmul -> SiLU-and-mul -> down matmul), with the tp all-reduce of each row-parallel output
between them, as the module path does. Same kernels, same order: the same numbers.

A layer takes it when it is a plain Llama layer (the forward methods of llama.py, SiLU, no
o_proj/MLP bias, no soft-cap; q|k|v bias is fine), fp32 on the CPU with the kernels built,
and every one of its four matmuls runs the C kernel for this step's row count (the
weight's ``quant_method.kernel_kind``: ops/cpu.py measured the kernel faster than torch).
Everything that cannot change between steps is resolved once per row bucket and cached on
the model; ``PARALLAX_FUSED_LAYERS=0`` turns the path off (the module path, the reference,
then runs every layer). The settings are read when the model loads (``settle``).
"""

from __future__ import annotations

import os

import torch

from .. import ops
from ..parallel import collectives as C
from .attention import AttentionMetadata


def enabled() -> bool:
    """``PARALLAX_FUSED_LAYERS`` (default 1; 0 turns the fused path off); off under
    ``PARALLAX_NUMERICS=ggml`` (ops/ggml.py: llama.cpp's arithmetic, op by op)."""
    on = os.environ.get("PARALLAX_FUSED_LAYERS", "1").strip().lower() not in ("0", "false", "no", "off")
    return on and not ops.ggml.enabled()


def plain_llama_layer(layer) -> bool:
    """Whether ``layer`` computes exactly what the two fused halves compute."""
    from .llama import MLP, Attention, DecoderLayer, RMSNorm   # llama.py imports this file
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
    return (type(layer).forward is DecoderLayer.forward
            and isinstance(attn, Attention) and type(attn).forward is Attention.forward
            and type(attn).norm_qk is Attention.norm_qk and attn.attn.softcap is None
            and isinstance(mlp, MLP) and type(mlp).forward is MLP.forward and mlp.act is None
            and all(isinstance(n, RMSNorm) and type(n).forward is RMSNorm.forward for n in norms)
            and attn.o_proj.bias is None and attn.o_proj.reduce and mlp.down_proj.reduce
            and mlp.down_proj.bias is None and mlp.gate_up_proj.bias is None
            and all(m.qweight is None for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                                 mlp.down_proj))
            and attn.head_dim % 16 == 0 and attn.head_dim <= 256
            and attn.n_q % attn.n_kv == 0 and attn.n_q // attn.n_kv <= 16
            and layer.input_layernorm.weight.dtype == torch.float32
            and ops.cpu.fits(layer.input_layernorm.weight))


class FusedLayer:
    """A plain Llama layer as two op calls; called like the layer (DecoderLayer.forward)."""

    def __init__(self, layer, kinds: tuple[str, str, str, str], ctx):
        attn, mlp = layer.self_attn, layer.mlp
        qkv, o, gu, down = kinds
        isa = ops.cpu.kernels()
        self.attn_pre = (layer.input_layernorm.weight, layer.input_layernorm.eps,
                         attn.qkv_proj.weight, qkv, attn.qkv_proj.bias, attn.o_proj.weight, o)
        self.attn_post = (attn.n_q, attn.n_kv, attn.attn.scale, attn.attn.window or 0, 0.0)
        self.mlp_args = (layer.post_attention_layernorm.weight,
                         layer.post_attention_layernorm.eps, mlp.gate_up_proj.weight, gu,
                         mlp.down_proj.weight, down, mlp.inner)
        self.isa, self.ctx = isa, ctx
        self.reduce = ctx.tp_size > 1
        self.rope_kind = layer.rope_kind

    def __call__(self, x, residual, cos, sin, meta: AttentionMetadata, k_cache, v_cache):
        out, residual = ops.cpu.attention_half(
            x, residual, *self.attn_pre, k_cache, v_cache, cos, sin, meta.slot_mapping,
            meta.block_tables, meta.context_lens, meta.query_start_loc, *self.attn_post,
            isa=self.isa)
        if self.reduce:
            out = C.all_reduce_tp(out, self.ctx)
        out, residual = ops.cpu.mlp_half(out, residual, *self.mlp_args, isa=self.isa)
        if self.reduce:
            out = C.all_reduce_tp(out, self.ctx)
        return out, residual


_MISSING = object()


def settle(model) -> tuple:
    """Read the settings that decide ``model``'s fused plans (PARALLAX_FUSED_LAYERS,
    PARALLAX_CPU_MATMUL, PARALLAX_GGUF_ACTIVATIONS) and keep them on the model: the loader
    calls it once (models/loader.py), so a step reads no environment. Call it again after
    changing one of them for a loaded model."""
    env = model.__dict__["_fused_env"] = (
        enabled(), os.environ.get("PARALLAX_CPU_MATMUL"),
        os.environ.get("PARALLAX_GGUF_ACTIVATIONS"))
    return env


def layers_plan(model, rows: int, block_size: int) -> list | None:
    """What runs each layer of ``model`` (a LlamaForCausalLM stage) in a step of ``rows``
    tokens over a cache of ``block_size``-token blocks: its FusedLayer, or the layer itself;
    None when no layer is fused. Built once per row bucket, thread count and the settings
    ``settle`` kept on the model, then a dict lookup."""
    env = model.__dict__.get("_fused_env") or settle(model)
    if not env[0] or 128 % block_size:      # the paged kernel's block sizes
        return None
    key = (ops.cpu.row_bucket(rows)[0], torch.get_num_threads(), env)
    plans = model.__dict__.setdefault("_fused_plans", {})
    plan = plans.get(key, _MISSING)
    if plan is _MISSING:
        plan = plans[key] = _build(model, rows)
    return plan


def _build(model, rows: int) -> list | None:
    plain = model.__dict__.get("_plain_layers")
    if plain is None:
        plain = model.__dict__["_plain_layers"] = [plain_llama_layer(layer) for layer in model.layers]
    plan, fused = [], 0
    for layer, ok in zip(model.layers, plain):
        kinds = None
        if ok:
            linears = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                       layer.mlp.down_proj)
            kinds = tuple(m.quant_method.kernel_kind(m, rows) for m in linears)
        if kinds is not None and None not in kinds:
            plan.append(FusedLayer(layer, kinds, model.ctx))
            fused += 1
        else:
            plan.append(layer)
    return plan if fused else None

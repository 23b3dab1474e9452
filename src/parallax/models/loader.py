"""Build one rank's model on the meta device, then fill each parameter with exactly its
shard read from the checkpoint (``param.chunks``), so weights are never held twice.

Before any weight is read, ``check_tensor_names`` accounts for the checkpoint both ways
(as nanoGPT's ``from_pretrained`` does): every tensor the model needs is present with the
shape the config implies, and every tensor in the checkpoint is used by some rank, except
the few in ``DERIVED_TENSORS`` that are recomputed from the config. A rank reads only its
slices, so the check runs on names against the whole model built on the meta device.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time

import torch
from torch import nn
from tqdm import tqdm

from .. import ops
from ..config import ModelConfig
from ..errors import CheckpointError, ParallaxError
from ..loading.checkpoint import Checkpoint
from ..parallel.context import ParallelContext
from ..parallel.quant import GGUF_METHODS, set_weight
from ..parallel.sharding import split_layers
from . import MODEL_REGISTRY, fused

logger = logging.getLogger(__name__)

# Checkpoint tensors that parallax recomputes instead of reading (documented in
# docs/loading.md): rotary inverse frequencies that older HF Llama checkpoints saved per
# layer (derived from rope_theta / rope_scaling).
DERIVED_TENSORS = (re.compile(r"^model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$"),)


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor the whole model (all stages, tp=1) reads, with its HF shape."""
    cls = MODEL_REGISTRY[cfg.architecture]
    with torch.device("meta"):
        model = cls(cfg, ParallelContext.single(), range(cfg.num_layers), torch.float32)
    shapes: dict[str, tuple[int, ...]] = {}
    for p in model.parameters():
        # At tp=1 the pieces of one checkpoint tensor inside a parameter cover it whole: one
        # piece, or several row ranges of a fused tensor (Phi-3's qkv_proj) that add up.
        rows: dict[str, int] = {}
        for c in p.chunks:
            shape = list(p.shape)
            if c.dim is not None and c.length is not None:
                rows[c.name] = rows.get(c.name, 0) + c.length
                shape[c.dim] = rows[c.name]
            shapes[c.name] = tuple(shape)
    return shapes


def check_tensor_names(ckpt: Checkpoint) -> None:
    """Raise CheckpointError unless the checkpoint's tensors are exactly what the model reads
    (shapes included), up to ``DERIVED_TENSORS`` and a redundant tied ``lm_head.weight``."""
    cfg = ckpt.config
    expected = expected_tensors(cfg)
    present = set(ckpt.names())
    missing = sorted(set(expected) - present)
    if missing:
        raise CheckpointError(
            f"the checkpoint lacks {len(missing)} tensor(s) its config needs, e.g. {missing[:5]}; "
            f"the checkpoint does not match its config (re-download or re-convert it)")
    unused = sorted(n for n in present - set(expected) if not _derived(n, cfg))
    if unused:
        raise CheckpointError(
            f"the checkpoint holds {len(unused)} tensor(s) the model would not use, e.g. "
            f"{unused[:5]}: its config does not describe them (a bias or layer the config turns "
            f"off, or another architecture); parallax refuses rather than ignore weights")
    for name, shape in expected.items():
        got = tuple(ckpt.shape(name))
        if got != shape:
            raise CheckpointError(f"tensor {name!r} has shape {got} but the config implies {shape}; "
                                  f"the checkpoint does not match its config")


def _derived(name: str, cfg: ModelConfig) -> bool:
    # HF ties lm_head to the embedding and ignores a saved copy; so do we.
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
        return True
    return any(p.match(name) for p in DERIVED_TENSORS)


def build_model(ckpt: Checkpoint, ctx: ParallelContext, dtype: torch.dtype,
                layer_split: list[int] | None = None, quantize: str | None = None) -> nn.Module:
    """This rank's stage of the model with its tp shard of every weight loaded. fp32 on the
    CPU without ``quantize``: GGUF Q8_0 tensors stay in their blocks (keep_gguf_blocks_)."""
    if quantize not in (None, "int8"):
        raise ParallaxError(f"quantize={quantize!r} is not supported; use None or 'int8'")
    cfg = ckpt.config
    check_tensor_names(ckpt)
    layers = split_layers(cfg, ctx.pp_size, layer_split)[ctx.pp_rank]
    cls = MODEL_REGISTRY[cfg.architecture]
    if ops.ggml.enabled():
        ops.ggml.check_model(cfg, ctx.device, ctx.tp_size)
    with torch.device("meta"):
        model = cls(cfg, ctx, layers, dtype)
    if quantize is None and ctx.device.type == "cpu" and dtype == torch.float32:
        keep_gguf_blocks_(model, ckpt)
    t0 = time.perf_counter()
    load_weights(model, ckpt, ctx.device, dtype, show_progress=ctx.rank == 0)
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
    for module in model.modules():     # rotary tables (built on the CPU, outside meta)
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(ctx.device)
    if quantize == "int8":
        for lin in model.linear_layers():
            lin.quantize_int8_()
    pack_weights_(model)
    fused.settle(model)
    logger.info("rank %d: loaded layers %d..%d in %.2f s", ctx.rank, layers.start, layers.stop - 1,
                time.perf_counter() - t0)
    return model.eval()


def dequantize_gguf() -> bool:
    """``PARALLAX_GGUF_DEQUANTIZE=1``: read every GGUF tensor as float (the old path)."""
    return os.environ.get("PARALLAX_GGUF_DEQUANTIZE", "").strip().lower() in ("1", "true", "yes")


def keep_gguf_blocks_(model: nn.Module, ckpt: Checkpoint) -> None:
    """Give each matmul / embedding layer whose checkpoint tensors are all of one GGUF block
    type parallax computes on (``parallel.quant.GGUF_METHODS``: Q8_0, Q4_0, Q4_1, Q4_K,
    Q6_K) that type's
    quant_method, so its weight is read and kept as raw blocks. A row-parallel shard whose
    K range cuts a block stays float, with a warning. No-op for other checkpoints or with
    ``PARALLAX_GGUF_DEQUANTIZE=1``. With exact activations (``PARALLAX_GGUF_ACTIVATIONS=f32``,
    the default) only Q8_0 and Q4_0 have a kernel: the other types are dequantised on load.
    Tied layers share one parameter and one method."""
    if not hasattr(ckpt, "read_quantized") or dequantize_gguf():
        return
    from ..ops import cpu
    done: dict[int, tuple] = {}          # id(meta weight) -> (method, new parameter)
    for module in model.modules():
        if getattr(module, "quant_method", None) is None:   # not a matmul / embedding layer
            continue
        w = module.weight
        if w is None or w.dim() != 2:
            continue
        if id(w) in done:                 # a tied head: the embedding's tensor and method
            module.quant_method = done[id(w)][0]
            set_weight(module, done[id(w)][1])
            continue
        types = {ckpt.ggml_type(c.name) for c in w.chunks}
        method = GGUF_METHODS.get(types.pop()) if len(types) == 1 else None
        if method is None or (method.name not in cpu.F32_KERNELS
                              and cpu.block_activations() == "f32"):
            continue      # exact activations and no exact kernel for it: dequantise on load
        block = method.block
        cut = [c for c in w.chunks if c.dim == 1 and (c.start % block or (c.length or 0) % block)]
        if cut or w.shape[1] % block:
            logger.warning("%s: this rank's K slice cuts %s blocks of %d; dequantising it to "
                           "float instead", cut[0].name if cut else w.chunks[0].name,
                           method.ggml_type, block)
            continue
        method.create_weights(module)
        module.quant_method = method
        done[id(w)] = (method, module.weight)


def pack_weights_(model: nn.Module) -> None:
    """Re-lay fp32 CPU matmul weights as the CPU kernel's panels (ops/cpu.py), in place.

    The parameter object is kept, so a tied embedding sees the packed tensor too. Only
    one copy exists; the panels serve prefill, decode and (tied) embedding lookups. They
    lie in one mapping on transparent huge pages (ops.cpu.panel_buffers).
    """
    from ..ops import cpu
    from ..ops.hugepages import trim_heap
    heads = [model.lm_head] if model.lm_head is not None else []
    params, seen = [], set()
    for module in model.linear_layers() + heads:
        w = module.weight
        if w is not None and w.dim() == 2 and id(w) not in seen and cpu.can_pack(w):
            params.append(w)
            seen.add(id(w))
    # all panels in one huge-page mapping; each weight's old copy goes once it is packed,
    # and its memory back to the OS (not kept by malloc for later)
    for w, out in zip(params, cpu.panel_buffers([tuple(w.shape) for w in params])):
        w.data = cpu.pack(w.data, out=out)
        trim_heap()


def load_weights(model: nn.Module, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype,
                 show_progress: bool = True) -> None:
    """Replace every meta parameter (and every meta buffer with ``chunks``: weights kept in
    GGUF blocks) by its shard from ``ckpt``; tied tensors stay one tensor."""
    slots = [(m, name, p, True) for m in model.modules() for name, p in m._parameters.items()
             if p is not None]
    slots += [(m, name, b, False) for m in model.modules() for name, b in m._buffers.items()
              if b is not None and hasattr(b, "chunks")]
    loaded: dict[int, torch.Tensor] = {}
    bar = tqdm(slots, desc="loading weights", unit="tensor", leave=False,
               disable=not (show_progress and sys.stderr.isatty()))
    for module, name, meta, is_param in bar:
        new = loaded.get(id(meta))
        if new is None:
            data = read_shard(ckpt, meta, dtype)
            new = nn.Parameter(data.to(device), requires_grad=False) if is_param else data.to(device)
            loaded[id(meta)] = new
        (module._parameters if is_param else module._buffers)[name] = new


def read_shard(ckpt: Checkpoint, meta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``meta``'s shard from ``ckpt`` (its ``chunks`` stacked along dim 0): float as
    ``dtype``, or the raw GGUF blocks of ``meta.ggml_type`` (keep_gguf_blocks_, where one
    chunk can be a view of the file). Several chunks (a fused weight) are read one at a
    time into the one output tensor, so no more than one chunk is held twice."""
    raw = getattr(meta, "ggml_type", None)

    def read(c, copy: bool) -> torch.Tensor:
        if raw:
            return ckpt.read_quantized(c.name, c.dim, c.start, c.length, copy=copy)
        return ckpt.read(c.name, c.dim, c.start, c.length, dtype=dtype)

    def mismatch(shape) -> CheckpointError:
        return CheckpointError(
            f"{[c.name for c in meta.chunks]} gave shape {tuple(shape)} but this rank expects "
            f"{tuple(meta.shape)}; the checkpoint does not match its config")

    if len(meta.chunks) == 1:
        data = read(meta.chunks[0], copy=False)
        if data.shape != meta.shape:
            raise mismatch(data.shape)
        return data
    out = torch.empty(meta.shape, dtype=torch.uint8 if raw else dtype)
    row = 0
    for c in meta.chunks:
        part = read(c, copy=True)
        if part.shape[1:] != out.shape[1:] or row + part.shape[0] > out.shape[0]:
            raise mismatch((row + part.shape[0], *part.shape[1:]))
        out[row:row + part.shape[0]] = part
        row += part.shape[0]
    if row != out.shape[0]:
        raise mismatch((row, *out.shape[1:]))
    return out

"""Build one rank's model on the meta device, then fill each parameter with exactly its
shard read from the checkpoint (``param.chunks``), so weights are never held twice."""

from __future__ import annotations

import logging
import sys
import time

import torch
from torch import nn
from tqdm import tqdm

from ..errors import CheckpointError
from ..loading.checkpoint import Checkpoint
from ..parallel.context import ParallelContext
from ..parallel.sharding import split_layers
from . import MODEL_REGISTRY

logger = logging.getLogger(__name__)


def build_model(ckpt: Checkpoint, ctx: ParallelContext, dtype: torch.dtype,
                layer_split: list[int] | None = None, quantize: str | None = None) -> nn.Module:
    """This rank's stage of the model with its tp shard of every weight loaded."""
    cfg = ckpt.config
    layers = split_layers(cfg, ctx.pp_size, layer_split)[ctx.pp_rank]
    cls = MODEL_REGISTRY[cfg.architecture]
    with torch.device("meta"):
        model = cls(cfg, ctx, layers, dtype)
    t0 = time.perf_counter()
    load_weights(model, ckpt, ctx.device, dtype, show_progress=ctx.rank == 0)
    model.inv_freq = model.inv_freq.to(ctx.device)
    if quantize == "int8":
        for lin in model.linear_layers():
            lin.quantize_int8_()
    elif quantize is not None:
        raise ValueError(f"quantize={quantize!r} is not supported; use None or 'int8'")
    pack_weights_(model)
    logger.info("rank %d: loaded layers %d..%d in %.2f s", ctx.rank, layers.start, layers.stop - 1,
                time.perf_counter() - t0)
    return model.eval()


def pack_weights_(model: nn.Module) -> None:
    """Re-lay fp32 CPU matmul weights as the CPU kernel's panels (ops/cpu.py), in place.

    The parameter object is kept, so a tied embedding sees the packed tensor too. Only
    one copy exists; the panels serve prefill, decode and (tied) embedding lookups.
    """
    from ..ops import cpu
    heads = [model.lm_head] if model.lm_head is not None else []
    for module in model.linear_layers() + heads:
        w = module.weight
        if w is not None and w.dim() == 2 and cpu.can_pack(w):
            w.data = cpu.pack(w.data)


def load_weights(model: nn.Module, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype,
                 show_progress: bool = True) -> None:
    """Replace every meta parameter by its shard from ``ckpt``; tied parameters stay one tensor."""
    slots = [(m, name, p) for m in model.modules() for name, p in m._parameters.items() if p is not None]
    loaded: dict[int, nn.Parameter] = {}
    bar = tqdm(slots, desc="loading weights", unit="tensor", leave=False,
               disable=not (show_progress and sys.stderr.isatty()))
    for module, name, meta in bar:
        new = loaded.get(id(meta))
        if new is None:
            parts = [ckpt.read(c.name, c.dim, c.start, c.length, dtype=dtype) for c in meta.chunks]
            data = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            if data.shape != meta.shape:
                raise CheckpointError(
                    f"{[c.name for c in meta.chunks]} gave shape {tuple(data.shape)} but this rank "
                    f"expects {tuple(meta.shape)}; the checkpoint does not match its config")
            new = nn.Parameter(data.to(device), requires_grad=False)
            loaded[id(meta)] = new
        module._parameters[name] = new

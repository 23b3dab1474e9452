"""Engine: one rank's model, tokenizer and generation entry points.

Every rank of a layout holds one Engine and runs the same calls (SPMD); the driver rank
returns the results. ``parallax.LLM`` drives one Engine in-process (single device or
torchrun) or one per worker process (parallel/launch.py).
"""

from __future__ import annotations

import logging
import os
import resource
import time
from typing import Callable

import torch

from ..errors import ParallaxError
from ..generation import GenerationConfig, SequenceOutput, generate, prompt_logits
from ..loading import load_tokenizer, open_checkpoint
from ..models.loader import build_model
from ..parallel.context import ParallelContext
from ..parallel.sharding import check_layout

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


class Engine:
    def __init__(self, ctx: ParallelContext, model: str, dtype: str | torch.dtype = "float32",
                 layer_split: list[int] | None = None, quantize: str | None = None,
                 micro_batches: int | None = None, tokenizer=None, checkpoint=None):
        t0 = time.perf_counter()
        self.ctx = ctx
        ckpt = checkpoint if checkpoint is not None else open_checkpoint(model)
        self.config = ckpt.config
        check_layout(self.config, ctx.tp_size, ctx.pp_size, layer_split)
        self.model = build_model(ckpt, ctx, parse_dtype(dtype), layer_split, quantize)
        if tokenizer is None and ctx.is_driver:
            tokenizer = load_tokenizer(model, ckpt)
        self.tokenizer = tokenizer
        ckpt.close()
        self.micro_batches = micro_batches or ctx.pp_size
        self.load_time_s = time.perf_counter() - t0
        self.last_stats: dict = {}

    def generate(self, prompts: list[list[int]], cfg: GenerationConfig,
                 emit: Callable[[tuple[int, str]], None] | None = None) -> list[SequenceOutput] | None:
        self.last_stats = {}
        return generate(self.model, self.ctx, prompts, cfg, self.tokenizer, self.micro_batches,
                        emit, self.last_stats)

    def generation_stats(self) -> list[dict]:
        """Every rank's busy and wall seconds in the last generate (for the busy fraction)."""
        from .parallel.collectives import all_gather_object
        return all_gather_object({"rank": self.ctx.rank, **self.last_stats}, self.ctx)

    def logits(self, prompts: list[list[int]]) -> torch.Tensor | None:
        return prompt_logits(self.model, self.ctx, prompts)

    def memory(self) -> dict:
        """This rank's weight bytes and peak resident memory."""
        tensors = {t.data_ptr(): t for t in self.model.state_dict().values()}   # tied: once
        weights = sum(t.numel() * t.element_size() for t in tensors.values())
        return {"rank": self.ctx.rank, "weight_bytes": weights, "peak_rss_bytes": peak_rss_bytes(),
                "load_time_s": self.load_time_s, "pid": os.getpid()}

    def all_memory(self) -> list[dict]:
        """memory() of every rank, gathered on every rank."""
        from .parallel.collectives import all_gather_object
        return all_gather_object(self.memory(), self.ctx)

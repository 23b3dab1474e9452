"""Small picklable engines (and rank functions) for the launcher tests.

They use parallax's collectives the way a model would; the layout helpers also call
``torch.distributed`` directly, which only test code may do.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from parallax.errors import CheckpointError, PromptError
from parallax.parallel.collectives import all_reduce_tp
from parallax.parallel.context import ParallelContext


def world_gather(value: float, ctx: ParallelContext) -> list[float]:
    """Every rank's ``value``, by global rank (via one world all-reduce)."""
    t = torch.zeros(ctx.world_size, dtype=torch.float64)
    t[ctx.rank] = value
    if ctx.world_size > 1:
        dist.all_reduce(t)
    return t.tolist()


def describe_layout(ctx: ParallelContext) -> dict:
    """Where this rank sits, and the sum of global ranks over its tp group."""
    tp_sum = all_reduce_tp(torch.tensor([float(ctx.rank)]), ctx).item()
    return {"rank": ctx.rank, "tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank,
            "tp_sum": tp_sum, "driver_rank": ctx.driver_rank, "pid": os.getpid()}


class ToyEngine:
    def __init__(self, ctx: ParallelContext, scale: float = 1.0) -> None:
        self.ctx = ctx
        self.scale = scale

    def noop(self) -> None:
        return None

    def whoami(self) -> dict:
        return {"rank": self.ctx.rank, "pid": os.getpid(), "threads": torch.get_num_threads()}

    def tp_sum(self, x: float) -> float:
        """all_reduce_tp of ``scale * x * (tp_rank + 1)``."""
        t = torch.tensor([self.scale * x * (self.ctx.tp_rank + 1)])
        return all_reduce_tp(t, self.ctx).item()

    def layout(self) -> dict:
        """The driver's view of every rank: tp/pp coordinates and its tp group's rank sum."""
        me = describe_layout(self.ctx)
        return {"driver": me, "tp_rank": world_gather(me["tp_rank"], self.ctx),
                "pp_rank": world_gather(me["pp_rank"], self.ctx),
                "tp_sum": world_gather(me["tp_sum"], self.ctx)}

    def count(self, n: int, delay_s: float = 0.0, *, emit) -> str:
        """Emit 0..n-1 (each after a tp all-reduce, so every rank takes part)."""
        for i in range(n):
            total = all_reduce_tp(torch.tensor([float(i)]), self.ctx).item()
            emit(int(total) // self.ctx.tp_size)
            if delay_s:
                time.sleep(delay_s)
        return f"done {n}"

    def fail_on(self, rank: int, message: str) -> None:
        if self.ctx.rank == rank:
            raise ValueError(message)
        all_reduce_tp(torch.ones(1), self.ctx)         # the others wait in a collective

    def reject(self, message: str) -> None:
        """Input validation that runs SPMD: every rank raises the same ParallaxError."""
        raise PromptError(message)

    def spin(self, seconds: float) -> int:
        """A loop of collectives with sleeps, for killing a rank mid-call."""
        steps, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            all_reduce_tp(torch.ones(4), self.ctx)
            time.sleep(0.02)
            steps += 1
        return steps

    def skip_collective(self, skipper: int) -> str:
        """Every rank but ``skipper`` all-reduces; they must time out, not hang."""
        if self.ctx.rank != skipper:
            all_reduce_tp(torch.ones(1), self.ctx)
        return "returned"


def make_toy(ctx: ParallelContext, scale: float = 1.0) -> ToyEngine:
    return ToyEngine(ctx, scale)


def make_broken_checkpoint(ctx: ParallelContext, path: str) -> ToyEngine:
    raise CheckpointError(f"no checkpoint at {path}: expected config.json and *.safetensors")


def make_broken_generic(ctx: ParallelContext) -> ToyEngine:
    if ctx.rank == 1:
        raise KeyError("rank one cannot build")
    return ToyEngine(ctx)


def fail_on_rank_one(ctx: ParallelContext) -> int:
    if ctx.rank == 1:
        raise ValueError("rank one refuses")
    return ctx.rank

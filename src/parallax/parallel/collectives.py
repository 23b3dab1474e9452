"""Every collective parallax uses, named by what it does; the only file that calls
``torch.distributed`` for data (CPU ranks on one machine go through shared memory,
parallel/shm.py, when the tensor fits: tp collectives and stage-to-stage messages). Each
returns early when its group has one rank, so a size-1 context costs nothing. Pickled
objects go through ``ctx.object_group``: gloo in host memory even when tensors use NCCL.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .context import ParallelContext


def all_reduce_tp(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Sum partial results across the tp group (row-parallel outputs), in place."""
    if ctx.tp_size > 1:
        if ctx.tp_shm is not None and ctx.tp_shm.fits(x):
            return ctx.tp_shm.all_reduce_(x)
        dist.all_reduce(x, group=ctx.tp_group)
    return x


def gather_tp(x: torch.Tensor, ctx: ParallelContext, sizes: list[int]) -> torch.Tensor:
    """Concatenate tp shards along the last dim; ``sizes[r]`` is rank r's width (may differ)."""
    if ctx.tp_size == 1:
        return x
    width = max(sizes)
    if x.shape[-1] < width:   # all_gather needs equal shapes: pad, gather, strip
        x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
    if ctx.tp_shm is not None and ctx.tp_shm.fits(x):
        parts = ctx.tp_shm.all_gather(x)
    else:
        parts = [torch.empty_like(x) for _ in range(ctx.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=ctx.tp_group)
    return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)


def broadcast_tp(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Copy tp rank 0's tensor to every rank of its tp group, in place."""
    if ctx.tp_size > 1:
        if ctx.tp_shm is not None and x.dtype == torch.long and x.is_contiguous() \
                and ctx.tp_shm.fits(x.view(torch.float32)):
            ctx.tp_shm.broadcast_(x.view(torch.float32), 0)   # bits copied, not converted
            return x
        dist.broadcast(x, src=ctx.stage_rank(ctx.pp_rank, 0), group=ctx.tp_group)
    return x


def broadcast_world(x: torch.Tensor, ctx: ParallelContext, src: int) -> torch.Tensor:
    """Copy global rank ``src``'s tensor to every rank, in place."""
    if ctx.world_size > 1:
        dist.broadcast(x, src=src)
    return x


def broadcast_object(obj: object, ctx: ParallelContext, src: int,
                     group: dist.ProcessGroup | None = None) -> object:
    """Copy a picklable object from global rank ``src`` to every rank, through ``group``
    (a world-wide group; default: ``ctx.object_group``)."""
    if ctx.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=ctx.object_group if group is None else group)
    return box[0]


def send_next_stage(x: torch.Tensor, ctx: ParallelContext) -> dist.Work | None:
    """Start sending activations to the same tp rank of the next stage (non-blocking)."""
    return send_to(x, ctx.stage_rank(ctx.pp_rank + 1), ctx)


def recv_prev_stage(out: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Receive activations from the same tp rank of the previous stage into ``out``."""
    return recv_from(out, ctx.stage_rank(ctx.pp_rank - 1), ctx)


def send_to(x: torch.Tensor, dst: int, ctx: ParallelContext) -> dist.Work | None:
    """Start a point-to-point send to global rank ``dst``: a gloo/NCCL Work to wait on, or
    None when it went through shared memory (already delivered to dst's mailbox)."""
    x = x.contiguous()
    if ctx.p2p_shm is not None and ctx.p2p_shm.fits(x):
        ctx.p2p_shm.send(x, dst)
        return None
    return dist.isend(x, dst=dst)


def recv_from(out: torch.Tensor, src: int, ctx: ParallelContext) -> torch.Tensor:
    """Blocking receive from global rank ``src`` into ``out`` (contiguous)."""
    if ctx.p2p_shm is not None and ctx.p2p_shm.fits(out):
        return ctx.p2p_shm.recv(out, src)
    dist.recv(out, src=src)
    return out


def barrier(ctx: ParallelContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def all_gather_object(obj: object, ctx: ParallelContext) -> list:
    """Every rank's picklable ``obj``, in rank order, on every rank."""
    if ctx.world_size == 1:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj, group=ctx.object_group)
    return out

"""Shared-memory tp collectives and stage-to-stage messages (parallel/shm.py) against gloo,
in real processes."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from dist_utils import spawn_ranks
from parallax.parallel import collectives as C


def _compare_with_gloo(ctx, shapes):
    assert ctx.tp_shm is not None, "expected shared-memory collectives on one machine"
    out = []
    for step, shape in enumerate(shapes):
        torch.manual_seed(100 * step + ctx.rank)
        x = torch.randn(shape)
        ref = x.clone()
        dist.all_reduce(ref, group=ctx.tp_group)
        got = C.all_reduce_tp(x.clone(), ctx)
        sizes = [shape[-1] - r for r in range(ctx.tp_size)]
        part = x[..., :sizes[ctx.tp_rank]].contiguous()
        gathered = C.gather_tp(part, ctx, sizes)
        msg = torch.arange(7) * (ctx.tp_rank + 1) + 2**40     # int64 bits survive
        C.broadcast_tp(msg, ctx)
        out.append((torch.allclose(got, ref, atol=1e-5), gathered, msg.tolist()))
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [2, 3])
def test_shm_collectives_equal_gloo(n):
    shapes = [(1, 1, 576), (8, 1, 576), (3, 17, 64), (1, 1, 7)]
    results = spawn_ranks(n, _compare_with_gloo, shapes)
    for rank_result in results:
        for (close, gathered, msg), ref in zip(rank_result, results[0]):
            assert close
            assert torch.equal(gathered, ref[1])        # every rank gathers the same
            assert msg == (torch.arange(7) + 2**40).tolist()   # tp rank 0's message


def _stall_on_rank_one(ctx):
    ctx.tp_shm.timeout_s = 2.0
    if ctx.tp_rank == 1:
        return "skipped"
    try:
        C.all_reduce_tp(torch.ones(4), ctx)
    except RuntimeError as e:
        return str(e)
    return "no error"


@pytest.mark.timeout(120)
def test_shm_wait_times_out_instead_of_hanging():
    results = spawn_ranks(2, _stall_on_rank_one)
    assert "timed out after 2.0 s waiting for ranks [1]" in results[0]


def _messages_both_ways(ctx, sizes):
    """Rank 0 sends every size to rank 1 (bf16 and int64, some over the slot size, so the
    transports interleave), rank 1 answers each; more messages than the ring has slots."""
    assert ctx.p2p_shm is not None, "expected shared-memory messages between local stages"
    peer = 1 - ctx.rank
    got = []
    for i, n in enumerate(sizes):
        dtype = torch.bfloat16 if i % 2 else torch.int64
        if ctx.rank == 0:
            work = C.send_to(torch.arange(n).to(dtype) + i, peer, ctx)
            if work is not None:       # a gloo send: keep it (and its tensor) until done
                work.wait()
            reply = C.recv_from(torch.empty(n, dtype=dtype), peer, ctx)
            got.append(torch.equal(reply, (torch.arange(n).to(dtype) + i) * 2))
        else:
            x = C.recv_from(torch.empty(n, dtype=dtype), peer, ctx)
            got.append(torch.equal(x, torch.arange(n).to(dtype) + i))
            work = C.send_to(x * 2, peer, ctx)
            if work is not None:
                work.wait()
    return got


@pytest.mark.timeout(120)
def test_shm_messages_in_order_across_transports():
    from parallax.parallel.shm import ShmMailbox
    big = ShmMailbox.SLOT_BYTES // 8 + 5                     # int64: past one slot -> gloo
    sizes = [1, 577, big, 3] * (ShmMailbox.RING // 2) + [9]   # wraps around the ring
    results = spawn_ranks(2, _messages_both_ways, sizes, tp_size=1, pp_size=2)
    assert results[0] == [True] * len(sizes) and results[1] == [True] * len(sizes)


def _recv_from_silent_peer(ctx):
    ctx.p2p_shm.timeout_s = 2.0
    if ctx.rank == 0:
        return "silent"
    try:
        C.recv_from(torch.empty(4), 0, ctx)
    except RuntimeError as e:
        return str(e)
    return "no error"


@pytest.mark.timeout(120)
def test_shm_recv_times_out_instead_of_hanging():
    results = spawn_ranks(2, _recv_from_silent_peer, tp_size=1, pp_size=2)
    assert "timed out after 2.0 s waiting for a message from rank 0" in results[1]


def test_no_files_left_in_dev_shm():
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("parallax-")]

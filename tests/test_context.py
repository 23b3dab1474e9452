"""ParallelContext's choice of group for pickled-object collectives, in one process: under
NCCL a separate gloo group (objects stay in host memory, as vLLM does), under gloo the
default group. Only the choice and the routing are tested here; no GPU is needed."""

from __future__ import annotations

import datetime

import torch.distributed as dist

from parallax.parallel import collectives as C
from parallax.parallel.context import ParallelContext, _object_group

TIMEOUT = datetime.timedelta(seconds=10)


def test_nccl_gets_its_own_gloo_group_for_objects(one_rank_world):
    group = _object_group("nccl", TIMEOUT)
    assert group is not None and group is not dist.group.WORLD
    assert dist.get_backend(group) == "gloo"
    assert dist.get_process_group_ranks(group) == [0]


def test_gloo_reuses_the_default_group_for_objects(one_rank_world):
    assert _object_group("gloo", TIMEOUT) is None


def test_object_collectives_use_the_context_object_group(one_rank_world, monkeypatch):
    """broadcast_object and all_gather_object pass ctx.object_group to torch.distributed
    (world_size=2 on the context so they do not return early; the calls are recorded)."""
    calls = []
    monkeypatch.setattr(dist, "broadcast_object_list",
                        lambda box, src, group=None: calls.append(("broadcast", src, group)))
    monkeypatch.setattr(dist, "all_gather_object",
                        lambda out, obj, group=None: calls.append(("all_gather", group)))
    nccl = ParallelContext(world_size=2, tp_size=2, backend="nccl",
                           object_group=_object_group("nccl", TIMEOUT))
    gloo = ParallelContext(world_size=2, tp_size=2, backend="gloo",
                           object_group=_object_group("gloo", TIMEOUT))
    for ctx in (nccl, gloo):
        C.broadcast_object({"x": 1}, ctx, src=1)
        C.all_gather_object("y", ctx)
    assert calls == [("broadcast", 1, nccl.object_group), ("all_gather", nccl.object_group),
                     ("broadcast", 1, None), ("all_gather", None)]
    assert nccl.object_group is not None

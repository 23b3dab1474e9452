"""Shared-memory tp collectives and stage-to-stage messages (parallel/shm.py) against gloo,
in real processes; the segments' permissions, lifetime (also when a rank or the driver is
killed mid-setup) and the fallback to gloo when /dev/shm is short."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import signal
import stat
import subprocess
import sys
import time

import psutil
import pytest
import torch
import torch.distributed as dist

from conftest import wait_gone
from dist_utils import spawn_ranks
from parallax.errors import WorkerError
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


# ------------------------------------------------------------------ the segments' lifecycle
class _MapsEngine:
    """A toy engine whose ranks report which /dev/shm files they map."""

    def __init__(self, ctx):
        self.ctx = ctx

    def shm_maps(self) -> list[dict]:
        from conftest import shm_files_mapped_by
        return C.all_gather_object(shm_files_mapped_by([os.getpid()]), self.ctx)

    def all_reduce(self) -> float:
        return C.all_reduce_tp(torch.ones(3), self.ctx).sum().item()


def make_maps_engine(ctx):
    return _MapsEngine(ctx)


@pytest.mark.timeout(120)
def test_segments_are_unnamed_while_mapped_and_gone_after_close(tmp_path, monkeypatch):
    """A tp=2 x pp=2 pool maps three segments (two tp groups, one mailbox); by the time the
    ranks serve, none of them has a name in /dev/shm, and nothing of this pool's run is left
    after close. Only this pool's files are looked at (by run id and by inode)."""
    from conftest import named_in_dev_shm
    from parallax.parallel.launch import WorkerPool
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with WorkerPool(make_maps_engine, (), tp_size=2, pp_size=2, timeout_s=30) as pool:
        maps = pool.call("shm_maps")
        mine = [path for m in maps for path in m.values() if pool.run_id in path]
        assert len(mine) == 2 + 2 + 4, maps     # tp0 on ranks 0-1, tp1 on 2-3, p2p on all
        assert all(path.endswith("(deleted)") for path in mine), mine
        assert not named_in_dev_shm(ino for m in maps for ino in m), maps
        assert pool.call("all_reduce") == 6.0
        assert not os.listdir(tmp_path)         # the rendezvous folder went after start-up
    assert not glob.glob(f"/dev/shm/parallax-{pool.run_id}*")
    assert not named_in_dev_shm(ino for m in maps for ino in m)


def test_segment_is_created_owner_only_whatever_the_umask(tmp_path):
    from parallax.parallel.shm import ShmGroup
    path = f"/dev/shm/parallax-test-{os.getpid()}-{tmp_path.name}"
    old = os.umask(0)
    try:
        group = ShmGroup(path, 0, 1, 1.0, create=True)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with pytest.raises(FileExistsError):            # never reuses a file someone made
            ShmGroup(path, 0, 1, 1.0, create=True)
    finally:
        group.close()
        os.unlink(path)


def test_attaching_refuses_a_segment_others_can_read(tmp_path):
    from parallax.parallel.shm import ShmGroup
    path = f"/dev/shm/parallax-test-{os.getpid()}-{tmp_path.name}"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, ShmGroup.nbytes(2))
        os.fchmod(fd, 0o644)
        with pytest.raises(RuntimeError, match="refusing shared-memory segment .* mode 644"):
            ShmGroup(path, 1, 2, 1.0, create=False)
    finally:
        os.close(fd)
        os.unlink(path)


def _run_pool_crashing_at(victim: str, run_id: str, monkeypatch, tmp_path):
    from parallax.parallel.launch import WorkerPool
    from toy_engines import make_toy
    monkeypatch.setenv("PARALLAX_TEST_CRASH_AT", f"shm:{victim}:self")
    monkeypatch.setattr("parallax.parallel.shm.new_run_id", lambda: run_id)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with pytest.raises(WorkerError, match=f"rank {victim} .*died with signal SIGKILL"):
        WorkerPool(make_toy, (), tp_size=2, pp_size=1, timeout_s=30)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim", ["0", "1"], ids=["creator", "attacher"])
def test_rank_killed_between_create_and_attach_leaves_nothing(victim, monkeypatch, tmp_path):
    """Rank 0 creates the tp segment, rank 1 maps it; SIGKILL either in between. The
    creator dies with the file still named; the attacher leaves the creator waiting.
    Afterwards this run's segment and rendezvous folder are gone."""
    run_id = f"{os.getpid()}-crash{victim}"
    _run_pool_crashing_at(victim, run_id, monkeypatch, tmp_path)
    assert not glob.glob(f"/dev/shm/parallax-{run_id}*")
    assert not os.listdir(tmp_path)


DRIVER = """
import sys, tempfile
sys.path[:0] = [{src!r}, {tests!r}]
import parallax.parallel.shm as shm
shm.new_run_id = lambda: {run_id!r}
tempfile.tempdir = {tmp!r}
from parallax.parallel.launch import WorkerPool
from toy_engines import make_toy
WorkerPool(make_toy, (), tp_size=2, pp_size=1, timeout_s=60)
"""


@pytest.mark.timeout(120)
def test_driver_killed_between_create_and_attach_leaves_nothing(tmp_path):
    """Rank 1, about to map the segment rank 0 created, SIGKILLs the driver (a separate
    process here) and stalls: the workers see their parent gone, remove the segment and
    the rendezvous folder, and exit."""
    run_id = f"{os.getpid()}-crashdriver"
    tests = os.path.dirname(__file__)
    script = DRIVER.format(src=os.path.join(tests, "..", "src"), tests=tests, run_id=run_id,
                           tmp=str(tmp_path))
    env = {**os.environ, "PARALLAX_TEST_CRASH_AT": "shm:1:parent"}
    driver = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True)
    workers: set[int] = set()
    try:
        t0 = time.monotonic()
        while driver.poll() is None and time.monotonic() - t0 < 90:
            with contextlib.suppress(psutil.Error):
                # Spawned workers only, once exec'd (a child just forked still shows the
                # driver's command line; the resource tracker is no worker).
                workers |= {p.pid for p in psutil.Process(driver.pid).children()
                            if "spawn_main" in " ".join(p.cmdline())}
            time.sleep(0.05)
        assert driver.returncode == -signal.SIGKILL
        assert len(workers) == 2
        assert wait_gone(workers, 10), "workers outlived their driver"
        assert not glob.glob(f"/dev/shm/parallax-{run_id}*")
        assert not os.listdir(tmp_path)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(10)


# ------------------------------------------------------------------ room in /dev/shm
def _fake_statvfs(free_bytes: int):
    real = os.statvfs

    def statvfs(path):
        st = real(path)
        return os.statvfs_result((st.f_bsize, 4096, st.f_blocks, free_bytes // 4096,
                                  free_bytes // 4096, *st[5:]))
    return statvfs


def test_segment_larger_than_free_dev_shm_falls_back_to_gloo(one_rank_world, monkeypatch,
                                                               caplog):
    """Docker's default /dev/shm is 64 MiB. A segment must not be created beyond the free
    space (tmpfs would SIGBUS on first touch past it): gloo instead, with a warning. Just
    below the need it is refused, just above it is made (the tp segment of a one-rank
    group here, 8 MiB)."""
    from parallax.parallel.context import ParallelContext, _local_shm_group
    from parallax.parallel.shm import ShmGroup
    ctx = ParallelContext(rank=0, world_size=1, backend="gloo")
    need = ShmGroup.nbytes(1)
    monkeypatch.setattr(os, "statvfs", _fake_statvfs(need - 4096))
    with caplog.at_level(logging.WARNING, logger="parallax.parallel.context"):
        assert _local_shm_group(ctx, f"{os.getpid()}-room") is None
    assert "gloo instead" in caplog.text and "/dev/shm has 8.0 MiB free" in caplog.text
    assert not glob.glob(f"/dev/shm/parallax-{os.getpid()}-room*")
    monkeypatch.setattr(os, "statvfs", _fake_statvfs(need + 4096))
    group = _local_shm_group(ctx, f"{os.getpid()}-room")
    assert isinstance(group, ShmGroup)
    group.close()
    assert not glob.glob(f"/dev/shm/parallax-{os.getpid()}-room*")   # unlinked once mapped


def test_mailbox_needs_its_pairs_and_the_tp_segments():
    """What the space check asks for: 16 MiB per ordered pair of different ranks (a rank
    never messages itself), plus the tp segments made just before and not yet touched.
    Docker's 64 MiB holds tp=2 (16 MiB) and pp=2 (32 MiB), not tp=2 x pp=2's mailbox."""
    from parallax.parallel.shm import ShmGroup, ShmMailbox
    mib = 2**20
    assert ShmGroup.nbytes(2) // mib == 16
    assert ShmMailbox.nbytes(2) // mib == 32 and ShmMailbox.nbytes(4) // mib == 192


def _transport_and_sum(ctx):
    return ctx.tp_shm is None, C.all_reduce_tp(torch.full((5,), ctx.rank + 1.0), ctx).tolist()


@pytest.mark.timeout(120)
def test_shm_size_cap_switches_ranks_to_gloo(monkeypatch):
    """PARALLAX_SHM_MAX_BYTES below the tp segment's size: every rank agrees on gloo."""
    from parallax.parallel.shm import ShmGroup
    monkeypatch.setenv("PARALLAX_SHM_MAX_BYTES", str(ShmGroup.nbytes(2) - 1))
    results = spawn_ranks(2, _transport_and_sum)
    assert results == [(True, [3.0] * 5)] * 2

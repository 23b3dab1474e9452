"""The worker launcher: results from the driver rank, layouts, streaming, and failures
(remote exceptions, start-up errors, killed ranks, collective timeouts) that must surface
quickly as errors and leave no process behind."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
if importlib.util.find_spec("parallax") is None:    # not installed: use the checkout
    sys.path.insert(0, str(SRC))                     # (spawned workers inherit sys.path)

from conftest import gone, wait_gone  # noqa: E402
from dist_utils import spawn_ranks  # noqa: E402
from parallax.errors import CheckpointError, PromptError, WorkerError  # noqa: E402
from parallax.parallel.launch import WorkerPool  # noqa: E402
from toy_engines import (describe_layout, fail_on_rank_one,  # noqa: E402
                         make_broken_checkpoint, make_broken_generic, make_toy)


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(make_toy, (2.0,), tp_size=2, pp_size=1, timeout_s=20) as p:
        yield p
    assert wait_gone(p.pids, 1)


# ------------------------------------------------------------------ results and layouts
def test_result_comes_from_driver_rank(pool):
    me = pool.call("whoami")
    assert me["rank"] == 0 and me["pid"] == pool.pids[0]
    assert me["threads"] == max(1, (os.cpu_count() or 1) // 2)
    assert pool.call("tp_sum", 1.5) == pytest.approx(2.0 * 1.5 * (1 + 2))
    assert pool.alive


def test_tp2_pp2_layout_groups_stage_neighbours():
    with WorkerPool(make_toy, (), tp_size=2, pp_size=2, timeout_s=20) as p:
        out = p.call("layout")
        assert out["driver"]["rank"] == 3 - 1            # tp rank 0 of the last stage
        assert out["driver"]["pid"] == p.pids[2]
        assert out["tp_rank"] == [0, 1, 0, 1]
        assert out["pp_rank"] == [0, 0, 1, 1]
        assert out["tp_sum"] == [1, 1, 5, 5]             # groups {0, 1} and {2, 3}
        pids = p.pids
    assert wait_gone(pids, 1)


def test_spawn_ranks_tp2_pp2_layout():
    per_rank = spawn_ranks(4, describe_layout, tp_size=2, pp_size=2, timeout=60)
    assert [r["rank"] for r in per_rank] == [0, 1, 2, 3]
    assert [(r["pp_rank"], r["tp_rank"]) for r in per_rank] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["tp_sum"] for r in per_rank] == [1, 1, 5, 5]
    assert {r["driver_rank"] for r in per_rank} == {2}
    assert wait_gone([r["pid"] for r in per_rank], 1)


def test_spawn_ranks_reports_failing_rank():
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 failed.*ValueError: rank one refuses"):
        spawn_ranks(2, fail_on_rank_one, timeout=60)


# ------------------------------------------------------------------ streaming
def test_stream_yields_in_order_then_returns(pool):
    gen = pool.call_stream("count", 5)
    items = []
    with pytest.raises(StopIteration) as stop:
        while True:
            items.append(next(gen))
    assert items == [0, 1, 2, 3, 4]
    assert stop.value.value == "done 5"


def test_stream_items_arrive_as_emitted(pool):
    t0 = time.monotonic()
    arrivals = [time.monotonic() - t0 for _ in pool.call_stream("count", 3, delay_s=0.5)]
    assert arrivals[0] < 0.45 and arrivals[1] > 0.4     # not buffered until the end


def test_leaving_a_stream_early_keeps_pool_in_step(pool):
    for item in pool.call_stream("count", 10, delay_s=0.01):
        if item == 2:
            break
    assert pool.call("tp_sum", 1.0) == pytest.approx(6.0)


def test_call_overhead(pool):
    for _ in range(50):
        pool.call("noop")
    n = 500
    t0 = time.perf_counter()
    for _ in range(n):
        pool.call("noop")
    per_call_us = (time.perf_counter() - t0) / n * 1e6
    print(f"\nno-op call round trip, tp=2: {per_call_us:.0f} us")
    assert per_call_us < 5000


# ------------------------------------------------------------------ errors
def test_parallax_error_on_every_rank_keeps_type_and_pool(pool):
    with pytest.raises(PromptError, match="prompt too long"):
        pool.call("reject", "prompt too long")
    assert pool.alive and pool.call("tp_sum", 1.0) == pytest.approx(6.0)


def test_worker_exception_is_worker_error_and_closes_pool():
    p = WorkerPool(make_toy, (), tp_size=2, pp_size=1, timeout_s=20)
    with pytest.raises(WorkerError, match="rank 1 raised builtins.ValueError: kaboom") as info:
        p.call("fail_on", 1, "kaboom")
    assert "kaboom" in str(info.value.__cause__)              # the remote traceback
    assert "fail_on" in str(info.value.__cause__)
    assert not p.alive and wait_gone(p.pids, 1)
    with pytest.raises(WorkerError, match="pool is closed because worker rank 1 raised"):
        p.call("noop")
    p.close()


def _children() -> set[int]:
    """Our child processes, less multiprocessing's resource tracker (started by the first
    spawn in this process, whichever test that is, and meant to stay)."""
    out = set()
    for c in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "resource_tracker" not in " ".join(c.cmdline()):
                out.add(c.pid)
    return out


def test_factory_checkpoint_error_keeps_its_type():
    before = _children()
    with pytest.raises(CheckpointError, match="no checkpoint at /nope/model"):
        WorkerPool(make_broken_checkpoint, ("/nope/model",), tp_size=2, pp_size=1)
    assert wait_gone(list(_children() - before), 2)


def test_factory_other_error_is_worker_error():
    with pytest.raises(WorkerError, match="rank 1 raised builtins.KeyError: 'rank one cannot"):
        WorkerPool(make_broken_generic, (), tp_size=2, pp_size=1)


def test_unpicklable_factory_is_a_clear_type_error():
    with pytest.raises(TypeError, match="picklable"):
        WorkerPool(lambda ctx: None, (), tp_size=2, pp_size=1)


def test_killed_worker_raises_quickly_and_leaves_nothing():
    p = WorkerPool(make_toy, (), tp_size=2, pp_size=1, timeout_s=60)
    pids = p.pids
    killer = threading.Timer(1.0, os.kill, (pids[1], signal.SIGKILL))
    killer.start()
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank 1 \(pid \d+\) died with signal SIGKILL") as info:
        p.call("spin", 60.0)
    elapsed = time.monotonic() - t0
    killer.join()
    assert elapsed < 30, elapsed
    print(f"\nkilled rank noticed after {elapsed - 1.0:.2f} s")
    assert "spin()" in str(info.value)
    assert wait_gone(pids, 1) and not p.alive
    with pytest.raises(WorkerError, match="pool is closed because worker rank 1"):
        p.call("noop")


def test_collective_one_rank_skips_times_out():
    p = WorkerPool(make_toy, (), tp_size=2, pp_size=1, timeout_s=3)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="rank 0 raised") as info:
        p.call("skip_collective", 1)
    elapsed = time.monotonic() - t0
    assert 2.5 < elapsed < 15, elapsed
    assert "skip_collective()" in str(info.value)
    assert wait_gone(p.pids, 1)


def test_ctrl_c_while_waiting_shuts_the_pool_down():
    # A process started in the background by a non-interactive shell inherits SIGINT as
    # ignored, and Python then keeps it ignored: install the handler a terminal user has.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        p = WorkerPool(make_toy, (), tp_size=2, pp_size=1)
        pids = p.pids
        ctrl_c = threading.Timer(
            0.5, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
        t0 = time.monotonic()
        ctrl_c.start()
        with pytest.raises(KeyboardInterrupt):
            p.call("spin", 30.0)
        ctrl_c.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - t0 < 10
    assert wait_gone(pids, 1) and not p.alive
    with pytest.raises(WorkerError, match="closed because KeyboardInterrupt while running spin"):
        p.call("noop")


# ------------------------------------------------------------------ lifecycle
def test_nested_call_inside_open_stream_is_refused(pool):
    for item in pool.call_stream("count", 3):
        if item == 0:
            with pytest.raises(RuntimeError, match="already in flight"):
                pool.call("noop")
    assert pool.call("tp_sum", 1.0) == pytest.approx(6.0)


def test_close_is_idempotent_and_leaves_nothing():
    p = WorkerPool(make_toy, (), tp_size=2, pp_size=1)
    pids = p.pids
    assert p.alive and all(not gone(pid) for pid in pids)
    t0 = time.monotonic()
    p.close()
    assert time.monotonic() - t0 < 5
    p.close()
    assert not p.alive and all(gone(pid) for pid in pids)
    with pytest.raises(WorkerError, match=r"closed because close\(\) was called"):
        p.call("noop")


def test_two_pools_at_once(pool):
    with WorkerPool(make_toy, (10.0,), tp_size=2, pp_size=1) as other:
        assert set(other.pids).isdisjoint(pool.pids)
        for x in (1.0, 2.0):
            assert other.call("tp_sum", x) == pytest.approx(10.0 * x * 3)
            assert pool.call("tp_sum", x) == pytest.approx(2.0 * x * 3)


def test_unguarded_script_works_and_workers_die_with_driver(tmp_path):
    script = tmp_path / "no_main_guard.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys, threading
        sys.path[:0] = [{str(SRC)!r}, {str(TESTS)!r}]
        from parallax.parallel.launch import WorkerPool
        from toy_engines import make_toy
        pool = WorkerPool(make_toy, (), tp_size=2, pp_size=1)
        print(pool.call("tp_sum", 1.0), *pool.pids, flush=True)
        # The driver dies without cleaning up while the workers are busy in collectives.
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGKILL)).start()
        pool.call("spin", 60.0)
    """))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == -signal.SIGKILL, run.stderr
    total, *pids = run.stdout.split()
    assert float(total) == 3.0 and len(pids) == 2
    assert run.stderr == ""                               # workers print no noise
    assert wait_gone([int(p) for p in pids], 5)

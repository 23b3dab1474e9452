"""A dead rank ends the run with a clear error in bounded time, and nothing is left behind."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

import parallax
from conftest import make_checkpoint
from parallax import CheckpointError, WorkerError


@pytest.fixture(scope="module")
def long_context(tmp_path_factory) -> str:
    """A tiny model with room for thousands of decode steps."""
    return make_checkpoint(str(tmp_path_factory.mktemp("long")), "llama", max_position_embeddings=8192)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kw, victim", [(dict(tp=2), 1), (dict(pp=2), 0), (dict(tp=2, pp=2), 3)],
                         ids=["tp2-rank1", "pp2-first-stage", "tp2xpp2-last-stage"])
def test_killed_worker_mid_generation_raises_quickly(long_context, kw, victim):
    llm = parallax.LLM(long_context, threads_per_rank=1, timeout_s=20, **kw)
    pids = llm._pool.pids
    killer = threading.Timer(1.5, os.kill, (pids[victim], signal.SIGKILL))
    killer.start()
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=rf"rank {victim} .*died"):
        llm.generate([[1, 2, 3]] * 2, max_new_tokens=8000, ignore_eos=True)
    assert time.monotonic() - t0 < 30
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
              for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    with pytest.raises(WorkerError, match="closed"):
        llm.generate([[1, 2]], max_new_tokens=2)
    llm.close()


@pytest.mark.timeout(60)
def test_bad_checkpoint_with_tp_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        parallax.LLM(str(tmp_path / "missing"), tp=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        parallax.LLM(str(empty), tp=2)


@pytest.mark.timeout(60)
def test_close_leaves_no_process(tiny_llama):
    llm = parallax.LLM(tiny_llama, tp=2, threads_per_rank=1)
    pids = llm._pool.pids
    assert llm.generate([[1, 2, 3]], max_new_tokens=4, ignore_eos=True)[0].token_ids
    llm.close()
    llm.close()
    assert not [p for p in pids if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]

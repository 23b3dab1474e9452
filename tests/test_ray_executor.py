"""Ranks as Ray actors (parallel/ray_executor.py) with pp steps in flight: at pp=2 (and tp=2,
one step in flight) requests from several threads at staggered times equal each alone, and
a dead stage ends the run with a clear error in bounded time.

The module starts its own local Ray (``ray.init`` with a few CPUs, no dashboard) and shuts
it down after; no Ray process may be left. The oracle is one-process ``LLM.generate`` on
the same tiny random checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import psutil
import pytest

import ray  # noqa: E402  (pip install 'parallax[ray]')

import parallax  # noqa: E402
from conftest import make_checkpoint  # noqa: E402
from dist_utils import count_steps_in_flight  # noqa: E402
from parallax import WorkerError  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

GREEDY = dict(max_new_tokens=24, ignore_eos=True, chat=False)
PROMPTS = [[(7 * i + j) % 60 + 3 for j in range(2 + 3 * i)] for i in range(8)]


def _ray_processes() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE and "ray" in " ".join(p.cmdline()):
                out.append(p)
    return out


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """A local Ray of 4 CPUs for this module; afterwards none of its processes is alive.
    Without token auth, as test_ray_serve.py's cluster: Ray keeps the auth mode of the
    first ``ray.init`` for the whole process, and a later driver connection to a cluster of
    the other mode cannot start actors."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 object_store_memory=100 << 20)
        try:
            yield
        finally:
            ray.shutdown()
    deadline = time.monotonic() + 20
    while _ray_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _ray_processes()
    for p in left:                       # never leave one behind, even when failing
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not left, [(p.pid, " ".join(p.cmdline())[:80]) for p in left]


@pytest.fixture(scope="module")
def alone(tiny_llama):
    with parallax.LLM(tiny_llama) as one:
        return [one.generate([p], **GREEDY)[0].token_ids for p in PROMPTS]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("tp, pp", [(1, 2), (2, 1)])
def test_ray_ranks_keep_pp_steps_in_flight_and_equal_each_request_alone(tiny_llama, alone,
                                                                        tp, pp):
    with parallax.LLM(tiny_llama, tp=tp, pp=pp, executor="ray", threads_per_rank=1,
                      timeout_s=60) as llm:
        assert type(llm._pool).__name__ == "RayExecutor"
        llm.memory()                               # nothing in flight when counting starts
        in_flight = count_steps_in_flight(llm._pool)
        got: dict = {}

        def worker(k: int) -> None:
            for i in range(k, len(PROMPTS), 4):
                time.sleep(0.03 * i)
                got[i] = llm.submit(PROMPTS[i], **GREEDY).result(timeout=120).token_ids

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        assert [got.get(i) for i in range(len(PROMPTS))] == alone
        assert in_flight[1] == pp, in_flight                # pp=2: both stages busy at once
        # A side call after steps in flight: every rank answers, in order.
        assert sorted(m["rank"] for m in llm.memory()) == [0, 1]
        assert llm.stats()["kv_cache_usage"] == 0


@pytest.fixture(scope="module")
def long_context(tmp_path_factory) -> str:
    """A tiny model with room for thousands of decode steps."""
    return make_checkpoint(str(tmp_path_factory.mktemp("long")), "llama",
                           max_position_embeddings=8192)


@pytest.mark.timeout(180)
def test_pp2_ray_dead_first_stage_raises_quickly(long_context):
    """SIGKILL of stage 0's actor while steps are in flight: WorkerError naming rank 0
    within bounded time, the other rank's actor is killed, later calls say closed."""
    llm = parallax.LLM(long_context, pp=2, executor="ray", threads_per_rank=1, timeout_s=60)
    try:
        pids = [w["pid"] for w in llm._pool.where]
        killer = threading.Timer(1.5, os.kill, (pids[0], signal.SIGKILL))
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=r"rank 0 .*died"):
            llm.generate([[1, 2, 3]] * 4, max_new_tokens=8000, ignore_eos=True)
        assert time.monotonic() - t0 < 30
        killer.join()
        deadline = time.monotonic() + 15
        while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if psutil.pid_exists(p)
                    and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        with pytest.raises(WorkerError, match="closed"):
            llm.generate([[1, 2]], max_new_tokens=2)
    finally:
        llm.close()

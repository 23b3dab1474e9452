"""A dead rank ends the run with a clear error in bounded time, and nothing is left behind;
a live pool is reachable only from this machine, and a killed driver leaves nothing either."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

import parallax
from conftest import make_checkpoint, named_in_dev_shm, shm_files_mapped_by, wait_gone
from parallax import CheckpointError, WorkerError


# every LLM of this module closed, none of its processes may be alive (conftest.py)
pytestmark = pytest.mark.usefixtures("no_process_left_behind")


@pytest.fixture(scope="module")
def long_context(tmp_path_factory) -> str:
    """A tiny model with room for thousands of decode steps."""
    return make_checkpoint(str(tmp_path_factory.mktemp("long")), "llama",
                           max_position_embeddings=8192)


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


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kw, victim", [(dict(tp=2), 1), (dict(pp=2), 0)],
                         ids=["tp2-shm-collective", "pp2-stage-recv"])
def test_stalled_worker_times_out_after_timeout_s(long_context, kw, victim):
    """A worker that stops answering (SIGSTOP: alive, but stuck) is not a death the driver can
    see; the other ranks' collectives give up after ``LLM(timeout_s=...)`` and the driver
    raises WorkerError, then kills everything (SIGKILL reaches a stopped process)."""
    timeout_s = 4.0
    llm = parallax.LLM(long_context, threads_per_rank=1, timeout_s=timeout_s, **kw)
    pids = llm._pool.pids
    stopper = threading.Timer(1.0, os.kill, (pids[victim], signal.SIGSTOP))
    stopper.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(WorkerError, match=r"[Tt]imed out .*(4\.0 s|4000 ?ms)") as info:
            llm.generate([[1, 2, 3]] * 2, max_new_tokens=8000, ignore_eos=True)
        elapsed = time.monotonic() - t0
        assert f"ranks [{victim}] did not answer" in str(info.value)
        # Not before the configured timeout (nothing died), and not long after it.
        assert timeout_s <= elapsed < timeout_s + 15, elapsed
    finally:
        stopper.join()
        llm.close()
        for p in pids:                      # if the test failed early: never leave a stopped pid
            if psutil.pid_exists(p):
                with contextlib.suppress(psutil.Error):
                    psutil.Process(p).kill()
    assert not [p for p in pids if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


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


def _is_loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip.split("%")[0]).is_loopback


@pytest.mark.timeout(120)
def test_live_pool_listens_on_loopback_only(tiny_llama, tmp_path, monkeypatch):
    """While an LLM(tp=2) is alive, no process of ours (driver or worker) has a TCP port
    listening beyond loopback: the rendezvous is a file in an owner-only folder (a c10d
    TCPStore listened on '::', every interface) and gloo binds the loopback interface, even
    when GLOO_SOCKET_IFNAME names a public one."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    public = [name for name, addrs in psutil.net_if_addrs().items()
              if any(a.family == socket.AF_INET and not _is_loopback(a.address) for a in addrs)]
    if public:      # as a multi-node job's environment would say; a pool is one machine
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", public[0])
    with parallax.LLM(tiny_llama, tp=2, threads_per_rank=1) as llm:
        ours = {os.getpid(), *llm._pool.pids}
        listening = [c for c in psutil.net_connections(kind="tcp")
                     if c.pid in ours and c.status == psutil.CONN_LISTEN]
        print("\nlistening while LLM(tp=2) is alive:", sorted((c.pid, c.laddr) for c in listening))
        assert listening, "expected gloo's loopback listeners (is psutil seeing our sockets?)"
        assert all(_is_loopback(c.laddr.ip) for c in listening), listening
        assert llm.generate([[1, 2, 3]], max_new_tokens=2, ignore_eos=True)[0].token_ids
        assert not os.listdir(tmp_path)          # the rendezvous folder went after start-up


DRIVER = """
import sys
import parallax
llm = parallax.LLM({model!r}, tp=2, threads_per_rank=1)
llm.generate([[1, 2, 3]], max_new_tokens=2, ignore_eos=True)
print(getattr(llm._pool, "run_id", "?"), *llm._pool.pids, flush=True)
sys.stdin.read()                                 # until the test kills us
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kill", ["driver", "process-group"])
def test_killed_driver_leaves_nothing_in_dev_shm(tiny_llama, tmp_path, kill):
    """A driver holding an LLM(tp=2) is SIGKILLed: alone (its workers must notice and exit)
    or with its whole process group, workers and multiprocessing's resource tracker
    included (what a notebook kernel restart does). Nothing of ours may stay in /dev/shm:
    while the pool lives, no /dev/shm file its processes map still has a name (spawn-
    context semaphores, sem.mp-*, would: only the resource tracker unlinks them), and after
    the kill none of those files and no segment of the pool's run is there."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER.format(model=tiny_llama)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=env, start_new_session=True)
    try:
        run_id, *pids = driver.stdout.readline().split()
        workers = [int(p) for p in pids]
        assert len(workers) == 2, run_id
        tree = [driver.pid] + [p.pid for p in psutil.Process(driver.pid).children(True)]
        mapped = shm_files_mapped_by(tree)
        print(f"\n/dev/shm files mapped by the pool's processes: {sorted(mapped.values())}")
        assert not named_in_dev_shm(mapped), (mapped, named_in_dev_shm(mapped))
        if kill == "driver":
            os.kill(driver.pid, signal.SIGKILL)
        else:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(10)
        t0 = time.monotonic()
        assert wait_gone(workers, 5), "workers outlived their driver"
        print(f"workers gone {time.monotonic() - t0:.2f} s after the kill")
        assert not named_in_dev_shm(mapped)
        assert not [f for f in os.listdir("/dev/shm") if run_id in f]
        assert not [f for f in os.listdir(tmp_path) if f.startswith("parallax-")]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(10)

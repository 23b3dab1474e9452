"""``spawn_ranks``: run one function on every rank of a tp x pp layout, in fresh processes.

The multi-process tier of the tests goes through this one helper: spawn context, the
worker pool's rendezvous (a FileStore in an owner-only temporary folder: no port, so no
races between concurrent runs), a timeout, exit codes checked, every process killed on
failure, nothing left behind.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import time
import traceback
from multiprocessing import connection, get_context
from typing import Any, Callable



def _rank_main(rank: int, tp_size: int, pp_size: int, store_path: str, timeout_s: float,
               fn: Callable[..., Any], args: tuple, conn: connection.Connection) -> None:
    import torch

    from parallax.parallel.context import ParallelContext, file_store
    from parallax.parallel.launch import _loopback_only

    _loopback_only()                                  # all ranks are local
    torch.set_num_threads(1)
    ctx = None
    try:
        store = file_store(store_path, tp_size * pp_size, timeout_s)
        ctx = ParallelContext.initialize(rank=rank, tp_size=tp_size, pp_size=pp_size,
                                         device="cpu", timeout_s=timeout_s, store=store)
        # Plain pickle: a connection's pickler would share tensors by passing a file
        # descriptor that the parent fetches from this process later, after os._exit below.
        conn.send_bytes(pickle.dumps(("ok", fn(ctx, *args))))
    except BaseException:  # noqa: BLE001
        conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
    finally:
        if ctx is not None:
            ctx.destroy()
    conn.close()
    os._exit(0)        # skip torch's slow interpreter teardown; the result is already sent


def spawn_ranks(n: int, fn: Callable[..., Any], *args: Any, timeout: float = 120,
                tp_size: int | None = None, pp_size: int | None = None) -> list[Any]:
    """Run ``fn(ctx, *args)`` on ``n`` ranks; return their results, by rank.

    ``fn`` must be a top-level function of an importable module. Default layout: tp = n.
    Raises ``RuntimeError`` with the failing rank's traceback (or exit code), or on timeout.
    """
    if tp_size is None and pp_size is None:
        tp_size, pp_size = n, 1
    elif tp_size is None:
        tp_size = n // pp_size
    elif pp_size is None:
        pp_size = n // tp_size
    assert tp_size * pp_size == n, f"tp {tp_size} x pp {pp_size} != {n} ranks"
    folder = tempfile.mkdtemp(prefix="parallax-test-rdzv-")
    mp = get_context("spawn")
    procs, conns = [], []
    try:
        for rank in range(n):
            parent_end, child_end = mp.Pipe(duplex=False)
            p = mp.Process(target=_rank_main, name=f"spawn-rank-{rank}",
                           args=(rank, tp_size, pp_size, os.path.join(folder, "store"),
                                 min(timeout, 60.0), fn, args, child_end))
            p.start()
            child_end.close()
            procs.append(p)
            conns.append(parent_end)
        results: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(results) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"spawn_ranks: timed out after {timeout} s; ranks "
                                   f"{sorted(set(range(n)) - set(results))} did not finish")
            waiting = [r for r in range(n) if r not in results]
            connection.wait([conns[r] for r in waiting] + [procs[r].sentinel for r in waiting],
                            min(left, 0.5))
            for r in waiting:
                if conns[r].poll():
                    try:
                        kind, value = pickle.loads(conns[r].recv_bytes())
                    except EOFError:
                        kind, value = "error", f"exit code {procs[r].join(5) or procs[r].exitcode}"
                    if kind == "error":
                        raise RuntimeError(f"spawn_ranks: rank {r} failed:\n{value}")
                    results[r] = value
                elif procs[r].exitcode is not None:
                    raise RuntimeError(f"spawn_ranks: rank {r} exited with code "
                                       f"{procs[r].exitcode} without a result")
        for r, p in enumerate(procs):
            p.join(30)
            if p.exitcode != 0:
                raise RuntimeError(f"spawn_ranks: rank {r} exit code {p.exitcode}")
        return [results[r] for r in range(n)]
    finally:
        for p in procs:
            if p.exitcode is None:
                p.kill()
        for p in procs:
            p.join(10)
        for c in conns:
            c.close()
        shutil.rmtree(folder, ignore_errors=True)


def count_steps_in_flight(pool: Any) -> list[int]:
    """Wrap a pool's ``submit`` / ``collect`` (WorkerPool, RayExecutor, SpmdRanks) to count
    the commands in flight; returns ``[now, most at once]``, kept up to date. Call it while
    none is in flight (e.g. right after a side call such as ``llm.memory()``)."""
    import threading
    count, lock = [0, 0], threading.Lock()
    submit, collect = pool.submit, pool.collect

    def counted_submit(*args: Any) -> None:
        submit(*args)
        with lock:
            count[0] += 1
            count[1] = max(count)

    def counted_collect() -> Any:
        with lock:
            count[0] -= 1
        return collect()

    pool.submit, pool.collect = counted_submit, counted_collect
    return count

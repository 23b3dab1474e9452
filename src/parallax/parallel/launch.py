"""Parallax's own launcher: this process drives, ``tp * pp`` spawned processes compute.

Used by ``parallax.LLM(model, tp=N, pp=M)`` when it is not running under torchrun (plain
scripts, notebooks). Design choices:

* **spawn**, never fork: safe with CUDA and threads, works from notebooks. The worker entry
  point lives here, so children never need the user's ``__main__``; unless the factory (or
  its arguments) come from ``__main__``, the children do not re-import it either, so a
  script without an ``if __name__ == "__main__"`` guard still works.
* **Nothing reachable from outside, nothing left behind**: the workers meet through a
  ``FileStore`` in an owner-only (0700) temporary folder (a TCPStore would listen on every
  interface, unauthenticated, even when given 127.0.0.1; a file needs no port, so pools
  never race for one), and gloo (NCCL: its bootstrap) listens on the loopback interface
  only. The folder goes once start-up is done (on CPUs, where gloo connects every group
  while it is created), at close, or when a worker sees the driver die; so do shared-memory
  segments a killed rank left (``shm.sweep``). Workers create no named semaphores (the
  ``sem.mp-*`` files that outlive a killed process group).
* **SPMD commands over one duplex pipe per worker**: ``call(method, ...)`` sends the same
  command to every rank; every rank runs ``getattr(engine, method)(...)``; only the driver
  rank (``ctx.driver_rank``) sends its result back, the others send a bare acknowledgement.
* **Failures are loud and quick**: the driver waits on the pipes and on every process's
  sentinel at once (``multiprocessing.connection.wait``), so a dead rank is seen at once;
  it then kills the other ranks (they may be stuck in a collective) and raises
  ``WorkerError`` naming the rank and its exit code or signal. A remote exception comes back
  with its traceback (as ``__cause__``). Errors that are ``ParallaxError``s (other than
  ``WorkerError``) keep their type, so e.g. a bad checkpoint path raises ``CheckpointError``
  with tp=2 just as with tp=1. If every rank answered and every error was such a deliberate
  ``ParallaxError`` (input validation that runs SPMD), no rank can be stuck, so the pool
  stays usable; any other failure shuts the pool down and later calls raise
  "the worker pool is closed because ...".
* **No process left behind**: ``close()`` (idempotent; also the context manager, garbage
  collection and interpreter exit) asks workers to stop, joins with a timeout, then
  SIGTERM, then SIGKILL. Workers poll their parent's pid and exit if the driver dies, and
  ignore SIGINT so Ctrl-C reaches only the driver (which then shuts the pool down).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import io
import logging
import multiprocessing as mp
import multiprocessing.connection as mpc
import multiprocessing.util  # noqa: F401  imported before atexit.register below: hooks run LIFO
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import types
import weakref
from typing import Any, Callable, Generator, Iterator

from multiprocessing.reduction import ForkingPickler

from ..errors import ParallaxError, WorkerError

logger = logging.getLogger(__name__)

_POLL_S = 0.5          # driver: longest wait between liveness checks
_ERROR_GRACE_S = 1.0   # driver: after one rank fails, how long the others get to answer
_STOP_GRACE_S = 5.0    # close(): how long workers get to exit on their own
_KILL_GRACE_S = 2.0    # after SIGTERM, before SIGKILL
_WATCHDOG_S = 0.5      # worker: how often it checks that the driver is still alive


# ---------------------------------------------------------------------------- worker side
@dataclasses.dataclass(frozen=True)
class _WorkerSpec:
    factory: Callable[..., Any]
    factory_args: tuple
    tp_size: int
    pp_size: int
    device: str
    timeout_s: float
    threads: int
    store_path: str        # FileStore in the driver's owner-only temporary folder
    run_id: str            # names this pool's shared-memory segments
    parent_pid: int


def _error_info(exc: BaseException, rank: int) -> dict:
    """What a worker sends back about an exception (always picklable)."""
    keep_type = isinstance(exc, ParallaxError) and not isinstance(exc, WorkerError)
    pickled = None
    if keep_type:
        with contextlib.suppress(Exception):
            pickled = pickle.dumps(exc)
    return {"rank": rank, "pid": os.getpid(),
            "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "message": str(exc), "keep_type": keep_type, "pickled": pickled,
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}


def _release(store_path: str, run_id: str) -> None:
    """Remove a pool's rendezvous folder and any shared-memory segment of its run."""
    from .shm import sweep
    shutil.rmtree(os.path.dirname(store_path), ignore_errors=True)
    removed = sweep(run_id)
    if removed:
        logger.debug("removed shared-memory segments left by a killed rank: %s", removed)


def _watch_parent(spec: _WorkerSpec) -> None:
    """Exit when the driver is gone (we were re-parented), even mid-collective, removing
    what the driver would have. A polling thread rather than PR_SET_PDEATHSIG, which
    fires when the *thread* that started us ends (a driver may build its pool in a
    short-lived thread)."""
    while True:
        if os.getppid() != spec.parent_pid:
            with contextlib.suppress(Exception):
                _release(spec.store_path, spec.run_id)
            os._exit(1)
        time.sleep(_WATCHDOG_S)


def _loopback_only() -> None:
    """All ranks are on this machine: gloo (and NCCL's bootstrap) listen on the loopback
    interface, whatever GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME say for multi-node jobs.
    Left alone, gloo binds the address the hostname resolves to (possibly a public one)."""
    names = {name for _, name in socket.if_nameindex()} if hasattr(socket, "if_nameindex") \
        else set()
    for lo in ("lo", "lo0"):
        if lo in names:
            os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = lo
            return
    logger.warning("no loopback interface found; gloo picks its own (GLOO_SOCKET_IFNAME)")


def _thread_lock_for_tqdm() -> None:
    """tqdm's first progress bar creates a multiprocessing RLock: under spawn a named POSIX
    semaphore (/dev/shm/sem.mp-*) that only the resource tracker removes, so a killed
    process group (a notebook kernel restart) leaves it behind. A worker's bars are its
    own; a thread lock is enough."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    tqdm.set_lock(threading.RLock())


def _bind_cores(rank: int, world: int, threads: int) -> None:
    """Pin CPU rank r to its own ``threads`` cores when the ranks fit the machine's cores.

    Unpinned, the scheduler now and then puts two ranks on one core: one spins in a
    shared-memory collective while the rank it waits for gets half a core (tp=2 on 2 cores:
    a 10 ms wait per step instead of 2). ``PARALLAX_BIND_CORES=0`` leaves placement to the OS
    (e.g. when several pools share a machine).
    """
    if os.environ.get("PARALLAX_BIND_CORES", "1") == "0" or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if world * threads <= len(cores):
        os.sched_setaffinity(0, cores[rank * threads:(rank + 1) * threads])


def _worker_main(rank: int, spec: _WorkerSpec, conn: mpc.Connection) -> None:
    """Entry point of one worker process: join the group, build the engine, serve."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the driver's to handle
    threading.Thread(target=_watch_parent, args=(spec,), daemon=True,
                     name="parallax-watchdog").start()
    ctx = None
    try:
        import torch

        from .context import ParallelContext, file_store

        os.environ["LOCAL_RANK"] = str(rank)          # single node: picks the CUDA device
        _loopback_only()
        _thread_lock_for_tqdm()
        if not spec.device.startswith("cuda"):
            _bind_cores(rank, spec.tp_size * spec.pp_size, spec.threads)
        torch.set_num_threads(spec.threads)
        world = spec.tp_size * spec.pp_size
        store = file_store(spec.store_path, world, spec.timeout_s)
        ctx = ParallelContext.initialize(rank=rank, tp_size=spec.tp_size, pp_size=spec.pp_size,
                                         device=spec.device, timeout_s=spec.timeout_s,
                                         store=store, run_id=spec.run_id)
        engine = spec.factory(ctx, *spec.factory_args)
        conn.send(("ready", None))
    except BaseException as exc:  # noqa: BLE001  everything goes back to the driver
        with contextlib.suppress(Exception):
            conn.send(("error", _error_info(exc, rank)))
        return
    try:
        _serve(engine, ctx.is_driver, conn, rank)
    finally:
        with contextlib.suppress(Exception):
            ctx.destroy()
    _exit_now(0)


def _exit_now(code: int) -> None:
    """Run atexit hooks and flush, then skip interpreter teardown: with torch loaded that
    teardown takes a second or more, which every close() would otherwise wait for."""
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _serve(engine: Any, is_driver: bool, conn: mpc.Connection, rank: int) -> None:
    def emit(item: Any) -> None:
        conn.send(("item", item))

    def drop(item: Any) -> None:
        pass

    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):                   # the driver is gone
            return
        if msg[0] == "stop":
            return
        _, method, args, kwargs, stream = msg
        try:
            if stream:
                kwargs["emit"] = emit if is_driver else drop
            result = getattr(engine, method)(*args, **kwargs)
            conn.send(("ok", result if is_driver else None))
        except (BrokenPipeError, ConnectionResetError):
            return
        except BaseException as exc:  # noqa: BLE001
            try:
                conn.send(("error", _error_info(exc, rank)))
            except OSError:
                return


# ---------------------------------------------------------------------------- driver side
class _RemoteTraceback(Exception):
    """Carries a worker's formatted traceback; set as ``__cause__`` of the raised error."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        with contextlib.suppress(ValueError):
            name = signal.Signals(-code).name
            hint = " (e.g. the out-of-memory killer)" if -code == signal.SIGKILL else ""
            return f"signal {name}{hint}"
        return f"signal {-code}"
    return f"exit code {code}"


def _rebuild(info: dict) -> BaseException:
    """The exception to raise on the driver for a worker's ``_error_info``."""
    cause = _RemoteTraceback(f'\n"""\nTraceback on worker rank {info["rank"]} '
                             f'(pid {info["pid"]}):\n{info["traceback"]}"""')
    exc: BaseException | None = None
    if info["keep_type"] and info["pickled"] is not None:
        with contextlib.suppress(Exception):
            exc = pickle.loads(info["pickled"])
    if not isinstance(exc, ParallaxError):
        exc = WorkerError(f"worker rank {info['rank']} raised {info['type']}: {info['message']}")
    exc.__cause__ = cause
    return exc


class _MainFinder(pickle.Pickler):
    """Pickles into the void, noting whether anything comes from ``__main__``."""

    uses_main = False

    def reducer_override(self, obj: Any) -> Any:
        module = getattr(obj, "__module__", None) if isinstance(obj, (type, types.FunctionType)) \
            else type(obj).__module__
        if module == "__main__":
            self.uses_main = True
        return NotImplemented


def _check_picklable(factory: Callable[..., Any], factory_args: tuple) -> bool:
    """Raise a clear TypeError if the factory can't travel; True if it needs ``__main__``."""
    finder = _MainFinder(io.BytesIO(), protocol=pickle.HIGHEST_PROTOCOL)
    try:
        finder.dump((factory, factory_args))
    except Exception as exc:
        raise TypeError(f"WorkerPool: the factory and its arguments must be picklable (a "
                        f"top-level function or class, plain data): {exc}") from exc
    return finder.uses_main


@contextlib.contextmanager
def _main_hidden(hide: bool) -> Iterator[None]:
    """While starting processes, hide ``__main__`` so spawn does not re-run the user's script."""
    main = sys.modules.get("__main__")
    if not hide or main is None:
        yield
        return
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


class _PoolState:
    """The processes, pipes and rendezvous files of one pool. Holds no reference to the
    pool, so the pool can be garbage-collected and its finalizer can still shut this down."""

    def __init__(self, store_path: str, run_id: str) -> None:
        self.store_path, self.run_id = store_path, run_id
        self.procs: list[mp.process.BaseProcess] = []
        self.conns: list[mpc.Connection] = []
        self.pids: list[int] = []
        self.closed_reason: str | None = None
        self._lock = threading.Lock()

    def shutdown(self, reason: str, graceful: bool = True) -> None:
        with self._lock:
            if self.closed_reason is not None:
                return
            self.closed_reason = reason
        _LIVE.discard(self)
        logger.debug("shutting down %d workers: %s", len(self.procs), reason)
        if graceful:
            for conn in self.conns:
                with contextlib.suppress(OSError, ValueError):
                    conn.send(("stop",))
            deadline = time.monotonic() + _STOP_GRACE_S
            for p in self.procs:
                p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.exitcode is None:
                with contextlib.suppress(OSError):
                    p.terminate()
        deadline = time.monotonic() + _KILL_GRACE_S
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.exitcode is None:
                logger.warning("worker pid %s ignored SIGTERM; killing it", p.pid)
                with contextlib.suppress(OSError):
                    p.kill()
                p.join(5.0)
        for conn in self.conns:
            conn.close()
        for p in self.procs:                          # release their sentinel fds
            with contextlib.suppress(ValueError):
                p.close()
        _release(self.store_path, self.run_id)        # every worker is gone by now


_LIVE: set[_PoolState] = set()


@atexit.register
def _shutdown_all() -> None:
    # Registered after multiprocessing's own exit hook, so it runs first: that hook would
    # otherwise join our (non-daemonic) workers forever.
    for state in list(_LIVE):
        state.shutdown("the interpreter is exiting")


class WorkerPool:
    """``tp_size * pp_size`` worker processes, each holding ``factory(ctx, *factory_args)``.

    ``call(method, *args, **kwargs)`` runs ``engine.method(*args, **kwargs)`` on every rank
    and returns the driver rank's result. ``call_stream`` does the same but passes the
    method an extra ``emit`` keyword; what the driver rank emits is yielded as it arrives,
    and the method's return value becomes the generator's return value
    (``StopIteration.value``, or ``result = yield from pool.call_stream(...)``).
    Leaving a stream early waits for the command to finish on the workers (discarding the
    rest of its items), so the ranks stay in step.

    Errors: ``WorkerError`` when a worker dies or raises; ``ParallaxError`` subclasses raised
    by a worker (start-up included) keep their type. See the module docstring for when the
    pool survives an error. Not re-entrant: one command at a time (other threads wait),
    except that ``submit`` / ``collect`` keep several ``execute``-style commands in flight.
    ``run_id`` names the pool's shared-memory segments (``/dev/shm/parallax-<run_id>-*``),
    ``rendezvous_dir`` is the owner-only folder of its ``FileStore``.
    """

    def __init__(self, factory: Callable[..., Any], factory_args: tuple = (), *, tp_size: int,
                 pp_size: int, device: str = "cpu", timeout_s: float = 60.0,
                 threads_per_rank: int | None = None) -> None:
        if tp_size < 1 or pp_size < 1:
            raise ValueError(f"tp_size and pp_size must be >= 1, got {tp_size} and {pp_size}")
        self.tp_size, self.pp_size = tp_size, pp_size
        self.world_size = world = tp_size * pp_size
        self.driver_rank = (pp_size - 1) * tp_size   # tp rank 0 of the last stage
        self.device = str(device)
        needs_main = _check_picklable(factory, tuple(factory_args))
        threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world)
        from .shm import new_run_id
        store_path = os.path.join(tempfile.mkdtemp(prefix="parallax-rdzv-"), "store")  # 0700
        spec = _WorkerSpec(factory, tuple(factory_args), tp_size, pp_size, self.device,
                           float(timeout_s), threads, store_path, new_run_id(), os.getpid())
        self.run_id = spec.run_id
        self.rendezvous_dir = os.path.dirname(store_path)
        self._state = state = _PoolState(store_path, spec.run_id)
        self._lock = threading.Lock()
        self._owner: int | None = None               # thread id running a command
        self._uncollected: collections.deque[str] = collections.deque()   # submit()ted
        _LIVE.add(state)
        self._finalizer = weakref.finalize(self, state.shutdown,
                                           "the WorkerPool was garbage-collected")
        self._finalizer.atexit = False               # _shutdown_all handles exit, in order
        ctx = mp.get_context("spawn")
        try:
            with _main_hidden(not needs_main):
                for rank in range(world):
                    parent_end, child_end = ctx.Pipe(duplex=True)
                    proc = ctx.Process(target=_worker_main, args=(rank, spec, child_end),
                                       name=f"parallax-worker-{rank}", daemon=False)
                    proc.start()
                    child_end.close()
                    state.procs.append(proc)
                    state.conns.append(parent_end)
                    state.pids.append(proc.pid)
            for _ in self._replies("start-up (process group and engine factory)"):
                pass
        except BaseException as exc:
            state.shutdown(f"start-up failed: {exc}", graceful=False)
            raise
        if not self.device.startswith("cuda"):
            # gloo has connected every group; NCCL connects on first use, through the store.
            shutil.rmtree(self.rendezvous_dir, ignore_errors=True)
        logger.debug("worker pool up: tp=%d pp=%d pids=%s", tp_size, pp_size, state.pids)

    # ------------------------------------------------------------------ public surface
    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``engine.method(*args, **kwargs)`` on every rank; the driver rank's result."""
        gen = self._run(method, args, kwargs, stream=False)
        try:
            while True:
                next(gen)
        except StopIteration as stop:
            return stop.value

    def submit(self, method: str, *args: Any) -> None:
        """Send ``engine.method(*args)`` to every rank without waiting for it. Each rank runs
        its commands in the order sent, so several can be in flight (pipeline stages work on
        different ones at once); ``collect`` returns their results, oldest first. ``call``
        refuses while any is uncollected."""
        what = f"{method}()"
        payload = self._payload(what, method, args, {}, False)
        with self._lock:
            self._check_open()
            for conn in self._state.conns:
                with contextlib.suppress(OSError):       # a dead rank shows up in collect
                    conn.send_bytes(payload)
            self._uncollected.append(what)

    def collect(self) -> Any:
        """The driver rank's result of the oldest ``submit``ted command (errors as ``call``)."""
        with self._lock:
            if not self._uncollected:
                raise RuntimeError("WorkerPool.collect: no submitted command to collect")
            what = self._uncollected.popleft()
            gen = self._replies(what)
            try:
                while True:
                    next(gen)
            except StopIteration as stop:
                return stop.value

    def call_stream(self, method: str, *args: Any, **kwargs: Any) -> Generator[Any, None, Any]:
        """Like ``call``; yields what the driver rank passes to ``emit``, returns the result.

        The command is sent when iteration starts.
        """
        return self._run(method, args, kwargs, stream=True)

    def close(self) -> None:
        """Stop every worker (gracefully, then SIGTERM, then SIGKILL). Idempotent."""
        self._finalizer.detach()
        self._state.shutdown("close() was called")

    @property
    def alive(self) -> bool:
        return self._state.closed_reason is None and \
            all(p.exitcode is None for p in self._state.procs)

    @property
    def pids(self) -> list[int]:
        """Worker process ids, by rank (for diagnostics)."""
        return list(self._state.pids)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        status = "alive" if self.alive else f"closed ({self._state.closed_reason})"
        return f"WorkerPool(tp={self.tp_size}, pp={self.pp_size}, pids={self.pids}, {status})"

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        reason = self._state.closed_reason
        if reason is not None:
            raise WorkerError(f"the worker pool is closed because {reason}")

    def _run(self, method: str, args: tuple, kwargs: dict,
             stream: bool) -> Generator[Any, None, Any]:
        self._check_open()
        if self._owner == threading.get_ident():
            raise RuntimeError("WorkerPool: a command is already in flight from this thread "
                               "(an unfinished call_stream?); finish or close it first")
        what = f"{method}()"
        payload = self._payload(what, method, args, kwargs, stream)
        with self._lock:
            self._owner = threading.get_ident()
            try:
                self._check_open()
                if self._uncollected:
                    raise RuntimeError(f"WorkerPool: {what} while submitted commands "
                                       f"({', '.join(self._uncollected)}) are uncollected")
                for conn in self._state.conns:
                    with contextlib.suppress(OSError):   # a dead rank shows up in _replies
                        conn.send_bytes(payload)
                return (yield from self._replies(what))
            except (ParallaxError, GeneratorExit):
                raise                                    # _replies already decided
            except BaseException as exc:                 # Ctrl-C while waiting, ...
                self._state.shutdown(f"{type(exc).__name__} while running {what}",
                                     graceful=False)
                raise
            finally:
                self._owner = None

    @staticmethod
    def _payload(what: str, method: str, args: tuple, kwargs: dict, stream: bool) -> bytes:
        try:    # pickle once, send the same bytes to every rank
            return ForkingPickler.dumps(("call", method, args, kwargs, stream))
        except Exception as exc:
            raise TypeError(f"WorkerPool: the arguments of {what} must be picklable: "
                            f"{exc}") from exc

    def _replies(self, what: str) -> Generator[Any, None, Any]:
        """Collect one reply per rank, yielding the driver rank's items on the way.

        Returns the driver rank's result; on failure shuts the pool down (unless it is a
        clean ParallaxError on answering ranks) and raises.
        """
        state, driver = self._state, self.driver_rank
        rank_of: dict[Any, int] = {c: r for r, c in enumerate(state.conns)}
        rank_of.update({p.sentinel: r for r, p in enumerate(state.procs)})
        pending = set(range(self.world_size))
        errors: list[dict] = []
        deaths: dict[int, int | None] = {}
        eof: set[int] = set()                          # ranks whose pipe has closed
        result: Any = None
        failed_at: float | None = None
        abandoned = False                              # the consumer closed the stream
        while pending and not deaths:
            self._check_open()                         # close() from another thread
            timeout = _POLL_S
            if failed_at is not None:
                timeout = min(timeout, failed_at + _ERROR_GRACE_S - time.monotonic())
                if timeout <= 0:
                    break
            waitables = [state.conns[r] for r in pending if r not in eof] + \
                [state.procs[r].sentinel for r in pending]
            ready = mpc.wait(waitables, timeout)
            for obj in ready:
                if isinstance(obj, int):               # a sentinel: handled below
                    continue
                rank = rank_of[obj]
                try:
                    kind, value = obj.recv()
                except (EOFError, OSError):           # it died; the sentinel will say how
                    eof.add(rank)
                    continue
                if kind == "item":
                    if rank == driver and not abandoned and failed_at is None:
                        try:
                            yield value
                        except GeneratorExit:
                            abandoned = True
                    continue
                pending.discard(rank)
                if kind == "error":
                    errors.append(value)
                    failed_at = failed_at or time.monotonic()
                elif rank == driver:
                    result = value
            for rank in sorted(pending):
                proc = state.procs[rank]
                if proc.exitcode is not None and (rank in eof or not state.conns[rank].poll()):
                    deaths[rank] = proc.exitcode
        if not errors and not deaths and not pending:
            return result
        self._check_open()
        clean = not pending and not deaths and all(e["keep_type"] for e in errors)
        if clean:                                      # every rank answered: still in step
            raise _rebuild(min(errors, key=lambda e: e["rank"] != driver))
        if deaths:
            rank = min(deaths)
            lines = [f"worker rank {rank} (pid {state.pids[rank]}) died with "
                     f"{_describe_exit(deaths[rank])} during {what}"]
            lines += [f"rank {e['rank']} raised {e['type']}: {e['message']}" for e in errors]
            exc: BaseException = WorkerError("; ".join(lines) +
                                             "; the worker pool was shut down")
            cause = errors[0] if errors else None
            if cause is not None:
                exc.__cause__ = _rebuild(cause).__cause__
            state.shutdown(lines[0], graceful=False)
            raise exc
        first = errors[0]
        exc = _rebuild(first)
        note = (f"; ranks {sorted(pending)} did not answer within {_ERROR_GRACE_S:g} s "
                f"(stuck in a collective?)" if pending else "")
        if isinstance(exc, WorkerError):
            exc.args = (f"{exc.args[0]} during {what}{note}; the worker pool was shut down",)
        state.shutdown(f"worker rank {first['rank']} raised {first['type']}: "
                       f"{first['message']} during {what}", graceful=False)
        raise exc

"""Replicas on Ray Serve (serve/ray_serve.py), ranks as Ray actors (parallel/ray_executor.py)
and prefix-aware routing (serve/prefix_router.py), on a local two-node Ray cluster.

The module starts its own cluster on loopback (``ray start --head`` plus a second node with
its own custom resource ``node2``) and stops it after (``ray stop --force``). Greedy answers
are compared with one-process ``LLM.generate`` on the same tiny random checkpoint.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

import ray  # noqa: E402  (pip install 'parallax[ray]')
from ray import serve  # noqa: E402

import parallax  # noqa: E402
from parallax.serve.front import RETRY_HEADER  # noqa: E402
from parallax.serve.ray_serve import REPLICA_HEADER, build_app  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

APP = "parallax"
ENGINE = {"max_num_seqs": 16, "kv_cache_tokens": 4096}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, timeout: float = 120) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), RAY_USAGE_STATS_ENABLED="0")
    r = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], env=env,
                       timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True)
    assert r.returncode == 0, f"ray {' '.join(args)} failed:\n{r.stderr[-3000:]}"


@pytest.fixture(scope="module")
def cluster():
    """Head node (3 CPUs, resource "head") and a second node (2 CPUs, resource "node2") on
    127.0.0.1; Serve's HTTP proxy on a free loopback port. Yields the HTTP base URL."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    # A loopback-only test cluster: no token (joining nodes and drivers would need it).
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        ray_cli("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                "--num-cpus", "3", "--resources", json.dumps({"head": 1}),
                "--include-dashboard", "false", "--object-store-memory", str(200 << 20),
                "--disable-usage-stats")
        ray_cli("start", "--address", address, "--node-ip-address", "127.0.0.1",
                "--num-cpus", "2", "--resources", json.dumps({"node2": 1}),
                "--object-store-memory", str(100 << 20))
        ray.init(address=address, log_to_driver=False)
        http = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": http})
        yield f"http://127.0.0.1:{http}"
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()
        finally:
            subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"],
                           timeout=60, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if saved is None:
                os.environ.pop("RAY_AUTH_MODE", None)
            else:
                os.environ["RAY_AUTH_MODE"] = saved


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory) -> str:
    """A tiny random Llama with a trained tokenizer (text prompts)."""
    from conftest import make_checkpoint, make_tokenizer
    folder = str(tmp_path_factory.mktemp("ray_tiny"))
    return make_checkpoint(folder, "llama", vocab_size=make_tokenizer(folder))


@pytest.fixture(scope="module")
def oracle(chat_ckpt):
    llm = parallax.LLM(chat_ckpt, **ENGINE)
    yield llm
    llm.close()


def prompts_and_budgets(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    words = "the cat sat on a mat while dogs ran far in the park and birds sang".split()
    prompts = [" ".join(words[(i * 3 + seed) % 7:(i * 3 + seed) % 7 + 3 + i % 6]) + f" {i}"
               for i in range(n)]
    return prompts, [4 + (i * 5) % 13 for i in range(n)]


def offline(llm, prompts: list[str], budgets: list[int]) -> list[str]:
    out = [None] * len(prompts)
    for b in sorted(set(budgets)):
        idx = [i for i, x in enumerate(budgets) if x == b]
        for i, c in zip(idx, llm.generate([prompts[i] for i in idx], max_new_tokens=b,
                                          chat=False)):
            out[i] = c.text
    return out


def complete(client: httpx.Client, url: str, model: str, prompt: str,
             max_tokens: int) -> tuple[int, str, str | None]:
    """(status, text or error body, replica header) of one greedy completion."""
    r = client.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt,
                                                   "max_tokens": max_tokens,
                                                   "temperature": 0})
    text = r.json()["choices"][0]["text"] if r.status_code == 200 else r.text
    return r.status_code, text, r.headers.get(REPLICA_HEADER)


def fire(url: str, model: str, prompts, budgets, concurrency: int = 8,
         timeout: float = 60) -> list[tuple[int, str, str | None, float]]:
    """Send all requests (``concurrency`` at once); (status, text, replica, end time) each.
    A request that fails at the transport level counts as status 0 with its error."""
    def one(i: int):
        with httpx.Client(timeout=timeout) as c:
            try:
                out = complete(c, url, model, prompts[i], budgets[i])
            except httpx.HTTPError as e:
                out = (0, f"{type(e).__name__}: {e}", None)
        return (*out, time.monotonic())

    with cf.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(len(prompts))))


def replica_states(app: str = APP, deployment: str = "parallax") -> dict:
    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return {}
    return {str(k.value if hasattr(k, "value") else k): v
            for k, v in status.deployments[deployment].replica_states.items()}


def wait_for(cond, timeout: float, what: str, poll: float = 0.5) -> float:
    """Seconds until ``cond()``; fails the test after ``timeout``."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"{what}: not within {timeout:g} s (replicas: {replica_states()})")
        time.sleep(poll)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def two_replicas(cluster, chat_ckpt):
    serve.run(build_app(chat_ckpt, num_replicas=2, model_name="tiny", **ENGINE), name=APP,
              route_prefix="/")
    yield cluster
    serve.delete(APP)


# ---------------------------------------------------------------------- tests
@pytest.mark.timeout(240)
def test_two_replicas_serve_100_requests_equal_offline(two_replicas, oracle):
    prompts, budgets = prompts_and_budgets(100)
    want = offline(oracle, prompts, budgets)
    results = fire(two_replicas, "tiny", prompts, budgets, concurrency=16)
    assert [r[0] for r in results] == [200] * 100, [r for r in results if r[0] != 200][:3]
    assert [r[1] for r in results] == want
    served = collections.Counter(r[2] for r in results)
    assert len(served) == 2 and None not in served, served
    print(f"\nrequests per replica: {dict(served)}")
    with httpx.Client() as c:
        assert c.get(two_replicas + "/health").json() == {"status": "ok"}
        assert "parallax:generation_tokens" in c.get(two_replicas + "/metrics").text


@ray.remote(num_cpus=0.1)
def _tp2_in_placement_group(ckpt: str, prompts: list[str]) -> tuple[list, list]:
    """Inside a placement group (as a Serve replica is): LLM(tp=2) puts its ranks in
    bundles 1 and 2. Returns the token ids and where each rank ran."""
    llm = parallax.LLM(ckpt, tp=2, **ENGINE)
    try:
        assert type(llm._pool).__name__ == "RayExecutor"
        tokens = [c.token_ids for c in llm.generate(prompts, max_new_tokens=12, chat=False)]
        where = llm._pool.where
        os.kill(where[1]["pid"], signal.SIGKILL)               # a rank dies
        t0 = time.monotonic()
        try:
            llm.generate(prompts[:1], max_new_tokens=4, chat=False)
            error = None
        except parallax.ParallaxError as e:
            error = (type(e).__name__, str(e), time.monotonic() - t0)
        return tokens, where, error
    finally:
        llm.close()


@pytest.mark.timeout(180)
def test_tp2_ranks_on_two_nodes_equal_worker_pool(cluster, chat_ckpt):
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    prompts, _ = prompts_and_budgets(6, seed=3)
    pg = placement_group([{"CPU": 0.1}, {"CPU": 1, "head": 0.1}, {"CPU": 1, "node2": 0.1}],
                         strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=60)
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0,
                                                    placement_group_capture_child_tasks=True)
        tokens, where, error = ray.get(_tp2_in_placement_group.options(
            scheduling_strategy=strategy).remote(chat_ckpt, prompts), timeout=150)
    finally:
        remove_placement_group(pg)
    assert len({w["node_id"] for w in where}) == 2, where      # one rank per Ray node
    with parallax.LLM(chat_ckpt, tp=2, executor="pool", **ENGINE) as pool_llm:
        want = [c.token_ids for c in pool_llm.generate(prompts, max_new_tokens=12, chat=False)]
    assert tokens == want
    kind, message, took = error                                # a dead rank: a clear error
    assert kind == "WorkerError" and "rank 1" in message and "died" in message, message
    assert took < 30, took


@pytest.mark.timeout(120)
def test_executor_ray_from_a_driver_and_when_it_cannot_place(cluster, chat_ckpt):
    from ray.util import placement_group_table
    prompts, _ = prompts_and_budgets(4, seed=6)
    with parallax.LLM(chat_ckpt, tp=2, executor="ray", **ENGINE) as llm:
        pg = llm._pool.placement_group                       # made here: STRICT_PACK
        got = [c.token_ids for c in llm.generate(prompts, max_new_tokens=8, chat=False)]
        assert len({w["node_id"] for w in llm._pool.where}) == 1
    assert placement_group_table(pg)["state"] == "REMOVED"
    with parallax.LLM(chat_ckpt, tp=2, executor="pool", **ENGINE) as pool_llm:
        assert got == [c.token_ids for c in pool_llm.generate(prompts, max_new_tokens=8,
                                                              chat=False)]
    t0 = time.monotonic()
    with pytest.raises(parallax.errors.WorkerError, match="could not place 2 ranks"):
        parallax.LLM(chat_ckpt, tp=2, executor="ray", threads_per_rank=64, timeout_s=3,
                     **ENGINE)
    assert time.monotonic() - t0 < 30


def openai_error(body) -> bool:
    """Whether ``body`` (parsed JSON) is OpenAI's error body."""
    return (isinstance(body, dict) and set(body) == {"error"}
            and {"message", "type", "param", "code"} <= set(body["error"]))


def complete_any(url: str, prompt: str, max_tokens: int, stream: bool,
                 timeout: float = 60, out: dict | None = None) -> dict:
    """One greedy completion, streaming or not: status, text, replica, retries, and the
    error body (parsed: the JSON body of a non-200, or an SSE error event) if any.

    ``out`` (returned) fills in as the answer arrives, for another thread to watch:
    ``replica`` once the response starts, ``events`` (text events so far) and ``open``
    (true until the response has ended)."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": stream}
    out = {} if out is None else out
    out.update(stream=stream, text="", error=None, raw=None, events=0, open=True)
    try:
        with httpx.Client(timeout=timeout) as c:
            with c.stream("POST", f"{url}/v1/completions", json=body) as r:
                out.update(status=r.status_code, replica=r.headers.get(REPLICA_HEADER),
                           retries=int(r.headers.get(RETRY_HEADER, 0)))
                if r.status_code != 200:
                    out["raw"] = r.read().decode(errors="replace")
                    out["error"] = json.loads(out["raw"])      # must be JSON (asserted later)
                elif not stream:
                    out["text"] = json.loads(r.read())["choices"][0]["text"]
                else:
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        if "error" in event:
                            out["error"] = event
                        else:
                            out["text"] += "".join(ch["text"] for ch in event["choices"])
                            out["events"] += 1
    finally:
        out["open"] = False
    out["end"] = time.monotonic()
    return out


@pytest.mark.timeout(240)
def test_sigkill_one_replica_under_load_recovers(two_replicas, oracle):
    """Requests the killed replica held: retried on the other replica by the front when
    nothing had been sent yet (serve/front.py), else ended with OpenAI's error body (an
    SSE error event for a cut stream, a 5xx JSON body otherwise); never Serve's plain 500."""
    url = two_replicas
    handle = serve.get_deployment_handle("parallax", app_name=APP)
    victim = handle.replica_info.remote().result(timeout_s=30)
    prompts, budgets = prompts_and_budgets(80, seed=1)
    budgets = [24 + b for b in budgets]                        # long enough to be cut
    live = [{} for _ in prompts]          # each answer as it arrives (complete_any's out)
    kill_at = {}
    load_over = threading.Event()

    def held_by_victim() -> list[dict]:
        # Streams the victim answers with most of their tokens to come (<= 3 of >= 28 here).
        return [r for r in live if r.get("open") and r.get("stream") and
                r.get("replica") == victim["replica"] and 0 < r["events"] <= 3]

    def killer():
        """SIGKILL the victim while it holds a request. A count of answers is no such
        moment: the victim's batch ends within a few decode steps while the router sends
        new requests to the emptier replica, so after N answers the victim may hold nothing
        (seen: it had all 12 first requests, they ended within 0.4 s, the 10th answer 7 ms
        before the kill; the requests it was handed meanwhile, not yet accepted, were
        routed again by Serve itself, invisible to the front). So wait for a stream the
        victim is answering, freeze the victim (SIGSTOP: it can finish nothing more), let
        what it already sent arrive, and kill it if that stream is still open (else let
        it go on and wait for the next one)."""
        while not load_over.is_set():
            held = held_by_victim()
            if held:
                os.kill(victim["pid"], signal.SIGSTOP)
                try:
                    seen = None
                    for _ in range(10):       # until nothing arrives for 0.5 s (<= 5 s)
                        now = [(r["events"], r["open"]) for r in held]
                        if now == seen:
                            break
                        seen = now
                        time.sleep(0.5)
                    held = [r for r in held if r["open"]]
                    if held:
                        kill_at.update(t=time.monotonic(), held=held)
                        os.kill(victim["pid"], signal.SIGKILL)
                        return
                finally:
                    if not kill_at:
                        os.kill(victim["pid"], signal.SIGCONT)
            time.sleep(0.005)

    def one(i: int) -> dict:
        return complete_any(url, prompts[i], budgets[i], i % 2 == 1, out=live[i])

    with cf.ThreadPoolExecutor(1) as k, cf.ThreadPoolExecutor(12) as pool:
        killing = k.submit(killer)
        t0 = time.monotonic()
        try:
            results = list(pool.map(one, range(len(prompts))))
        finally:
            load_over.set()
        killing.result()
    assert kill_at, (f"replica {victim['replica']} never answered a stream while "
                     f"{len(prompts)} requests ran, 12 at a time: nothing to kill it under")
    assert time.monotonic() - t0 < 120
    bad = [r for r in results if r["error"] is not None]
    retried = [r for r in results if r["retries"]]
    print(f"\nkilled replica {victim['replica']} (pid {victim['pid']}) holding "
          f"{len(kill_at['held'])} stream(s) at {kill_at['t'] - t0:.1f} s; of {len(results)} "
          f"requests {len(retried)} were retried on the other replica and {len(bad)} ended "
          f"with an error body: {collections.Counter((r['stream'], r['status']) for r in bad)}")
    assert retried or bad, "the kill hit no request in flight: the test saw nothing"
    # The streams the victim held when it died (frozen, still open): each cut with the
    # error event after its first tokens, as status 200 was already on the wire.
    assert all(r["status"] == 200 and r["error"] is not None for r in kill_at["held"]), \
        kill_at["held"]
    for r in bad:                                  # OpenAI's error body, never a plain 500
        assert openai_error(r["error"]), r
        assert r["status"] >= 500 if not r["stream"] else r["status"] in (200, 503), r
    assert all(r["status"] == 200 for r in retried)
    others = [r for r in results if r["error"] is None and r["replica"] != victim["replica"]
              and r["end"] > kill_at["t"]]
    assert others, "the surviving replica served nothing after the kill"
    want = offline(oracle, prompts, budgets)
    assert all(r["text"] == w for r, w in zip(results, want) if r["error"] is None)

    def recovered() -> bool:
        return replica_states().get("RUNNING", 0) == 2
    took = wait_for(recovered, 120, "Serve restarting the killed replica")
    print(f"replica replaced {took:.1f} s after the test saw the load end")
    after = fire(url, "tiny", prompts[:30], budgets[:30], concurrency=8)
    assert [r[0] for r in after] == [200] * 30
    assert [r[1] for r in after] == want[:30]
    live = {r[2] for r in after}
    assert victim["replica"] not in live


@pytest.mark.timeout(240)
def test_autoscaling_adds_and_removes_a_replica(cluster, chat_ckpt):
    app = "auto"
    serve.run(build_app(chat_ckpt, min_replicas=1, max_replicas=2, target_ongoing_requests=2,
                        upscale_delay_s=1.0, downscale_delay_s=4.0, model_name="tiny",
                        **ENGINE), name=app, route_prefix="/auto")
    try:
        url = cluster + "/auto"
        running = lambda: replica_states(app).get("RUNNING", 0)  # noqa: E731
        assert running() == 1
        prompts, budgets = prompts_and_budgets(48, seed=2)
        budgets = [48] * len(prompts)
        stop = False
        served: collections.Counter = collections.Counter()

        def load():
            while not stop:
                for r in fire(url, "tiny", prompts[:12], budgets[:12], concurrency=12):
                    assert r[0] == 200, r
                    served[r[2]] += 1

        with cf.ThreadPoolExecutor(1) as pool:
            job = pool.submit(load)
            try:
                up = wait_for(lambda: running() == 2, 120, "the second replica starting")
                wait_for(lambda: len(served) == 2 or job.done(), 60,
                         "the second replica serving")
            finally:
                stop = True
            job.result(timeout=120)
        print(f"\nautoscaling: 2nd replica running {up:.1f} s after load began "
              f"(target 2 ongoing requests per replica, 12 in flight)")
        assert len(served) == 2, served
        down = wait_for(lambda: running() == 1 and not replica_states(app).get("STOPPING"),
                        120, "the second replica going away")
        print(f"autoscaling: back to 1 replica {down:.1f} s after load stopped "
              f"(downscale delay 4 s); requests per replica: {dict(served)}")
    finally:
        serve.delete(app)


@pytest.mark.timeout(240)
def test_prefix_routing_keeps_a_prefix_on_one_replica_and_spreads_load(cluster, chat_ckpt):
    app = "prefix"
    serve.run(build_app(chat_ckpt, num_replicas=2, prefix_routing=True, prefix_chars=24,
                        prefix_imbalance=2, model_name="tiny", **ENGINE),
              name=app, route_prefix="/prefix")
    try:
        url = cluster + "/prefix"
        stems = [f"story {k}: once upon a time there" for k in range(12)]
        by_stem = {}
        with httpx.Client(timeout=60) as c:
            for stem in stems:
                answers = [complete(c, url, "tiny", f"{stem} {i}", 4) for i in range(4)]
                assert [a[0] for a in answers] == [200] * 4, answers
                seen = {a[2] for a in answers}
                assert len(seen) == 1 and None not in seen, (stem, seen)
                by_stem[stem] = seen.pop()
        assert len(set(by_stem.values())) == 2, by_stem     # different prefixes spread
        # One prefix, many at once: its replica's queue runs ahead by more than the
        # imbalance margin, and the other replica takes some.
        stem = stems[0]
        results = fire(url, "tiny", [f"{stem} {i}" for i in range(32)], [40] * 32,
                       concurrency=32)
        assert all(r[0] == 200 for r in results), [r for r in results if r[0] != 200][:2]
        served = collections.Counter(r[2] for r in results)
        print(f"\nprefix routing: 32 concurrent same-prefix requests per replica: "
              f"{dict(served)} (preferred {by_stem[stem]})")
        assert len(served) == 2 and None not in served, served
        # The same with an imbalance margin no queue reaches: all stay on one replica.
        serve.run(build_app(chat_ckpt, num_replicas=2, prefix_routing=True, prefix_chars=24,
                            prefix_imbalance=1000, model_name="tiny", **ENGINE),
                  name=app, route_prefix="/prefix")
        results = fire(url, "tiny", [f"{stem} {i}" for i in range(32)], [40] * 32,
                       concurrency=32)
        assert all(r[0] == 200 for r in results)
        served = collections.Counter(r[2] for r in results)
        print(f"prefix routing, imbalance 1000: {dict(served)}")
        assert len(served) == 1, served
    finally:
        serve.delete(app)


@pytest.mark.timeout(240)
def test_tp2_replica_with_a_dead_rank_is_replaced(cluster, chat_ckpt):
    app = "tp2"
    serve.run(build_app(chat_ckpt, 2, num_replicas=1, placement_strategy="PACK",
                        model_name="tiny", **ENGINE), name=app, route_prefix="/tp2")
    try:
        url = cluster + "/tp2"
        prompts, budgets = prompts_and_budgets(8, seed=4)
        before = fire(url, "tiny", prompts, budgets)
        assert [r[0] for r in before] == [200] * len(prompts)
        want = [r[1] for r in before]        # tp=2 Ray ranks vs the worker pool: test above
        handle = serve.get_deployment_handle("parallax", app_name=app)
        info = handle.replica_info.remote().result(timeout_s=30)
        assert len(info["ranks"]) == 2
        os.kill(info["ranks"][1]["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        with httpx.Client(timeout=60) as c:
            status, body, replica = complete(c, url, "tiny", prompts[0], budgets[0])
        if status != 200:              # the dead rank ended it (unless already replaced)
            assert status in (500, 503) and "rank 1" in body, (status, body)
            assert replica in (info["replica"], None)

        def replaced() -> bool:
            states = replica_states(app)
            if states.get("RUNNING", 0) != 1 or len(states) != 1:
                return False
            return handle.replica_info.remote().result(timeout_s=30)["replica"] != \
                info["replica"]
        took = wait_for(replaced, 150, "Serve replacing the replica with a dead rank")
        print(f"\ntp=2 replica {info['replica']}: rank 1 killed; first request -> {status}; "
              f"replaced after {time.monotonic() - t0:.1f} s")
        after = fire(url, "tiny", prompts, budgets)
        assert [r[0] for r in after] == [200] * len(prompts)
        assert [r[1] for r in after] == want
        assert took < 150
    finally:
        serve.delete(app)


@pytest.mark.timeout(240)
def test_cli_serve_replicas_joins_cluster_and_stops_on_sigterm(cluster, chat_ckpt, oracle):
    """`parallax serve CKPT --replicas 2 --ray-address ADDR`: serves through the cluster's
    Serve proxy, and SIGTERM removes its application and exits 0. Runs last: it takes the
    application name "parallax" from the module's fixture."""
    serve.delete(APP)
    address = ray.get_runtime_context().gcs_address
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-m", "parallax", "serve", chat_ckpt,
                             "--replicas", "2", "--ray-address", address,
                             "--served-model-name", "tiny", "--max-num-seqs", "16",
                             "--kv-cache-tokens", "4096"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    lines: list[str] = []

    def drain() -> None:                               # a full stderr pipe would block it
        for line in proc.stderr:
            lines.append(line)

    threading.Thread(target=drain, daemon=True).start()
    try:
        def started() -> bool:
            assert proc.poll() is None, f"parallax serve exited: {''.join(lines)[-2000:]}"
            return any(x.startswith("parallax serve:") for x in lines)
        wait_for(started, 150, "parallax serve starting")
        line = next(x for x in lines if x.startswith("parallax serve:"))
        url = line.split(" at ")[1].split()[0]
        assert url == cluster, (url, cluster)
        prompts, budgets = prompts_and_budgets(20, seed=5)
        results = fire(url, "tiny", prompts, budgets)
        assert [r[0] for r in results] == [200] * 20
        assert [r[1] for r in results] == offline(oracle, prompts, budgets)
        assert len({r[2] for r in results}) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        assert APP not in serve.status().applications
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# ---------------------------------------------------------------------- routing, no cluster
def test_prefix_key_reads_completions_chat_and_token_prompts():
    from parallax.serve.prefix_router import prefix_key
    assert prefix_key(b'{"prompt": "hello world"}', 5) == "hello"
    assert prefix_key(b'{"prompt": ["first one", "second"]}', 5) == "first"
    assert prefix_key(b'{"prompt": [11, 22, 33]}', 5) == "11,22"
    chat = json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": "hi"}]}).encode()
    assert prefix_key(chat, 100) == "system:be brief\nuser:hi\n"
    assert prefix_key(b"", 5) == prefix_key(b"not json", 5) == prefix_key(b"[1]", 5) == ""


def test_rendezvous_order_moves_only_a_removed_replicas_keys():
    from parallax.serve.prefix_router import preferred_order
    replicas = [f"replica-{i}" for i in range(4)]
    keys = [f"prompt prefix {k}" for k in range(400)]
    before = {k: preferred_order(k, replicas)[0] for k in keys}
    assert set(before.values()) == set(replicas)                 # every replica gets keys
    after = {k: preferred_order(k, replicas[:3])[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == "replica-3" for k in moved)
    assert preferred_order(keys[0], replicas) == preferred_order(keys[0], replicas[::-1])


def test_cli_ray_flags_need_replicas(capsys):
    from parallax.cli import main
    assert main(["serve", "m", "--ray-address", "127.0.0.1:1"]) != 0
    assert "--ray-address and --prefix-routing need --replicas" in capsys.readouterr().err


def test_build_app_refuses_fixed_and_autoscaled_replicas_together():
    with pytest.raises(parallax.ParallaxError, match="not both"):
        build_app("m", num_replicas=2, max_replicas=3)
    with pytest.raises(parallax.ParallaxError, match="min_replicas <= max_replicas"):
        build_app("m", min_replicas=3, max_replicas=2)

"""Replicas vs threads on one box: ``R replicas x T threads`` layouts on Ray Serve at
saturation, through the HTTP load driver (serve/loadgen.py), one markdown table.

    python benchmarks/bench_replicas.py [--model smollm2-135m] [--requests 64]
        [--max-tokens 32] [--concurrency 32] [--repeats 2] [--layouts 2x1,1x2]

Each layout ``RxT`` is R Serve replicas of tp=1, each with T torch threads (Ray CPUs).
Layouts run interleaved (A, B, A, B, ...) on one local Ray started here with as many CPUs
as the largest layout needs; every run sends all requests at once (``--concurrency`` in
flight), streaming, greedy. Reported per run and as medians: output tokens/s, request
throughput, p50/p99 time to first token.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "src"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--layouts", default="2x1,1x2", help="RxT: R replicas of T threads each")
    p.add_argument("--max-num-seqs", type=int, default=32)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import ray
    from ray import serve

    from parallax.serve.loadgen import run_load, summarize, synthetic_prompts
    from parallax.serve.ray_serve import build_app

    layouts = [tuple(int(x) for x in s.split("x")) for s in a.layouts.split(",")]
    cpus = max(r * t for r, t in layouts)
    ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=200 << 20,
             log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    prompts = synthetic_prompts(a.requests, seed=0)
    rows: dict[str, list[dict]] = {f"{r}x{t}": [] for r, t in layouts}
    try:
        for rep in range(a.repeats):
            for r, t in layouts:
                name = f"{r}x{t}"
                serve.run(build_app(a.model, num_replicas=r, threads_per_rank=t,
                                    model_name="m", max_num_seqs=a.max_num_seqs),
                          name="bench", route_prefix="/")
                run_load(url, prompts[:4], model="m", max_tokens=4, stream=False)   # warm-up
                records, wall = run_load(url, prompts, model="m", max_tokens=a.max_tokens,
                                         concurrency=a.concurrency, stream=True)
                s = summarize(records, wall)
                rows[name].append(s)
                print(f"run {rep} {name}: {s['output_throughput']:.1f} tok/s, "
                      f"p99 TTFT {s['p99_ttft_ms']:.0f} ms, completed {s['completed']}",
                      file=sys.stderr, flush=True)
                serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()

    def med(name: str, key: str) -> float:
        return statistics.median(s[key] for s in rows[name])

    print(f"\n{a.requests} requests x {a.max_tokens} tokens, {a.concurrency} in flight, "
          f"{a.model}, {a.repeats} interleaved runs per layout (medians)\n")
    print("| layout | output tok/s | requests/s | p50 TTFT ms | p99 TTFT ms | runs (tok/s) |")
    print("|---|---|---|---|---|---|")
    for r, t in layouts:
        name = f"{r}x{t}"
        runs = ", ".join(f"{s['output_throughput']:.0f}" for s in rows[name])
        print(f"| {r} replica{'s' if r > 1 else ''} x {t} thread{'s' if t > 1 else ''} | "
              f"{med(name, 'output_throughput'):.1f} | {med(name, 'request_throughput'):.2f} | "
              f"{med(name, 'p50_ttft_ms'):.0f} | {med(name, 'p99_ttft_ms'):.0f} | {runs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

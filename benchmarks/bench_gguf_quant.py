"""SmolLM2-135M GGUF (Q4_1 layers, Q8_0 embedding / tied LM head): decode step time and peak
RSS with the Q8_0 tensors kept in their blocks (default) against dequantised to fp32 on load
(PARALLAX_GGUF_DEQUANTIZE=1, the old path). Each run is a fresh process (peak RSS is per
process); runs alternate A, B, A, B...; medians.

    PYTHONPATH=src python benchmarks/bench_gguf_quant.py [--runs 3] [--tokens 32] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ONE_RUN = r"""
import json, sys, time, torch, parallax
torch.set_num_threads(int(sys.argv[2]))
with parallax.LLM("smollm2-135m", threads_per_rank=int(sys.argv[2])) as llm:
    kw = dict(max_new_tokens=int(sys.argv[1]), ignore_eos=True, chat=False)
    llm.generate(["Warm up"], max_new_tokens=4, ignore_eos=True, chat=False)
    t0 = time.perf_counter()
    out = llm.generate(["The three primary colors are"], **kw)[0]
    dt = time.perf_counter() - t0
    m = llm.memory()[0]
    print(json.dumps({"ms_per_token": 1e3 * dt / len(out.token_ids),
                      "weight_bytes": m["weight_bytes"], "peak_rss_bytes": m["peak_rss_bytes"],
                      "tokens": out.token_ids}))
"""


def one(dequantize: bool, tokens: int, threads: int) -> dict:
    env = dict(os.environ, PARALLAX_GGUF_DEQUANTIZE="1" if dequantize else "0")
    r = subprocess.run([sys.executable, "-c", ONE_RUN, str(tokens), str(threads)], env=env,
                       capture_output=True, text=True, timeout=600, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    res: dict[str, list[dict]] = {"q8_0 kept": [], "fp32 (dequantised)": []}
    for _ in range(a.runs):
        for name in res:
            res[name].append(one(name.startswith("fp32"), a.tokens, a.threads))
    toks = {name: {tuple(r["tokens"]) for r in rs} for name, rs in res.items()}
    print(f"# SmolLM2-135M GGUF, {a.tokens} new tokens, {a.threads} threads, {a.runs} runs each, "
          f"medians; same greedy tokens: {len(set().union(*toks.values())) == 1}")
    print("| weights | ms / token | weight MiB | peak RSS MiB |\n|---|---:|---:|---:|")
    for name, rs in res.items():
        med = {k: statistics.median(r[k] for r in rs)
               for k in ("ms_per_token", "weight_bytes", "peak_rss_bytes")}
        print(f"| {name} | {med['ms_per_token']:.1f} | {med['weight_bytes'] / 2**20:.1f} | "
              f"{med['peak_rss_bytes'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()

"""A GGUF model (default SmolLM2-135M: Q4_1 layers, Q8_0 embedding / tied LM head): batch-1
decode speed and peak RSS with its block weights kept (PARALLAX_GGUF_ACTIVATIONS=q8: 8-bit
activations, integer dot products; and the default f32) against dequantised to fp32 on load
(PARALLAX_GGUF_DEQUANTIZE=1, the old path). Each run is a fresh process (peak RSS is per
process); runs alternate A, B, C, A, B, C...; medians. Prints the file size beside the RSS.
Q8_0 / Q4_0 files of SmolLM2: benchmarks/requant_gguf.py.

    PYTHONPATH=src python benchmarks/bench_gguf_quant.py [--model smollm2-135m|FILE.gguf]
        [--runs 3] [--tokens 32] [--threads 2] [--modes q8,f32,fp32]
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
import json, resource, sys, time, torch, parallax
runtime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # interpreter + torch
torch.set_num_threads(int(sys.argv[2]))
with parallax.LLM(sys.argv[3], threads_per_rank=int(sys.argv[2])) as llm:
    kw = dict(max_new_tokens=int(sys.argv[1]), ignore_eos=True, chat=False)
    llm.generate(["Warm up"], max_new_tokens=4, ignore_eos=True, chat=False)
    t0 = time.perf_counter()
    out = llm.generate(["The three primary colors are"], **kw)[0]
    dt = time.perf_counter() - t0
    m = llm.memory()[0]
    print(json.dumps({"ms_per_token": 1e3 * dt / len(out.token_ids),
                      "kv_bytes": m["kv_cache_bytes"], "runtime_bytes": runtime,
                      "weight_bytes": m["weight_bytes"], "peak_rss_bytes": m["peak_rss_bytes"],
                      "tokens": out.token_ids}))
"""


MODES = {   # name -> environment of the run
    "q8": ("blocks kept, 8-bit activations", {"PARALLAX_GGUF_DEQUANTIZE": "0",
                                                        "PARALLAX_GGUF_ACTIVATIONS": "q8"}),
    "f32": ("fp32 activations (default; Q8_0 / Q4_0 kept)", {"PARALLAX_GGUF_DEQUANTIZE": "0",
                                             "PARALLAX_GGUF_ACTIVATIONS": "f32"}),
    "fp32": ("dequantised to fp32 on load", {"PARALLAX_GGUF_DEQUANTIZE": "1"}),
}


def one(mode: str, model: str, tokens: int, threads: int) -> dict:
    env = dict(os.environ, **MODES[mode][1])
    r = subprocess.run([sys.executable, "-c", ONE_RUN, str(tokens), str(threads), model],
                       env=env, capture_output=True, text=True, timeout=900, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="q8,f32,fp32")
    a = ap.parse_args()
    from parallax.loading import resolve_model_path
    path = resolve_model_path(a.model)
    res: dict[str, list[dict]] = {m: [] for m in a.modes.split(",")}
    for _ in range(a.runs):
        for mode in res:
            res[mode].append(one(mode, path, a.tokens, a.threads))
    toks = {mode: [r["tokens"] for r in rs] for mode, rs in res.items()}
    file_mib = os.path.getsize(path) / 2**20
    print(f"# {os.path.basename(path)} ({file_mib:.1f} MiB), {a.tokens} new tokens, "
          f"{a.threads} threads, {a.runs} fresh processes each, interleaved, medians")
    print("(import: the process's RSS after importing torch and parallax; rest: peak RSS - KV "
          "cache - import; other: rest - weights (tokenizer, kernels, buffers))")
    print("| weights | ms / token | tok/s | weight MiB | peak RSS MiB | KV MiB | import MiB | "
          "other MiB | rest / file | same tokens as fp32 |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for mode, rs in res.items():
        med = {k: statistics.median(r[k] / (1 if k == "ms_per_token" else 2**20) for r in rs)
               for k in ("ms_per_token", "weight_bytes", "peak_rss_bytes", "kv_bytes",
                         "runtime_bytes")}
        same = toks["fp32"][0] == toks[mode][0] if "fp32" in toks else "-"
        rest = med["peak_rss_bytes"] - med["kv_bytes"] - med["runtime_bytes"]
        print(f"| {MODES[mode][0]} | {med['ms_per_token']:.1f} | "
              f"{1e3 / med['ms_per_token']:.1f} | {med['weight_bytes']:.1f} | "
              f"{med['peak_rss_bytes']:.0f} | {med['kv_bytes']:.0f} | "
              f"{med['runtime_bytes']:.0f} | {rest - med['weight_bytes']:.0f} | "
              f"{rest / file_mib:.2f} | {same} |")


if __name__ == "__main__":
    main()

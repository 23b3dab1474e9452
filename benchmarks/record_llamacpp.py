"""Record llama.cpp's greedy tokens on SmolLM2 Q8_0 for tests/test_ggml_numerics.py, which
checks that parallax with ``PARALLAX_NUMERICS=ggml`` gives the same tokens and logits
without llama.cpp installed (CI has none).

    PYTHONPATH=src python benchmarks/record_llamacpp.py \
        --build avx512=/path/to/llamacpp-venv/bin/python \
        --build avx2=/path/to/llamacpp-avx2-venv/bin/python

``--build LEVEL=PY``: a Python with llama-cpp-python built for that ISA level (avx512: an
AVX-512 build, e.g. GGML_NATIVE on an AVX-512 machine; avx2: GGML_AVX2/FMA/F16C with
AVX-512 off; docs/benchmarks.md has the build flags), the level naming the parallax kernel
variant that must reproduce it. The file is the installed SmolLM2 Q4_1 requantised to Q8_0
by gguf-py (requant_gguf.py), which the test makes again (and checks by its SHA-256); for
each build and prompt the record holds the greedy tokens (llamacpp_driver.py ``generate``,
llama.cpp's default context: F16 K/V cache, flash attention) and the top logits of the
prompt's last position (``logits``), as float32 bit patterns.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import struct
import sys
import tempfile

import numpy as np

from bench_generate import Driver, agreement_ids   # benchmarks/, this script's folder
from requant_gguf import requantize

# Indices into bench_generate.agreement_ids(): two plain prompts and two chat messages,
# where llama.cpp's AVX2 and AVX-512 builds part within 32 tokens (so each record tells the
# two levels apart).
PROMPTS = (2, 3, 4, 7)
NEW_TOKENS = 32
TOP = 8


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def q8_0_file(folder: str) -> str:
    """The installed SmolLM2 requantised to Q8_0 by gguf-py, in ``folder``."""
    import gguf
    from parallax.loading import resolve_model_path
    out = os.path.join(folder, "SmolLM2-135M-Instruct.requant-Q8_0.gguf")
    if not os.path.exists(out):
        requantize(resolve_model_path("smollm2-135m"), out, gguf.GGMLQuantizationType.Q8_0)
    return out


def bits(x: float) -> str:
    """A float32 as its bit pattern (hex), exact in JSON."""
    return struct.pack("<f", x).hex()


def record(py: str, path: str, prompts: list[list[int]], threads: int) -> dict:
    llama = Driver(py, "llamacpp_driver.py", os.path.join(tempfile.gettempdir(), "record.log"))
    try:
        info = llama.call("version")
        llama.call("load", path=path, threads=threads, batches=[1], n_ctx_seq=512)
        runs = []
        for ids in prompts:
            tokens = llama.call("generate", ids=ids, n=NEW_TOKENS, batch=1)["tokens"][0]
            out = os.path.join(tempfile.gettempdir(), "record_logits.npy")
            llama.call("logits", ids=ids, forced=tokens[:1], out=out)
            row = np.load(out)[0]
            top = np.argsort(-row, kind="stable")[:TOP]
            runs.append({"tokens": tokens, "top_ids": top.tolist(),
                         "top_logits": [bits(float(row[i])) for i in top]})
        return {"llama_cpp": info["version"], "system": info["system"], "runs": runs}
    finally:
        llama.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", action="append", required=True, metavar="LEVEL=PY")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests",
                                                  "data", "llamacpp_greedy_q8_0.json"))
    ap.add_argument("--cache", default=os.path.join(
        os.environ.get("PARALLAX_CACHE_DIR") or os.path.expanduser("~/.cache/parallax"),
        "bench_gguf"))
    a = ap.parse_args()
    from parallax.loading import load_tokenizer
    os.makedirs(a.cache, exist_ok=True)
    path = q8_0_file(a.cache)
    prompts = [agreement_ids(load_tokenizer("smollm2-135m"))[i] for i in PROMPTS]
    rec = {"file": "SmolLM2-135M-Instruct Q4_1 requantised to Q8_0 by gguf-py "
                   "(benchmarks/requant_gguf.py)",
           "gguf_py": importlib.metadata.version("gguf"),
           "sha256": sha256(path), "new_tokens": NEW_TOKENS, "threads": a.threads,
           "prompts": [{"label": label, "ids": ids} for label, ids in prompts], "builds": {}}
    for spec in a.build:
        level, _, py = spec.partition("=")
        print(f"recording {level} with {py}", file=sys.stderr)
        rec["builds"][level] = record(py, path, [ids for _, ids in prompts], a.threads)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(rec, f, indent=1)
        f.write("\n")
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

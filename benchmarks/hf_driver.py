"""HF transformers side of bench_generate.py, in a process of its own, driven over
stdin/stdout with one JSON object per line each way (as llamacpp_driver.py).

Why a process: libgomp gives every thread that starts parallel regions its own team of
worker threads, and once a process holds more team threads than cores each team sleeps
between regions instead of spinning (docs/engine.md, "Threads and OpenMP"). HF generating
in bench_generate's main thread kept a second team beside parallax's engine thread and
cost parallax ~25% at batch 1 (29 against bench_step's 39 tok/s); here each engine's
process holds one team, as it would alone.

    python benchmarks/hf_driver.py                         # then JSON lines:

    {"cmd": "load", "path": F, "threads": 2}           -> {"ok": true, "load_s": t}
    {"cmd": "generate", "ids": [...], "n": N, "batch": B}
                                                        -> {"tokens": [[...] * B], "cpu_s": t}
    {"cmd": "capability"}                              -> {"capability": "AVX2"}

``load`` reads the GGUF file with ``from_pretrained(gguf_file=...)``, dequantised to fp32;
``generate`` runs B copies of the prompt greedily for exactly N new tokens
(``min_new_tokens`` = N); ``cpu_s`` is this process's CPU time (all threads) for it.
Errors answer {"error": message}.
"""
from __future__ import annotations

import os
import time

import torch
from driver_loop import serve


class Runner:
    def __init__(self) -> None:
        self.model = None

    def load(self, path: str, threads: int) -> dict:
        from transformers import AutoModelForCausalLM
        from transformers import logging as hf_logging
        hf_logging.set_verbosity_error()
        torch.set_num_threads(threads)
        t = time.perf_counter()
        self.model = None
        self.model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
        return {"ok": True, "load_s": time.perf_counter() - t}

    def capability(self) -> dict:
        """The CPU capability torch's ATen kernels dispatch to in this process (AVX512,
        AVX2, DEFAULT: ATEN_CPU_CAPABILITY caps it)."""
        return {"capability": torch.backends.cpu.get_cpu_capability()}

    def generate(self, ids: list[int], n: int, batch: int) -> dict:
        c = time.process_time()
        x = torch.tensor([ids] * batch)
        with torch.inference_mode():
            out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=0)
        return {"tokens": out[:, len(ids):].tolist(), "cpu_s": time.process_time() - c}


if __name__ == "__main__":
    serve(Runner())

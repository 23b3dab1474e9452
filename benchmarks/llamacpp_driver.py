"""llama.cpp side of bench_generate.py: run by ANOTHER Python (the one llama-cpp-python is
installed in, kept out of parallax's environment), driven over stdin/stdout, one JSON
object per line each way. It imports only llama_cpp, numpy and the standard library.

    /path/to/llamacpp-venv/bin/python benchmarks/llamacpp_driver.py     # then JSON lines:

    {"cmd": "version"}            -> {"version": "0.3.x", "system": ..., "cpu_lib": path}
    {"cmd": "quantize", "src": F, "dst": G, "ftype": 7}  -> {"ok": true}   (0 F32, 7 Q8_0, 2 Q4_0)
    {"cmd": "load", "path": F, "threads": 2, "batches": [1, 8], "n_ctx_seq": 512}
                                                         -> {"ok": true, "n_vocab": V}
    {"cmd": "generate", "ids": [...], "n": N, "batch": B}
                                                         -> {"tokens": [[...] * B], "cpu_s": t}
    {"cmd": "free"}                                      -> {"ok": true}

``generate`` runs B copies of the prompt as B parallel sequences of one context (llama.cpp's
``llama_batch`` with one sequence id per row: one prefill call for all rows, then one decode
call per step carrying one token of every sequence) and greedy-samples each row (argmax of
its logits) for N tokens: the first from the prefill, N - 1 decode steps after it, the
semantics of ``LLM.generate(max_new_tokens=N)``; ``cpu_s`` is the CPU time this process
(all its threads) spent on it. Errors answer {"error": message}.
"""
from __future__ import annotations

import ctypes
import os
import time

import llama_cpp
import numpy as np
from driver_loop import serve   # benchmarks/, this script's folder


PREFILL_TOKENS = 512   # n_batch: the prefill of every sequence goes in one llama_decode call


def _first(*names):
    """The first of these llama_cpp functions this version has (the C API renames some)."""
    for name in names:
        fn = getattr(llama_cpp, name, None)
        if fn is not None:
            return fn
    raise AttributeError(f"llama_cpp has none of {names}")


class Runner:
    def __init__(self) -> None:
        llama_cpp.llama_backend_init()
        self.model = None
        self.ctxs: dict[int, object] = {}
        self.batches: dict[int, object] = {}

    def version(self) -> dict:
        info = llama_cpp.llama_print_system_info()
        lib = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-cpu.so")
        return {"version": llama_cpp.__version__,
                "system": info.decode() if isinstance(info, bytes) else str(info),
                "cpu_lib": os.path.realpath(lib) if os.path.exists(lib) else None}

    def quantize(self, src: str, dst: str, ftype: int) -> dict:
        params = llama_cpp.llama_model_quantize_default_params()
        params.allow_requantize = True
        params.ftype = ftype
        rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
        if rc != 0:
            return {"error": f"llama_model_quantize({src}, ftype={ftype}) returned {rc}"}
        return {"ok": True}

    def load(self, path: str, threads: int, batches: list[int], n_ctx_seq: int) -> dict:
        self.free()
        mparams = llama_cpp.llama_model_default_params()
        self.model = _first("llama_model_load_from_file", "llama_load_model_from_file")(
            path.encode(), mparams)
        if not self.model:
            return {"error": f"llama.cpp could not load {path}"}
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        for b in batches:
            cp = llama_cpp.llama_context_default_params()
            cp.n_ctx = n_ctx_seq * b
            cp.n_batch = cp.n_ubatch = PREFILL_TOKENS
            cp.n_seq_max = b
            cp.n_threads = cp.n_threads_batch = threads
            ctx = _first("llama_init_from_model", "llama_new_context_with_model")(self.model, cp)
            if not ctx:
                return {"error": f"llama.cpp could not make a context for {b} sequences"}
            self.ctxs[b] = ctx
            self.batches[b] = llama_cpp.llama_batch_init(cp.n_batch, 0, b)
        return {"ok": True, "n_vocab": self.n_vocab}

    def _clear(self, ctx) -> None:
        if hasattr(llama_cpp, "llama_get_memory"):
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        else:
            _first("llama_kv_self_clear", "llama_kv_cache_clear")(ctx)

    def _argmax(self, ctx, row: int) -> int:
        ptr = llama_cpp.llama_get_logits_ith(ctx, row)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def generate(self, ids: list[int], n: int, batch: int) -> dict:
        cpu0 = time.process_time()
        ctx, lb = self.ctxs[batch], self.batches[batch]
        self._clear(ctx)
        p = len(ids)
        if batch * p > PREFILL_TOKENS:
            return {"error": f"{batch} x {p} prompt tokens: more than one llama_decode call "
                             f"takes here ({PREFILL_TOKENS})"}
        # Prefill: every sequence's prompt in one call; logits only at each last position.
        lb.n_tokens = batch * p
        for s in range(batch):
            for j, tok in enumerate(ids):
                i = s * p + j
                lb.token[i], lb.pos[i], lb.n_seq_id[i] = tok, j, 1
                lb.seq_id[i][0] = s
                lb.logits[i] = j == p - 1
        if llama_cpp.llama_decode(ctx, lb) != 0:
            return {"error": "llama_decode failed on the prompt"}
        nxt = [self._argmax(ctx, s * p + p - 1) for s in range(batch)]
        out: list[list[int]] = [[] for _ in range(batch)]
        for step in range(n):
            for s in range(batch):
                out[s].append(nxt[s])
            if step == n - 1:
                break
            lb.n_tokens = batch
            for s in range(batch):
                lb.token[s], lb.pos[s], lb.n_seq_id[s] = nxt[s], p + step, 1
                lb.seq_id[s][0] = s
                lb.logits[s] = True
            if llama_cpp.llama_decode(ctx, lb) != 0:
                return {"error": f"llama_decode failed at step {step}"}
            nxt = [self._argmax(ctx, s) for s in range(batch)]
        return {"tokens": out, "cpu_s": time.process_time() - cpu0}

    def free(self) -> dict:
        for b in list(self.ctxs):
            llama_cpp.llama_batch_free(self.batches.pop(b))
            llama_cpp.llama_free(self.ctxs.pop(b))
        if self.model:
            _first("llama_model_free", "llama_free_model")(self.model)
            self.model = None
        return {"ok": True}


if __name__ == "__main__":
    r = Runner()
    try:
        serve(r)
    finally:
        r.free()

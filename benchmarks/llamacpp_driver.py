"""llama.cpp side of bench_generate.py: run by ANOTHER Python (the one llama-cpp-python is
installed in, kept out of parallax's environment), driven over stdin/stdout, one JSON
object per line each way. It imports only llama_cpp, numpy and the standard library.

    /path/to/llamacpp-venv/bin/python benchmarks/llamacpp_driver.py     # then JSON lines:

    {"cmd": "version"}            -> {"version": "0.3.x", "system": ..., "cpu_lib": path}
    {"cmd": "quantize", "src": F, "dst": G, "ftype": 7}  -> {"ok": true}   (0 F32, 7 Q8_0, 2 Q4_0)
    {"cmd": "load", "path": F, "threads": 2, "batches": [1, 8], "n_ctx_seq": 512}
                                                         -> {"ok": true, "n_vocab": V}
    {"cmd": "generate", "ids": [...], "n": N, "batch": B, "kv": "default"}
                                                         -> {"tokens": [[...] * B], "cpu_s": t}
    {"cmd": "logits", "ids": [...], "forced": [...], "out": F, "kv": "default"}
                                                         -> {"shape": [len(forced), V]}
    {"cmd": "free"}                                      -> {"ok": true}

``generate`` runs B copies of the prompt as B parallel sequences of one context (llama.cpp's
``llama_batch`` with one sequence id per row: one prefill call for all rows, then one decode
call per step carrying one token of every sequence) and greedy-samples each row (argmax of
its logits) for N tokens: the first from the prefill, N - 1 decode steps after it, the
semantics of ``LLM.generate(max_new_tokens=N)``; ``cpu_s`` is the CPU time this process
(all its threads) spent on it. ``logits`` is the same batch-1 path teacher-forced: the
prompt in one call, then the tokens of ``forced`` one decode call each (all but the last);
the logits that chose each token of ``forced`` (the prompt's last position's, then each
step's) go to the float32 .npy file F, (len(forced), V).

``kv`` picks the context: "default" is llama.cpp's own default (F16 K and V cache, flash
attention on auto, which the CPU takes: q, K and V go into it as fp16), "f32" an F32 K and V
cache with flash attention off (attention in fp32, the precision of parallax's fp32 cache;
with flash attention on, llama.cpp casts an F32 cache to F16 for it, and the logits equal
the default's bit for bit). Contexts are made on first use, one per (batch, kv).
Errors answer {"error": message}.
"""
from __future__ import annotations

import ctypes
import os
import time

import llama_cpp
import numpy as np
from driver_loop import serve   # benchmarks/, this script's folder


PREFILL_TOKENS = 512   # n_batch: the prefill of every sequence goes in one llama_decode call
# kv -> (type_k = type_v, flash attention), llama_cpp names; None: llama.cpp's default
KV_TYPES = {"default": (None, None),
            "f32": ("GGML_TYPE_F32", "LLAMA_FLASH_ATTN_TYPE_DISABLED")}


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
        self.ctxs: dict[tuple[int, str], object] = {}
        self.batches: dict[tuple[int, str], object] = {}

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
        self.threads, self.n_ctx_seq = threads, n_ctx_seq
        for b in batches:
            self._context(b, "default")
        return {"ok": True, "n_vocab": self.n_vocab}

    def _context(self, b: int, kv: str):
        """The context for ``b`` parallel sequences with the ``kv`` cache (made once)."""
        if (b, kv) in self.ctxs:
            return self.ctxs[b, kv], self.batches[b, kv]
        if kv not in KV_TYPES:
            raise ValueError(f"kv={kv!r}: use one of {list(KV_TYPES)}")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = self.n_ctx_seq * b
        cp.n_batch = cp.n_ubatch = PREFILL_TOKENS
        cp.n_seq_max = b
        cp.n_threads = cp.n_threads_batch = self.threads
        kv_type, flash = KV_TYPES[kv]
        if kv_type is not None:
            cp.type_k = cp.type_v = getattr(llama_cpp, kv_type)
        if flash is not None:
            cp.flash_attn_type = getattr(llama_cpp, flash)
        ctx = _first("llama_init_from_model", "llama_new_context_with_model")(self.model, cp)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not make a context for {b} sequences, kv={kv}")
        self.ctxs[b, kv] = ctx
        self.batches[b, kv] = llama_cpp.llama_batch_init(cp.n_batch, 0, b)
        return ctx, self.batches[b, kv]

    def _clear(self, ctx) -> None:
        if hasattr(llama_cpp, "llama_get_memory"):
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        else:
            _first("llama_kv_self_clear", "llama_kv_cache_clear")(ctx)

    def _logits(self, ctx, row: int) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(ctx, row)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def _argmax(self, ctx, row: int) -> int:
        return int(self._logits(ctx, row).argmax())

    def _step(self, ctx, lb, tok: int, pos: int) -> None:
        """One decode call: token ``tok`` at ``pos`` of sequence 0, its logits kept."""
        lb.n_tokens = 1
        lb.token[0], lb.pos[0], lb.n_seq_id[0], lb.logits[0] = tok, pos, 1, True
        lb.seq_id[0][0] = 0
        if llama_cpp.llama_decode(ctx, lb) != 0:
            raise RuntimeError(f"llama_decode failed at position {pos}")

    def logits(self, ids: list[int], forced: list[int], out: str, kv: str = "default") -> dict:
        ctx, lb = self._context(1, kv)
        self._clear(ctx)
        p = len(ids)
        if p > PREFILL_TOKENS:
            return {"error": f"{p} prompt tokens: more than one llama_decode call takes here"}
        lb.n_tokens = p
        for j, tok in enumerate(ids):
            lb.token[j], lb.pos[j], lb.n_seq_id[j], lb.logits[j] = tok, j, 1, j == p - 1
            lb.seq_id[j][0] = 0
        if llama_cpp.llama_decode(ctx, lb) != 0:
            return {"error": "llama_decode failed on the prompt"}
        rows = [self._logits(ctx, p - 1).copy()]
        for step, tok in enumerate(forced[:-1]):
            self._step(ctx, lb, tok, p + step)
            rows.append(self._logits(ctx, 0).copy())
        np.save(out, np.stack(rows).astype(np.float32))
        return {"shape": [len(rows), self.n_vocab]}

    def generate(self, ids: list[int], n: int, batch: int, kv: str = "default") -> dict:
        cpu0 = time.process_time()
        ctx, lb = self._context(batch, kv)
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

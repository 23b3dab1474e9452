"""The hot-path ops, dispatched in one place.

``PARALLAX_KERNELS`` (read once, at import) picks the implementation:

- ``auto`` (default): the CUDA extension for tensors on a GPU when it loads (prebuilt, or
  JIT-built on the first GPU call), the torch references (ops/reference.py) otherwise;
- ``cuda``: like auto, but the extension must load: importing this module raises if it cannot;
- ``reference``: always the torch references.

fp32 CPU tensors take the C kernels of csrc/cpu (ops/cpu.py: packed matmul, int8 and GGUF
Q8_0 / Q4_0 / Q4_1 / Q4_K / Q6_K block matmuls (x exact, or with
``PARALLAX_GGUF_ACTIVATIONS=q8`` rounded to 8-bit blocks first, as llama.cpp does), norms,
``silu_and_mul``, decode attention with the cache write, paged attention over a flat mixed
prefill/decode batch) where they build, in the variant
for the CPU's instruction set (``PARALLAX_CPU_ISA`` forces one); the packed matmul goes to
torch instead for the weight shapes and row counts where torch measured faster. ``linear``
with few rows takes the batched-gemm form in ops/cpu.py; other CPU tensors the reference.
``kernel_report()`` says what runs. On a GPU, ``paged_attention_with_kvcache`` (the model's
attention) takes the CUDA paged kernel for fp32/fp16/bf16 and head dims 64/96/128/256. GPU
inputs a kernel does not cover (float32 elsewhere, other head dims, int8 batches above
``cuda.INT8_GEMV_MAX_M`` rows) also take the reference, which runs on the GPU through torch.
Prefill attention, dense ``linear`` and ``quantize_int8`` always use the reference: torch's
SDPA (flash backend) and cuBLAS are what we would write (docs/kernels.md says why).

Differences callers must know: the CUDA ``rotary_embedding`` rotates q and k in place and
returns them (the reference returns new tensors). Context lengths outside [1, cache slots]
raise ``KernelInputError`` before anything is written, except on a GPU while a CUDA graph is
being captured (no host sync then): the CUDA ``decode_attention`` then returns NaN for such
a sequence and reads nothing, and the CUDA paged kernel returns NaN for a sequence with a bad
length, slot or block id and writes none of its tokens into the cache.
"""

from __future__ import annotations

import os

import torch

from ..errors import KernelInputError
from . import cpu as _cpu
from . import cuda as _cuda
from . import ggml as _ggml
from . import reference as _ref
from .reference import (paged_attention, prefill_attention, q4_0_embedding, q4_1_embedding,
                        q4_k_embedding, q6_k_embedding, q8_0_embedding, quantize_int8,
                        write_paged_kv)

__all__ = ["add_rms_norm", "argmax_rows", "decode_attention", "decode_attention_with_kvcache",
           "paged_attention", "paged_attention_with_kvcache", "write_paged_kv",
           "embedding_packed", "int8_linear", "q8_0_linear", "q4_0_linear", "q4_1_linear",
           "q4_k_linear", "q6_k_linear", "q8_0_embedding", "q4_0_embedding", "q4_1_embedding",
           "q4_k_embedding", "q6_k_embedding", "linear", "linear_packed", "prefill_attention",
           "quantize_int8", "rms_norm", "rotary_embedding", "silu_and_mul", "active_backend",
           "kernel_report", "check_context_lens"]

_MODE = os.environ.get("PARALLAX_KERNELS", "auto").strip().lower() or "auto"
if _MODE not in ("auto", "cuda", "reference"):
    raise ValueError(f"PARALLAX_KERNELS must be auto, cuda or reference, got {_MODE!r}")

_HALF = (torch.float16, torch.bfloat16)
# None: not tried yet (auto loads lazily on the first GPU tensor); then True/False for good.
_cuda_ok: bool | None = False if _MODE == "reference" else None

if _MODE == "cuda":
    if not _cuda.load_extension():
        raise RuntimeError("PARALLAX_KERNELS=cuda but the parallax CUDA extension is not "
                           f"available: {_cuda.load_error()}. Install parallax on a machine "
                           "with CUDA torch and nvcc (or set PARALLAX_KERNELS=auto).")
    _cuda_ok = True


def _resolve() -> bool:
    global _cuda_ok
    _cuda_ok = _cuda.load_extension()
    return _cuda_ok


def _on_cuda(t: torch.Tensor) -> bool:
    """True when t is on a GPU and the extension is usable (loaded once, then a flag test)."""
    if not t.is_cuda:
        return False
    ok = _cuda_ok
    return _resolve() if ok is None else ok


def active_backend() -> str:
    """"cuda" when GPU tensors would use the extension, else "reference"."""
    if _cuda_ok is None and torch.cuda.is_available():
        _resolve()
    return "cuda" if _cuda_ok else "reference"


# Which ops have a C kernel (fp32 CPU tensors) and which a CUDA one (fp16/bf16 GPU tensors).
_CPU_OPS = ("linear_packed", "int8_linear", "q8_0_linear", "q4_0_linear", "q4_1_linear",
            "q4_k_linear", "q6_k_linear", "rms_norm", "add_rms_norm", "silu_and_mul", "argmax_rows",
            "decode_attention_with_kvcache", "paged_attention_with_kvcache")
_CUDA_OPS = ("rms_norm", "add_rms_norm", "rotary_embedding", "decode_attention",
             "decode_attention_with_kvcache", "int8_linear", "paged_attention_with_kvcache")


def kernel_report() -> dict:
    """What runs each hot-path op on this machine, for ``parallax info`` and the logs.

    Keys: ``device`` ("cuda" when torch sees a GPU, else "cpu"); ``backend``, the kernels
    in use on that device ("cuda", "cpu-<variant>": "cpu-avx512vnni", "cpu-avx2", ..., or "torch");
    ``isa``, the best CPU variant this CPU runs; ``variant``, the CPU variant loaded (None
    when none is); ``compiler``; ``build_error``, the compiler's message when the CPU
    kernels did not build; ``cuda_error``; ``ops``, op name -> implementation on ``device``
    (fp32 on the CPU, fp16/bf16 on a GPU); ``matmul``, the measured kernel-or-torch choice
    per packed weight shape and row bucket so far (ops/cpu.py: matmul_path); ``numerics``,
    "ggml" under PARALLAX_NUMERICS=ggml (llama.cpp's arithmetic: ops/ggml.py), else "parallax".
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    variant = None if _MODE == "reference" else _cpu._best()
    cpu_built = variant is not None and _cpu.kernels() is not None
    if device == "cuda":
        backend = active_backend()
        backend = "cuda" if backend == "cuda" else "torch"
        kernel_ops = _CUDA_OPS
    else:
        backend = f"cpu-{variant}" if cpu_built else "torch"
        kernel_ops = _CPU_OPS
    names = [n for n in __all__ if n not in ("active_backend", "kernel_report",
                                              "check_context_lens")]
    return {
        "device": device, "backend": backend,
        "isa": _cpu.supported_variants()[0], "variant": variant if cpu_built else None,
        "compiler": _cpu.compiler(), "build_error": _cpu.build_error() if variant else None,
        "cuda_error": _cuda.load_error(),
        "ops": {n: backend if n in kernel_ops and backend != "torch" else "torch"
                for n in sorted(names)},
        "matmul": _cpu.matmul_choices(),
        "numerics": "ggml" if _ggml.enabled() else "parallax",
    }


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if _cpu.use_small_m(x, weight):
        return _cpu.linear_small_m(x, weight, bias)
    return _ref.linear(x, weight, bias)


def linear_packed(x: torch.Tensor, packed: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weights packed by ``ops.cpu.pack`` (done only where the CPU kernel is built)."""
    if x.dtype == torch.float32 and not x.is_cuda and _cpu.kernels() is not None:
        return _cpu.linear_packed_auto(x, packed, bias)   # the kernel or torch, as measured
    return _ref.linear_packed(x, packed, bias)


embedding_packed = _cpu.embedding_packed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _ggml.enabled():
        return _ggml.rms_norm(x, weight, eps)
    if _on_cuda(x) and x.dtype in _HALF and weight.dtype == x.dtype:
        return _cuda.rms_norm(x, weight, eps)
    if _cpu.fits(x, weight) and x.is_contiguous():
        return _cpu.add_rms_norm(x, None, weight, eps)[0]
    return _ref.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if _ggml.enabled():
        return _ggml.add_rms_norm(x, residual, weight, eps)
    if (_on_cuda(x) and x.dtype in _HALF and residual.dtype == x.dtype
            and weight.dtype == x.dtype and residual.shape == x.shape):
        return _cuda.add_rms_norm(x, residual, weight, eps)
    if (_cpu.fits(x, residual, weight) and residual.shape == x.shape and x.is_contiguous()
            and residual.is_contiguous()):
        return _cpu.add_rms_norm(x, residual, weight, eps)
    return _ref.add_rms_norm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if _ggml.enabled():
        return _ggml.silu_and_mul(x)
    if _cpu.fits(x) and x.is_contiguous():
        return _cpu.silu_and_mul(x)
    return _ref.silu_and_mul(x)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """(M, N) -> (M,) int64, torch.argmax(x, -1) (ties: the first index; NaN: the largest).
    fp32 CPU: the C kernel (vector passes, rows over the threads: a greedy step's R x vocab
    logits in ~1/10 of torch's time); elsewhere torch."""
    if x.dim() == 2 and x.shape[1] > 0 and _cpu.fits(x) and x.is_contiguous():
        return _cpu.argmax_rows(x)
    return _ref.argmax_rows(x)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if (_on_cuda(q) and q.dtype in _HALF and k.dtype == q.dtype and q.dim() == 4
            and q.stride(-1) == 1 and k.stride(-1) == 1 and cos.dtype == torch.float32):
        return _cuda.rotary_embedding(q, k, cos, sin)
    return _ref.rotary_embedding(q, k, cos, sin)


def check_context_lens(context_lens: torch.Tensor, slots: int) -> None:
    """Raise KernelInputError unless every length is in [1, slots]. One host sync on a GPU;
    skipped while a CUDA graph is captured."""
    if context_lens.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    bad = ((context_lens < 1) | (context_lens > slots)).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        raise KernelInputError(f"decode attention: context_lens[{i}] = {int(context_lens[i])} "
                               f"is outside [1, {slots}] (the cache's slots); nothing was written")


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    check_context_lens(context_lens, k_cache.shape[2])
    d = q.shape[-1]
    if (_on_cuda(q) and q.dtype in _HALF and (d == 64 or d == 128)
            and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
            and k_cache.stride(-1) == 1 and k_cache.stride(-2) == d
            and v_cache.stride(-1) == 1 and v_cache.stride(-2) == d):
        return _cuda.decode_attention(q, k_cache, v_cache, context_lens, scale)
    return _ref.decode_attention(q, k_cache, v_cache, context_lens, scale)


def decode_attention_with_kvcache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  cos: torch.Tensor, sin: torch.Tensor,
                                  context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """See reference.decode_attention_with_kvcache. On the CPU (fp32) one C call; elsewhere
    the dispatched rotary and decode attention around the reference cache write."""
    args = (q, k, v, k_cache, v_cache, cos, sin, context_lens)
    if _cpu.fits(q, k, v, k_cache, v_cache) and _cpu.attention_layout_ok(*args):
        return _cpu.decode_attention_with_kvcache(*args, scale)
    check_context_lens(context_lens, k_cache.shape[2])   # before the cache write
    q, k = rotary_embedding(q[:, None], k[:, None], cos[:, None], sin[:, None])
    _ref.write_kv_cache(k[:, 0], v, k_cache, v_cache, context_lens)
    return decode_attention(q[:, 0], k_cache, v_cache, context_lens, scale)


def paged_attention_with_kvcache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 cos: torch.Tensor, sin: torch.Tensor,
                                 slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                                 context_lens: torch.Tensor, query_start_loc: torch.Tensor,
                                 scale: float, window: int | None = None,
                                 softcap: float | None = None) -> torch.Tensor:
    """See reference.paged_attention_with_kvcache (rotary, paged cache write, causal
    attention of a flat mixed prefill/decode batch, optionally over a sliding ``window``
    and with soft-capped scores). GPU tensors (fp32/fp16/bf16, head dim 64/96/128/256):
    the CUDA kernel; fp32 CPU: one C call; both take the window and the soft-cap. Elsewhere
    the reference. All raise ParallaxError on out-of-range slots, lengths or block ids
    (blocks wholly before a sliding window are not read, nor checked; on a GPU while a CUDA
    graph is captured there is no host check: the kernel answers NaN for such a sequence
    and writes none of its tokens)."""
    args = (q, k, v, k_cache, v_cache, cos, sin, slot_mapping, block_tables, context_lens,
            query_start_loc)
    if _on_cuda(q) and _cuda.paged_fits(q, k, v, k_cache, v_cache):
        if not torch.cuda.is_current_stream_capturing():   # no host sync inside a graph
            _ref.check_paged_metadata(slot_mapping, block_tables, context_lens,
                                      query_start_loc, k_cache.shape[0], k_cache.shape[2],
                                      window)
        return _cuda.paged_attention_with_kvcache(*args, scale, window, softcap)
    if _cpu.fits(q, k, v, k_cache, v_cache) and _cpu.paged_layout_ok(*args):
        return _cpu.paged_attention_with_kvcache(*args, scale, window, softcap)
    return _ref.paged_attention_with_kvcache(*args, scale, window, softcap)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    k = x.shape[-1]
    if (_on_cuda(x) and x.dtype in _HALF and k % 16 == 0 and qweight.is_contiguous()
            and x.numel() <= _cuda.INT8_GEMV_MAX_M * k
            and (bias is None or bias.dtype == x.dtype)):
        return _cuda.int8_linear(x, qweight, scales, bias)
    if _cpu.int8_fits(x, qweight, scales):   # the C kernel or torch, as measured
        return _cpu.int8_linear_auto(x, qweight, scales, bias)
    # Larger batches on a GPU: dequantize-then-matmul (the reference), cuBLAS does the work.
    return _ref.int8_linear(x, qweight, scales, bias)


def _block_linear(kind: str, x: torch.Tensor, qweight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T + bias, W in GGUF ``kind`` rows (uint8 (N, K/32 * block bytes)). On the CPU
    x is taken as ``cpu.block_activations()`` says (default exact; "q8": rounded to 8-bit
    blocks, as llama.cpp, reference.{kind}_linear_q8), by the C kernel or torch, as
    measured; on a GPU the dequantising reference."""
    if x.is_cuda:
        return getattr(_ref, f"{kind}_linear")(x, qweight, bias)
    if kind == "q8_0" and _ggml.enabled():
        return _cpu.q8_0_linear_ggml(x, qweight, bias)
    if _cpu.block_fits(kind, x, qweight):
        return _cpu.block_linear_auto(kind, x, qweight, bias)
    q8 = _cpu.block_activations() == "q8"
    return getattr(_ref, f"{kind}_linear_q8" if q8 else f"{kind}_linear")(x, qweight, bias)


def q8_0_linear(x: torch.Tensor, qweight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T + bias, W in GGUF Q8_0 rows (uint8 (N, K/32*34)); see _block_linear."""
    return _block_linear("q8_0", x, qweight, bias)


def q4_0_linear(x: torch.Tensor, qweight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T + bias, W in GGUF Q4_0 rows (uint8 (N, K/32*18)); see _block_linear."""
    return _block_linear("q4_0", x, qweight, bias)


def q4_1_linear(x: torch.Tensor, qweight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T + bias, W in GGUF Q4_1 rows (uint8 (N, K/32*20)); see _block_linear."""
    return _block_linear("q4_1", x, qweight, bias)


def q4_k_linear(x: torch.Tensor, qweight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T + bias, W in GGUF Q4_K rows (uint8 (N, K/256*144)); see _block_linear."""
    return _block_linear("q4_k", x, qweight, bias)


def q6_k_linear(x: torch.Tensor, qweight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T + bias, W in GGUF Q6_K rows (uint8 (N, K/256*210)); see _block_linear."""
    return _block_linear("q6_k", x, qweight, bias)

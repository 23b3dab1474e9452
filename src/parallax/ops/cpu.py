"""CPU fast paths of a decode step: the matmul (few rows, large weight) and, in C, the small
ops around it (csrc/cpu/decode_f32.c: add + RMSNorm, SiLU-and-mul, decode attention with
rotary and the cache write), each the twin of a reference in ops/reference.py.

Packed fp32 weights (the default for fp32 models on the CPU whose shard rows are a
multiple of 32) go through a small C kernel, csrc/cpu/gemm_f32.c, built just in time:
2-3x `F.linear` at 1-16 rows (docs/kernels.md). Other weights take the batched-gemm
form below.

For x with M <= 16 rows, MKL's sgemv/sgemm path behind ``F.linear`` streams the weight
at ~12 GB/s on this class of machine and does not use a second thread; the same product
as a batched matmul over row blocks of the weight, ``W (c, N/c, K) @ x^T (c, K, M)``,
goes through MKL's batched gemm, which runs the blocks in parallel and reaches ~45 GB/s
(benchmarks/: bench_generate.py). Same signature and result as ``reference.linear``.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess

import torch

logger = logging.getLogger(__name__)

SMALL_M = 16          # with >= 2 threads the blocks run in parallel: pays up to 16 rows
SMALL_M_1_THREAD = 4  # on one thread only the better gemv kernel pays, and only for few rows


def _blocks(n: int) -> int:
    for c in (4, 2):
        if n % c == 0:
            return c
    return 1


def use_small_m(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear_small_m`` applies (and pays) for this call."""
    limit = SMALL_M if torch.get_num_threads() > 1 else SMALL_M_1_THREAD
    return (not x.is_cuda and x.numel() <= limit * x.shape[-1] and weight.dim() == 2
            and weight.is_contiguous() and _blocks(weight.shape[0]) > 1)


def linear_small_m(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias. x: (..., K) with few rows; weight: (N, K) contiguous."""
    n, k = weight.shape
    c = _blocks(n)
    # Row-major x matters: MKL's batched gemm is ~2.5x slower when x^T arrives contiguous.
    rows = x.reshape(-1, k).contiguous()                               # (M, K)
    w = weight.view(c, n // c, k)                                      # (c, N/c, K)
    y = torch.bmm(w, rows.t().unsqueeze(0).expand(c, k, rows.shape[0]))  # (c, N/c, M)
    y = y.view(n, -1).t().contiguous()                                 # (M, N)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], n)


# ---------------------------------------------------------------------------------------
# Packed fp32 matmul (csrc/cpu/gemm_f32.c): weights stored as 32-column panels of W^T.

PANEL = 32
_lib: dict = {}


_SOURCES = ("gemm_f32.c", "decode_f32.c", "paged_attention_f32.c")
_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
_SIGNATURES = {
    "parallax_gemm_packed_f32": [_P] * 3 + [_I] * 4,
    "parallax_add_rms_norm_f32": [_P] * 5 + [_I, _I, _F],
    "parallax_silu_and_mul_f32": [_P, _P, _I, _I],
    "parallax_decode_attention_kv_f32": [_P, _L, _P, _L, _P, _L] + [_P] * 4 + [_L, _L, _P, _P]
                                        + [_I] * 4 + [_F, _I],
    "parallax_paged_attention_kv_f32": [_P, _L, _P, _L, _P, _L] + [_P] * 6 + [_I, _P, _P, _P]
                                       + [_I] * 7 + [_F, _I],
}
_RESTYPES = {"parallax_paged_attention_kv_f32": ctypes.c_int}


def _compile() -> ctypes.CDLL:
    """Build csrc/cpu/*.c into one library for this CPU (gcc -O3 -march=native), cached by
    source and CPU flags; link torch's own libgomp so the kernels share torch's thread pool."""
    folder = os.path.join(os.path.dirname(__file__), "..", "csrc", "cpu")
    srcs = [os.path.join(folder, name) for name in _SOURCES]
    gomp = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None or not all(map(os.path.exists, srcs)):
        raise RuntimeError("no C compiler (gcc) found")
    digest = hashlib.sha256(_cpu_flags().encode() + cc.encode())
    for src in srcs:
        with open(src, "rb") as f:
            digest.update(f.read())
    cache = os.environ.get("PARALLAX_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "parallax")
    out = os.path.join(cache, f"cpu_kernels-{digest.hexdigest()[:16]}.so")
    if not os.path.exists(out):
        os.makedirs(cache, exist_ok=True)
        tmp = f"{out}.{os.getpid()}.tmp"
        cmd = [cc, "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", *srcs,
               gomp if os.path.exists(gomp) else "-lgomp", "-lm", "-o", tmp]
        try:   # with glibc's vector math library (vector expf), else without
            subprocess.run(cmd[:1] + ["-DPARALLAX_MVEC"] + cmd[1:] + ["-lmvec"], check=True,
                           capture_output=True, timeout=120)
        except subprocess.CalledProcessError:
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        os.replace(tmp, out)   # atomic: concurrent ranks may build at once
    lib = ctypes.CDLL(out)
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, _RESTYPES.get(name)
    return lib


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def kernels() -> ctypes.CDLL | None:
    """The compiled kernels, or None (logged once) where they cannot be built."""
    if "lib" not in _lib:
        if os.environ.get("PARALLAX_KERNELS", "auto").strip().lower() == "reference":
            _lib["lib"] = None
        else:
            try:
                _lib["lib"] = _compile()
            except Exception as e:   # no compiler, sandboxed /tmp, ...: fall back, loudly
                logger.warning("CPU kernels unavailable (%s); using torch", e)
                _lib["lib"] = None
    return _lib["lib"]


def can_pack(weight: torch.Tensor) -> bool:
    """fp32 CPU weights whose row count is a whole number of panels."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and weight.shape[0] % PANEL == 0 and kernels() is not None)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) -> (N/32, K, 32) panels of W^T, contiguous."""
    n, k = weight.shape
    return weight.t().reshape(k, n // PANEL, PANEL).permute(1, 0, 2).contiguous()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """(N/32, K, 32) panels -> the (N, K) weight (a copy)."""
    p, k, _ = packed.shape
    return packed.permute(1, 0, 2).reshape(k, p * PANEL).t().contiguous()


def linear_packed(x: torch.Tensor, packed: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W given as panels (see pack). x: (..., K) float32."""
    p, k, _ = packed.shape
    n = p * PANEL
    rows = x.reshape(-1, k).contiguous()
    y = torch.empty(rows.shape[0], n, dtype=torch.float32)
    kernels().parallax_gemm_packed_f32(rows.data_ptr(), packed.data_ptr(), y.data_ptr(),
                                       rows.shape[0], n, k, torch.get_num_threads())
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], n)


def embedding_packed(ids: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of W (an embedding tied to a packed LM head). ids: (...) -> (..., K)."""
    return packed[ids // PANEL, :, ids % PANEL]


# ---------------------------------------------------------------------------------------
# The small ops of a decode step (csrc/cpu/decode_f32.c). Callers check ``fits``.

def fits(*tensors: torch.Tensor) -> bool:
    """All fp32 CPU tensors and the kernels built: the C ops below apply."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors) \
        and kernels() is not None


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rms_norm(x + residual) * weight, x + residual); residual None: (rms_norm(x), None).
    x, residual: (..., D) contiguous; weight: (D,)."""
    d = x.shape[-1]
    out = torch.empty_like(x)
    res = None if residual is None else torch.empty_like(x)
    kernels().parallax_add_rms_norm_f32(
        x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(),
        out.data_ptr(), None if res is None else res.data_ptr(), x.numel() // d, d, eps)
    return out, res


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x (..., 2N) contiguous -> silu(x[..., :N]) * x[..., N:], (..., N)."""
    n = x.shape[-1] // 2
    out = x.new_empty(*x.shape[:-1], n)
    kernels().parallax_silu_and_mul_f32(x.data_ptr(), out.data_ptr(), x.numel() // (2 * n), n)
    return out


def decode_attention_with_kvcache(q, k, v, k_cache, v_cache, cos, sin, context_lens, scale):
    """reference.decode_attention_with_kvcache in one call. Requires unit stride along D,
    heads D apart in q/k/v, cache slots D apart, cos/sin contiguous (B, D/2), int32 lens."""
    b, hq, d = q.shape
    out = q.new_empty(b, hq, d)
    kernels().parallax_decode_attention_kv_f32(
        q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
        cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        k_cache.stride(0), k_cache.stride(1), context_lens.data_ptr(), out.data_ptr(),
        b, hq, k.shape[1], d, scale, torch.get_num_threads())
    return out


def attention_layout_ok(q, k, v, k_cache, v_cache, cos, sin, context_lens) -> bool:
    """Whether decode_attention_with_kvcache's C kernel can read these tensors as they are."""
    d = q.shape[-1]
    rows = all(t.stride(-1) == 1 and t.stride(-2) == d for t in (q, k, v, k_cache, v_cache))
    return (rows and d % 16 == 0 and d <= 256 and q.shape[1] // k.shape[1] <= 16
            and k_cache.stride() == v_cache.stride() and cos.is_contiguous()
            and sin.is_contiguous() and context_lens.dtype == torch.int32
            and context_lens.is_contiguous())


_PAGED_ERRORS = {-1: "a slot in slot_mapping is negative or beyond the cache's capacity",
                 -2: "a context length is shorter than its new tokens or needs more blocks "
                     "than the block table has",
                 -3: "a block id in a block table is negative or beyond the cache",
                 -4: "query_start_loc does not cover the tokens (or a sequence has none)",
                 -5: "unsupported shape (head dim a multiple of 16 up to 256, <= 16 query "
                     "heads per KV head, block size dividing 128)"}


def paged_attention_with_kvcache(q, k, v, k_cache, v_cache, cos, sin, slot_mapping,
                                 block_tables, context_lens, query_start_loc, scale):
    """reference.paged_attention_with_kvcache in one C call (csrc/cpu/paged_attention_f32.c).
    Needs ``paged_layout_ok``; raises ParallaxError on out-of-range metadata, writing nothing."""
    from ..errors import ParallaxError
    t, hq, d = q.shape
    n, hk, bs, _ = k_cache.shape
    out = q.new_empty(t, hq, d)
    err = kernels().parallax_paged_attention_kv_f32(
        q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
        cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        slot_mapping.data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
        context_lens.data_ptr(), query_start_loc.data_ptr(), out.data_ptr(),
        t, context_lens.shape[0], hq, hk, d, n, bs, scale, torch.get_num_threads())
    if err:
        raise ParallaxError(f"paged attention: {_PAGED_ERRORS.get(err, err)}")
    return out


def paged_layout_ok(q, k, v, k_cache, v_cache, cos, sin, slot_mapping, block_tables,
                    context_lens, query_start_loc) -> bool:
    """Whether the paged C kernel can read these tensors as they are."""
    d, bs = q.shape[-1], k_cache.shape[2]
    rows = all(t.stride(-1) == 1 and t.stride(-2) == d for t in (q, k, v))
    shape = (d % 16 == 0 and d <= 256 and q.shape[1] % k.shape[1] == 0
             and q.shape[1] // k.shape[1] <= 16 and 128 % bs == 0)
    return (rows and shape and k_cache.is_contiguous() and v_cache.is_contiguous()
            and k_cache.shape == v_cache.shape and cos.is_contiguous() and sin.is_contiguous()
            and slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous()
            and all(x.dtype == torch.int32 and x.is_contiguous()
                    for x in (block_tables, context_lens, query_start_loc)))

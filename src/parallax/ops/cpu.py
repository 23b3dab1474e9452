"""CPU fast paths for the decode-time matmul (few rows, large weight).

Packed fp32 weights (the default for fp32 models on the CPU whose shard rows are a
multiple of 64) go through a small C kernel, csrc/cpu/gemm_f32.c, built just in time:
~2x MKL's speed at 4-16 rows and equal at one. Other weights take the batched-gemm
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
# Packed fp32 matmul (csrc/cpu/gemm_f32.c): weights stored as 64-column panels of W^T.

PANEL = 64
_lib: dict = {}


def _compile() -> ctypes.CDLL | None:
    """Build csrc/cpu/gemm_f32.c for this CPU (gcc -O3 -march=native), cached by source and
    CPU flags; link torch's own libgomp so the kernel shares torch's thread pool."""
    src = os.path.join(os.path.dirname(__file__), "..", "csrc", "cpu", "gemm_f32.c")
    gomp = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None or not os.path.exists(src):
        raise RuntimeError("no C compiler (gcc) found")
    with open(src, "rb") as f:
        key = hashlib.sha256(f.read() + _cpu_flags().encode() + cc.encode()).hexdigest()[:16]
    cache = os.environ.get("PARALLAX_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "parallax")
    out = os.path.join(cache, f"gemm_f32-{key}.so")
    if not os.path.exists(out):
        os.makedirs(cache, exist_ok=True)
        tmp = f"{out}.{os.getpid()}.tmp"
        link = [gomp] if os.path.exists(gomp) else ["-lgomp"]
        subprocess.run([cc, "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", src, *link,
                        "-o", tmp], check=True, capture_output=True, timeout=120)
        os.replace(tmp, out)   # atomic: concurrent ranks may build at once
    lib = ctypes.CDLL(out)
    lib.parallax_gemm_packed_f32.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 4
    lib.parallax_gemm_packed_f32.restype = None
    return lib


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def packed_kernel() -> ctypes.CDLL | None:
    """The compiled kernel, or None (logged once) where it cannot be built."""
    if "lib" not in _lib:
        if os.environ.get("PARALLAX_KERNELS", "auto").strip().lower() == "reference":
            _lib["lib"] = None
        else:
            try:
                _lib["lib"] = _compile()
            except Exception as e:   # no compiler, sandboxed /tmp, ...: fall back, loudly
                logger.warning("CPU matmul kernel unavailable (%s); using torch", e)
                _lib["lib"] = None
    return _lib["lib"]


def can_pack(weight: torch.Tensor) -> bool:
    """fp32 CPU weights whose row count is a whole number of panels."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and weight.shape[0] % PANEL == 0 and packed_kernel() is not None)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) -> (N/64, K, 64) panels of W^T, contiguous."""
    n, k = weight.shape
    return weight.t().reshape(k, n // PANEL, PANEL).permute(1, 0, 2).contiguous()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """(N/64, K, 64) panels -> the (N, K) weight (a copy)."""
    p, k, _ = packed.shape
    return packed.permute(1, 0, 2).reshape(k, p * PANEL).t().contiguous()


def linear_packed(x: torch.Tensor, packed: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias with W given as panels (see pack). x: (..., K) float32."""
    p, k, _ = packed.shape
    n = p * PANEL
    rows = x.reshape(-1, k).contiguous()
    y = torch.empty(rows.shape[0], n, dtype=torch.float32)
    packed_kernel().parallax_gemm_packed_f32(rows.data_ptr(), packed.data_ptr(), y.data_ptr(),
                                             rows.shape[0], n, k, torch.get_num_threads())
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], n)


def embedding_packed(ids: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of W (an embedding tied to a packed LM head). ids: (...) -> (..., K)."""
    return packed[ids // PANEL, :, ids % PANEL]

"""The CUDA extension: loading it, and thin typed wrappers over ``torch.ops.parallax.*``.

The ops are registered by ``csrc/binding.cpp`` (``TORCH_LIBRARY(parallax, ...)``). They write
into outputs the caller allocates; the wrappers here allocate them and give each op the same
signature as its twin in ``ops/reference.py``. Fake (meta) implementations are registered on
load so the ops trace under ``torch.compile``.

Loading order: the prebuilt ``parallax._C`` (setup.py builds it where CUDA torch and nvcc
exist), else a JIT build with ``torch.utils.cpp_extension.load`` (ninja; cached in torch's
extensions folder, so only the first load compiles). Nothing here runs at import time.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import threading

import torch

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")

# Head dims the paged attention kernel is instantiated for (csrc/paged_attention.cu).
PAGED_HEAD_DIMS = (64, 96, 128, 256)
PAGED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Largest batch (rows of x) the int8 GEMV kernel takes; beyond it a dequantize + dense matmul
# is at least as fast (the kernel turns compute-bound). Tune after a GPU run.
INT8_GEMV_MAX_M = 16

_lock = threading.Lock()
_state: dict[str, object] = {"loaded": False, "error": None}


def _gencode_flags() -> list[str]:
    """Build for the GPUs present (sm_80+; Hopper as sm_90a)."""
    flags = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        arch = f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")
        flag = f"-gencode=arch=compute_{arch},code=sm_{arch}"
        if flag not in flags:
            flags.append(flag)
    return flags or ["-gencode=arch=compute_80,code=sm_80"]


def _load_prebuilt() -> bool:
    spec = importlib.util.find_spec("parallax._C")
    if spec is None or spec.origin is None:
        return False
    torch.ops.load_library(spec.origin)
    return True


def _load_jit() -> None:
    from torch.utils.cpp_extension import load

    sources = sorted(glob.glob(os.path.join(CSRC, "*.cu"))) + [os.path.join(CSRC, "binding.cpp")]
    load(name="parallax_kernels", sources=sources, is_python_module=False,
         extra_cflags=["-O3"],
         extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo", *_gencode_flags()],
         extra_include_paths=[CSRC], verbose=os.environ.get("PARALLAX_VERBOSE_BUILD") == "1")


def load_extension() -> bool:
    """Load the ops once (prebuilt, else JIT). Returns False (see ``load_error()``) on failure."""
    if _state["loaded"] or _state["error"] is not None:
        return bool(_state["loaded"])
    with _lock:
        if _state["loaded"] or _state["error"] is not None:
            return bool(_state["loaded"])
        try:
            if not torch.cuda.is_available() or torch.version.cuda is None:
                raise RuntimeError("torch sees no CUDA GPU (torch.version.cuda="
                                   f"{torch.version.cuda!r})")
            if not hasattr(torch.ops.parallax, "decode_attention"):
                if not _load_prebuilt():
                    _load_jit()
            _register_fakes()
            _state["loaded"] = True
        except Exception as e:  # noqa: BLE001 - the reason is reported by load_error()
            _state["error"] = f"{type(e).__name__}: {e}"
    return bool(_state["loaded"])


def load_error() -> str | None:
    """Why the extension did not load, or None."""
    return _state["error"]  # type: ignore[return-value]


def _register_fakes() -> None:
    """Meta implementations: every op only writes caller-allocated outputs, so nothing to do."""
    def none(*args, **kwargs) -> None:
        return None

    for name in ("rms_norm", "add_rms_norm", "rotary_embedding", "decode_attention",
                 "int8_linear", "paged_attention_with_kvcache"):
        try:
            torch.library.register_fake(f"parallax::{name}")(none)
        except RuntimeError as e:  # already registered (a second load in one process)
            if "already" not in str(e):
                raise


# ----------------------------------------------------------------------------- wrappers
# Each mirrors ops/reference.py. They assume load_extension() succeeded and that the inputs
# are supported (parallax.ops checks that before calling).

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim. x: (..., d) fp16/bf16; weight: (d,) same dtype."""
    x = x.contiguous()
    out = torch.empty_like(x)
    torch.ops.parallax.rms_norm(out, x, weight.contiguous(), float(eps))
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual = x + residual; out = rms_norm(residual)``. Returns new (out, residual)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    res_out = torch.empty_like(x)
    torch.ops.parallax.add_rms_norm(out, res_out, x, residual.contiguous(), weight.contiguous(),
                                    float(eps))
    return out, res_out


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q (B, T, Hq, D) and k (B, T, Hk, D) IN PLACE and returns them.

    cos, sin: (B, T, D/2) float32. q and k may be strided views (head dim contiguous).
    """
    torch.ops.parallax.rotary_embedding(q, k, cos.contiguous(), sin.contiguous())
    return q, k


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Flash-decoding. q: (B, Hq, D); caches (B, Hk, S, D); context_lens (B,) -> (B, Hq, D)."""
    q = q.contiguous()
    out = torch.empty_like(q)
    if context_lens.dtype != torch.int32:
        context_lens = context_lens.to(torch.int32)
    torch.ops.parallax.decode_attention(out, q, k_cache, v_cache, context_lens.contiguous(),
                                        float(scale))
    return out


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only int8 GEMV/GEMM for x: (..., K) with at most INT8_GEMV_MAX_M rows."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if x2.storage_offset() % 8:  # the kernel reads x in 16-byte vectors
        x2 = x2.clone()
    out = torch.empty(x2.shape[0], qweight.shape[0], dtype=x.dtype, device=x.device)
    torch.ops.parallax.int8_linear(out, x2, qweight, scales.to(x.dtype), bias)
    return out.view(*lead, qweight.shape[0])


def paged_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor) -> bool:
    """Whether the paged kernel takes these tensors (else the reference runs): one dtype of
    PAGED_DTYPES, a head dim of PAGED_HEAD_DIMS, contiguous 16-byte aligned caches, head
    dims contiguous."""
    return (q.dtype in PAGED_DTYPES and q.dim() == 3 and q.shape[-1] in PAGED_HEAD_DIMS
            and all(t.dtype == q.dtype for t in (k, v, k_cache, v_cache))
            and all(t.stride(-1) == 1 for t in (q, k, v))
            and k_cache.is_contiguous() and v_cache.is_contiguous()
            and k_cache.data_ptr() % 16 == 0 and v_cache.data_ptr() % 16 == 0)


def paged_attention_with_kvcache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 cos: torch.Tensor, sin: torch.Tensor,
                                 slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                                 context_lens: torch.Tensor, query_start_loc: torch.Tensor,
                                 scale: float, window: int | None = None,
                                 softcap: float | None = None) -> torch.Tensor:
    """reference.paged_attention_with_kvcache on the GPU: q (T, Hq, D), k, v (T, Hk, D) not
    yet rotated (head dim contiguous, any other strides); caches (N, Hk, bs, D) contiguous,
    written in place; cos, sin (T, D/2) float32; slot_mapping (T,); block_tables (B, W);
    context_lens (B,); query_start_loc (B+1,). Returns (T, Hq, D).

    Metadata is checked on the device, not here: a sequence with a bad length, slot or block
    id gets NaN outputs and its tokens are not written (parallax.ops checks on the host first).
    """
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    torch.ops.parallax.paged_attention_with_kvcache(
        out, q, k, v, k_cache, v_cache, cos.float().contiguous(), sin.float().contiguous(),
        slot_mapping.long().contiguous(), block_tables.int().contiguous(),
        context_lens.int().contiguous(), query_start_loc.int().contiguous(), float(scale),
        int(window or 0), float(softcap or 0.0))
    return out

"""Runs the CUDA paged-attention kernel's own source on the CPU, for machines without a GPU.

``cuda_runtime.h`` here stands in for CUDA's: each thread block runs as blockDim.x
std::threads with real barriers (``__syncthreads``, ``__syncwarp``), shuffles go through a
per-warp buffer, launches run block after block. ``build()`` rewrites the .cu's launch syntax
and its dynamic shared array, compiles it with the host C++ compiler against the CUDA
toolkit's fp16/bf16 headers, and loads it. It checks the kernel's logic (indexing, masks,
splits, online softmax, metadata checks, barriers a missing one would race on); it says
nothing about speed, occupancy or the GPU memory model. (-fno-strict-aliasing: the kernels
reinterpret 16-byte vectors as half2 pairs, as CUDA code does; g++ at -O2 would not allow it.)
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "..", "..", "src", "parallax", "csrc")
CXX = shutil.which("g++") or shutil.which("c++")
CUDA_INCLUDE = next((p for p in ("/usr/local/cuda/include",
                                 os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"),
                                              "include"))
                     if os.path.exists(os.path.join(p, "cuda_bf16.h"))), None)
DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}

STUBS = r"""
#include <cuda_runtime_api.h>
extern "C" int parallax_num_sms(int) { return 132; }
extern "C" cudaError_t cudaGetLastError() { return cudaSuccess; }
"""


class PagedParams(ctypes.Structure):
    """ctypes twin of ParallaxPagedAttention (csrc/ops.h), field for field."""
    _fields_ = ([(n, ctypes.c_void_p) for n in (
        "out", "q", "k", "v", "k_cache", "v_cache", "cos", "sin", "slot_mapping",
        "block_tables", "context_lens", "query_start_loc", "status", "part_out", "part_lse")]
        + [(n, ctypes.c_int64) for n in (
            "num_tokens", "num_seqs", "num_heads", "num_kv_heads", "head_dim", "num_blocks",
            "block_size", "max_blocks", "q_st", "q_sh", "k_st", "k_sh", "v_st", "v_sh")]
        + [("scale", ctypes.c_float), ("window", ctypes.c_int32), ("softcap", ctypes.c_float),
           ("num_splits", ctypes.c_int32), ("dtype", ctypes.c_int32)])


def _emulable(src: str) -> str:
    src = re.sub(r"([\w:]+(?:<[^<>]*>)?)\s*<<<(.*?)>>>\((.*?)\);",
                 lambda m: f"emu::launch({m.group(1)}, {m.group(2)}, {m.group(3)});", src,
                 flags=re.S)
    src = re.sub(r"extern __shared__ (\w+) (\w+)\[\];",
                 lambda m: f"{m.group(1)}* {m.group(2)} = "
                           f"reinterpret_cast<{m.group(1)}*>(emu::blk->smem.data());", src)
    # Static shared arrays become function statics: one per kernel instantiation, shared by
    # the block's threads, reused by the next block (blocks run one after another).
    return re.sub(r"\b__shared__ ", "static ", src)


def build(folder: str, names: tuple[str, ...] = ("paged_attention.cu",)) -> ctypes.CDLL:
    """Compile csrc/``names`` for the emulation into one library in ``folder`` and load it."""
    sources = []
    for name in names:
        with open(os.path.join(CSRC, name)) as f:
            src = _emulable(f.read())
        sources.append(os.path.join(folder, name.replace(".cu", ".cpp")))
        with open(sources[-1], "w") as f:
            f.write(src)
    stubs = os.path.join(folder, "stubs.cpp")
    with open(stubs, "w") as f:
        f.write(STUBS)
    lib = os.path.join(folder, "libkernels.so")
    cmd = [CXX, "-std=c++20", "-O2", "-fno-strict-aliasing", "-fPIC", "-shared", "-w",
           "-pthread", f"-I{HERE}", f"-I{CUDA_INCLUDE}", f"-I{CSRC}", *sources, stubs, "-o", lib]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-4000:])
    dll = ctypes.CDLL(lib)
    if "paged_attention.cu" in names:
        dll.parallax_paged_attention.argtypes = [ctypes.POINTER(PagedParams), ctypes.c_void_p]
    return dll


def paged_attention(lib: ctypes.CDLL, q, k, v, k_cache, v_cache, cos, sin, slot_mapping,
                    block_tables, context_lens, query_start_loc, scale, window=None,
                    softcap=None, num_splits=1) -> tuple[torch.Tensor, torch.Tensor]:
    """The launcher on CPU tensors, as binding.cpp calls it. Returns (out, status)."""
    t, hq, d = q.shape
    b = context_lens.shape[0]
    out = torch.full_like(q, 12345.0)                     # unwritten elements stand out
    status = torch.full((b + 1,), -7, dtype=torch.int32)
    part_out = torch.full((t, hq, num_splits, d), 12345.0)
    part_lse = torch.full((t, hq, num_splits), 12345.0)
    keep = [cos.float().contiguous(), sin.float().contiguous(), slot_mapping.long().contiguous(),
            block_tables.int().contiguous(), context_lens.int().contiguous(),
            query_start_loc.int().contiguous()]
    p = PagedParams(*[x.data_ptr() for x in (out, q, k, v, k_cache, v_cache, *keep, status,
                                             part_out, part_lse)],
                    t, b, hq, k_cache.shape[1], d, k_cache.shape[0], k_cache.shape[2],
                    keep[3].shape[1], q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                    v.stride(0), v.stride(1), scale, window or 0, softcap or 0.0, num_splits,
                    DTYPE_CODE[q.dtype])
    err = lib.parallax_paged_attention(ctypes.byref(p), None)
    if err:
        raise RuntimeError(f"launcher returned {err}")
    return out, status


def decode_attention(lib: ctypes.CDLL, q, k_cache, v_cache, context_lens, scale,
                     num_splits=1) -> torch.Tensor:
    """csrc/decode_attention.cu's launcher on CPU tensors (caches (B, Hk, S, D), any batch
    and head strides), as binding.cpp calls it."""
    b, hq, d = q.shape
    hk, s = k_cache.shape[1], k_cache.shape[2]
    out = torch.full_like(q, 12345.0)
    part_out = torch.full((b, hq, num_splits, d), 12345.0)
    part_lse = torch.full((b, hq, num_splits), 12345.0)
    lens = context_lens.int().contiguous()
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn = lib.parallax_decode_attention
    fn.argtypes = [ptr] * 7 + [i64] * 9 + [ctypes.c_float, ctypes.c_int, ctypes.c_int, ptr]
    err = fn(out.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
             lens.data_ptr(), part_out.data_ptr(), part_lse.data_ptr(), b, hq, hk, s, d,
             k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), scale,
             num_splits, DTYPE_CODE[q.dtype], None)
    if err:
        raise RuntimeError(f"launcher returned {err}")
    return out


def add_rms_norm(lib: ctypes.CDLL, x, residual, weight, eps) -> tuple:
    """csrc/norm.cu: (out, residual_out); residual None gives plain rms_norm (and None)."""
    x = x.contiguous()
    out, res_out = torch.full_like(x, 12345.0), torch.full_like(x, 12345.0)
    d = x.shape[-1]
    fn = lib.parallax_add_rms_norm
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int,
                                                                  ctypes.c_void_p]
    err = fn(out.data_ptr(), None if residual is None else res_out.data_ptr(), x.data_ptr(),
             None if residual is None else residual.contiguous().data_ptr(), weight.data_ptr(),
             x.numel() // d, d, eps, DTYPE_CODE[x.dtype], None)
    if err:
        raise RuntimeError(f"launcher returned {err}")
    return out, (None if residual is None else res_out)


def rotary_embedding(lib: ctypes.CDLL, q, k, cos, sin) -> None:
    """csrc/rotary.cu: rotates q (B, T, Hq, D) and k (B, T, Hk, D) in place."""
    b, t, hq, d = q.shape
    fn = lib.parallax_rotary_embedding
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 11 + [ctypes.c_int, ctypes.c_void_p]
    err = fn(q.data_ptr(), k.data_ptr(), cos.data_ptr(), sin.data_ptr(), b, t, hq, k.shape[2], d,
             q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
             DTYPE_CODE[q.dtype], None)
    if err:
        raise RuntimeError(f"launcher returned {err}")


def int8_linear(lib: ctypes.CDLL, x, qweight, scales, bias=None) -> torch.Tensor:
    """csrc/int8_linear.cu: x (M, K) @ (qweight (N, K) * scales[:, None]).T + bias."""
    m, k = x.shape
    n = qweight.shape[0]
    out = torch.full((m, n), 12345.0, dtype=x.dtype)
    fn = lib.parallax_int8_linear
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int, ctypes.c_void_p]
    err = fn(out.data_ptr(), x.data_ptr(), qweight.data_ptr(), scales.data_ptr(),
             None if bias is None else bias.data_ptr(), m, n, k, DTYPE_CODE[x.dtype], None)
    if err:
        raise RuntimeError(f"launcher returned {err}")
    return out

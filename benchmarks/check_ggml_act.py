"""Checks parallax's 8-bit activation path against llama.cpp's own CPU library, called through
ctypes: activation blocks bit for bit (ggml's quantize_row_q8_0 / quantize_row_q8_1 /
quantize_row_q8_K, its block_q8_0 / _q8_1 / _q8_K bytes) and each block-weight dot
(ggml_vec_dot_<type>_<vec_dot_type>) against parallax's kernel for the same row, per weight
type and CPU variant. Not a test: it needs llama-cpp-python's libggml (the tests hold the
same arithmetic to numpy / float64 models of ggml instead).

    PYTHONPATH=src python benchmarks/check_ggml_act.py \\
        --lib /path/to/site-packages/llama_cpp/lib [--types q8_0,q4_0,q4_1,q4_k,q6_k]

Prints, per type: the activation bytes equal or not (and how many blocks differ), and per
variant the largest |parallax - ggml| over the outputs relative to sum |x_i w_i| (fp32
summation order only: ~1e-7).
"""
from __future__ import annotations

import argparse
import ctypes
import os

import numpy as np
import torch

from parallax.ops import cpu
from parallax.ops import reference as ref

# weight type -> (activation kind, elements per weight block, ggml's activation block bytes)
TYPES = {"q8_0": ("q8_0", 32, 34), "q4_0": ("q8_0", 32, 34), "q4_1": ("q8_1", 32, 36),
         "q4_k": ("q8_k", 256, 292), "q6_k": ("q8_k", 256, 292)}
GGML_QUANTIZE = {"q8_0": "quantize_row_q8_0", "q8_1": "quantize_row_q8_1",
                 "q8_k": "quantize_row_q8_K"}


def load(libdir: str):
    base = ctypes.CDLL(os.path.join(libdir, "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(os.path.join(libdir, "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    lib.ggml_cpu_init()
    return base, lib


def ggml_blocks(lib, act: str, x: np.ndarray) -> np.ndarray:
    """One row x (K,) float32 -> ggml's activation blocks of ``act``, as bytes."""
    nbytes = {"q8_0": 34, "q8_1": 36, "q8_k": 292}[act]
    block = 256 if act == "q8_k" else 32
    out = np.zeros(x.size // block * nbytes, np.uint8)
    fn = getattr(lib, GGML_QUANTIZE[act])
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn(x.ctypes.data, out.ctypes.data, x.size)
    return out


def parallax_blocks(act: str, x: np.ndarray, isa: str) -> np.ndarray:
    """parallax's activation blocks of one row, laid out as ggml's structs."""
    q, d, s = (t.numpy() for t in cpu.quantize_act(act, torch.from_numpy(x[None]), isa=isa))
    if act == "q8_k":
        nb = x.size // 256
        parts = [d.reshape(nb, 1).astype(np.float32).view(np.uint8),
                 q.reshape(nb, 256).view(np.uint8),
                 s.reshape(nb, 16).astype(np.int16).view(np.uint8)]
    else:
        nb = x.size // 32
        parts = [d.reshape(nb, 1).astype(np.float16).view(np.uint8)]
        if act == "q8_1":
            parts.append(s.reshape(nb, 1).astype(np.float16).view(np.uint8))
        parts.append(q.reshape(nb, 32).view(np.uint8))
    return np.concatenate(parts, axis=1).reshape(-1)


def ggml_dot(lib, kind: str, wrow: np.ndarray, yblocks: np.ndarray, k: int) -> float:
    act = TYPES[kind][0]
    name = f"ggml_vec_dot_{kind[:2]}{kind[2:].upper() if kind.endswith('k') else kind[2:]}_" \
           f"{'q8_K' if act == 'q8_k' else act}"
    fn = getattr(lib, name)
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                   ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    out = np.zeros(1, np.float32)
    fn(k, out.ctypes.data, 0, wrow.ctypes.data, 0, yblocks.ctypes.data, 0, 1)
    return float(out[0])


def random_weights(kind: str, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    if kind in ("q4_k", "q6_k"):   # gguf-py cannot quantise to K-quants: random super-blocks
        nbytes = {"q4_k": 144, "q6_k": 210}[kind]
        b = torch.randint(0, 256, (n, k // 256, nbytes), generator=g, dtype=torch.uint8)
        halves = (torch.rand(n, k // 256, 2, generator=g) * 0.02 + 0.001).half()
        halves = halves.view(torch.uint8).reshape(n, k // 256, 4)
        if kind == "q4_k":
            b[..., 0:4] = halves
        else:
            b[..., 208:210] = halves[..., :2]
        return b.reshape(n, -1).contiguous()
    import gguf
    w = (torch.randn(n, k, generator=g) * 0.02).numpy()
    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(w, qtype)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True, help="folder of libggml-base.so / libggml-cpu.so")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--rows", type=int, default=64, help="rows of x per type")
    a = ap.parse_args()
    _, lib = load(a.lib)
    g = torch.Generator().manual_seed(0)
    variants = [v for v in cpu.supported_variants() if cpu.kernels(v) is not None]
    for kind in a.types.split(","):
        act = TYPES[kind][0]
        k, n = 1536, 48
        x = (torch.randn(a.rows, k, generator=g) * torch.rand(1, k, generator=g) * 4).numpy()
        x[0, :256] = 0.0
        x[1, :6] = [127.0, 0.5, 1.5, 2.5, -0.5, -2.5]
        x[1, 6:256] = 0.0
        x[2, 7] = -float(np.abs(x[2, :256]).max()) * 1.5    # a negative max (Q8_K's sign)
        x[2, 9] = -x[2, 7]                                   # and an equal |x| after it
        qw = random_weights(kind, n, k, g)
        for isa in variants:
            diff = 0
            for r in range(a.rows):
                want = ggml_blocks(lib, act, np.ascontiguousarray(x[r]))
                got = parallax_blocks(act, np.ascontiguousarray(x[r]), isa)
                bb = TYPES[kind][2]
                diff += int((want.reshape(-1, bb) != got.reshape(-1, bb)).any(1).sum())
            y = cpu.block_linear_q8(kind, torch.from_numpy(x), qw, isa=isa).numpy()
            w = ref.__dict__[f"{kind}_dequantize"](qw).double().numpy()
            worst = 0.0
            for r in range(a.rows):
                yb = ggml_blocks(lib, act, np.ascontiguousarray(x[r]))
                for c in range(n):
                    want = ggml_dot(lib, kind, qw[c].numpy(), yb, k)
                    scale = float(np.abs(x[r]).astype(np.float64) @ np.abs(w[c])) + 1e-30
                    worst = max(worst, abs(float(y[r, c]) - want) / scale)
            print(f"{kind} {isa:<10} activation blocks ({act}) differing: {diff} of "
                  f"{a.rows * k // TYPES[kind][1]}; dot vs ggml: max rel {worst:.2e}",
                  flush=True)


if __name__ == "__main__":
    main()

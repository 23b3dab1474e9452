"""Pure-torch twins of csrc/cpu/ggml_pointwise.c: llama.cpp's CPU arithmetic for RMS_NORM+MUL,
ROPE and SWIGLU, bit for bit equal to the kernels' generic build (ggml's x86-64 SSE2 build:
no fused multiply-adds) and within 1e-6 relative of the AVX2 / AVX-512 builds, which fuse
some products (ROPE's full vectors of pairs; SWIGLU's exp polynomial) as ggml's do.

Every float32 op here is a single correctly rounded torch op (a product, then a sum: never
fused); ggml's double sum is float64 in the same order; cosf/sinf/expf are the C library's
(through ctypes, one value a call: these are references for small tensors).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch


@functools.cache
def _libm() -> ctypes.CDLL:
    libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    for name in ("expf", "cosf", "sinf"):
        getattr(libm, name).restype = ctypes.c_float
        getattr(libm, name).argtypes = [ctypes.c_float]
    libm.powf.restype = ctypes.c_float
    libm.powf.argtypes = [ctypes.c_float, ctypes.c_float]
    return libm


def _libm_map(name: str, x: torch.Tensor) -> torch.Tensor:
    """The C library's float function ``name`` on every element of float32 ``x``."""
    fn = getattr(_libm(), name)
    return torch.tensor([fn(v) for v in x.reshape(-1).tolist()],
                        dtype=torch.float32).reshape(x.shape)


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def sqrt_f32(v: torch.Tensor) -> torch.Tensor:
    """sqrtf: the correctly rounded float32 square root of float32 v >= 0 (torch's own sqrt is
    not correctly rounded on every CPU: up to 1 ulp off with AVX-512). float64's sqrt rounded
    to float32 is then corrected exactly: c is right iff (c - ulp/2)^2 < v < (c + ulp/2)^2,
    squares of 25-bit values, exact in float64 (and never equal to a float32 v)."""
    c = torch.sqrt(v.double()).float()
    up = torch.nextafter(c, torch.full_like(c, float("inf")))
    down = torch.nextafter(c, torch.zeros_like(c))
    hi = (c.double() + up.double()) / 2                               # exact midpoints
    lo = (c.double() + down.double()) / 2
    vd = v.double()
    return torch.where(vd > hi * hi, up, torch.where((vd < lo * lo) & (c > 0), down, c))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """ggml's RMS_NORM then MUL by ``weight``. x: (..., K) float32; weight: (K,) float32;
    eps: rounded to float32 -> (..., K) float32.

    The squares are float32, summed in float64 in index order (cumsum: sequential);
    mean = float32(sum / K); scale = 1 / sqrt(mean + eps) in float32; y = (x * scale) * w."""
    k = x.shape[-1]
    total = (x * x).double().cumsum(-1)[..., -1:]                # (..., 1) float64, in order
    mean = (total / k).float()
    scale = _f32(1.0) / sqrt_f32(mean + _f32(eps))
    return (x * scale) * weight


def rope_angles(pos: torch.Tensor, d: int, freq_base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml_rope_cache_init's cos and sin. pos: (T,) integer -> two (T, D/2) float32: theta
    starts at float32(pos) and is multiplied by theta_scale = powf(freq_base, -2 / D) once per
    pair, in float32; cos and sin are the C library's cosf and sinf of it."""
    # powf(freq_base, -2.0f / n_dims): the exponent is a float32 quotient in ggml
    theta_scale = _f32(_libm().powf(freq_base, float(_f32(-2.0) / d)))
    theta = pos.to(torch.float32)
    thetas = []
    for _ in range(d // 2):
        thetas.append(theta)
        theta = theta * theta_scale
    angles = torch.stack(thetas, dim=-1)                          # (T, D/2)
    return _libm_map("cosf", angles), _libm_map("sinf", angles)


def rope(x: torch.Tensor, pos: torch.Tensor, freq_base: float, neox: bool) -> torch.Tensor:
    """ggml's ROPE in place (ext_factor 0, freq_scale 1, attn_factor 1, all D dims rotated).
    x: (T, H, D) float32; pos: (T,) integer positions. neox False: pairs (2i, 2i+1), llama.cpp's
    mode 0 on GGUF's permuted heads; True: pairs (i, i + D/2), HF's layout. Returns x.

    x0' = x0 cos - x1 sin, x1' = x1 cos + x0 sin, every product rounded (the generic build)."""
    t, h, d = x.shape
    cos, sin = rope_angles(pos, d, freq_base)                      # (T, D/2) each
    cos, sin = cos[:, None, :], sin[:, None, :]                    # (T, 1, D/2)
    if neox:
        x0, x1 = x[..., : d // 2], x[..., d // 2:]
    else:
        x0, x1 = x[..., 0::2], x[..., 1::2]
    y0 = x0 * cos - x1 * sin
    y1 = x1 * cos + x0 * sin
    x0.copy_(y0)
    x1.copy_(y1)
    return x


# ggml_v_expf's constants: 1.5 * 2^23 (round to integer), 1/ln 2, ln 2 in two parts, and the
# polynomial's coefficients c1 (b) .. c5 (b^5).
_SHIFT, _LOG2E, _LN2_HI, _LN2_LO = map(float.fromhex, (
    "0x1.8p23", "0x1.715476p+0", "0x1.62e4p-1", "0x1.7f7d1cp-20"))
_C1, _C2, _C3, _C4, _C5 = map(float.fromhex, (
    "0x1.ffffecp-1", "0x1.fffdb6p-2", "0x1.555e66p-3", "0x1.573e2ep-5", "0x1.0e4020p-7"))


def _bits(v: torch.Tensor) -> torch.Tensor:
    """float32 -> its bit pattern as int64 in [0, 2^32)."""
    return v.view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _float(b: torch.Tensor) -> torch.Tensor:
    """int64 bit patterns (taken mod 2^32) -> float32."""
    b = b & 0xFFFFFFFF
    return torch.where(b >= 2**31, b - 2**32, b).to(torch.int32).view(torch.float32)


def _exp_poly(v: torch.Tensor) -> torch.Tensor:
    """ggml_v_expf's SSE2 form (no FMA) on float32 v, lane by lane."""
    f = _f32
    z = v * f(_LOG2E) + f(_SHIFT)
    n = z - f(_SHIFT)
    b = (v - n * f(_LN2_HI)) - n * f(_LN2_LO)
    e = (_bits(z) << 23) & 0xFFFFFFFF
    k = _float(e + _bits(f(1.0)))
    an = n.abs()
    u = b * b
    j = ((f(_C5) * b + f(_C4)) * u + (f(_C3) * b + f(_C2))) * u + f(_C1) * b
    g = torch.where(n <= 0, 0x82000000, 0)
    s1 = _float(g + 0x7F000000)
    s2 = _float(e - g)
    return torch.where(an > 192, s1 * s1,
                       torch.where(an > 126, (s2 * j + s2) * s1, k * j + k))


def silu_f32(g: torch.Tensor) -> torch.Tensor:
    """ggml_silu_f32, every build's scalar tail: g / (1 + expf(-g)), float32 -> float32."""
    return g / (_f32(1.0) + _libm_map("expf", -g))


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """ggml_vec_swiglu_f32 as the generic (SSE2) build computes it. x: (..., 2N) float32,
    [gate | up] per row -> (..., N) float32 = silu(gate) * up, silu(g) = g / (1 + exp(-g)):
    the first N - N % 4 columns with ggml_v_expf's polynomial, the rest with expf."""
    n = x.shape[-1] // 2
    gate, up = x[..., :n], x[..., n:]
    m = n - n % 4
    head = gate[..., :m] / (_f32(1.0) + _exp_poly(_f32(0.0) - gate[..., :m]))
    return torch.cat([head, silu_f32(gate[..., m:])], dim=-1) * up

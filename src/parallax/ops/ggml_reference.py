"""Pure-torch twins of the PARALLAX_NUMERICS=ggml kernels (ops/ggml.py): llama.cpp's CPU
arithmetic, op by op, for tests on small inputs (Python loops; slow).

- ``rms_norm``, ``rope``, ``swiglu``: csrc/cpu/ggml_pointwise.c as its generic variant
  computes (ggml's x86-64 SSE2 build: no fused multiply-adds), bit for bit; the AVX2 /
  AVX-512 variants fuse some products (ROPE's whole vectors of pairs, SWIGLU's exp
  polynomial) as ggml's builds do and stay within 1e-6 relative of these.
- ``ggml_attention``: csrc/cpu/ggml_attention.c for ``isa`` "generic" (ggml's plain-C
  fallbacks; the generic variant equals it bit for bit), "avx512" or "avx2" (the builds'
  lane counts, reduction orders, fused multiply-adds and vector expf).
- The Q8_0 matmul's twin is reference.q8_0_linear_ggml.

A fused multiply-add is float64 a*b + c rounded to float32 (reference.fma32: the sum is
rounded twice, so in rare cases one ulp off). fp16 rounding is ``.half().float()`` (to
nearest even, as F16C and ggml's software conversion). expf, cosf, sinf and powf are the C
library's, through ctypes one value a call: the functions ggml calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math

import torch

from .reference import fma32, hsum8

TILE = 64   # ggml's GGML_FA_TILE_Q and GGML_FA_TILE_KV
ISAS = ("generic", "avx512", "avx2")


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


def expf(x: torch.Tensor) -> torch.Tensor:
    """libm's expf element by element (float32 in and out)."""
    return _libm_map("expf", x)


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def _fma(a, b, c) -> torch.Tensor:
    """fma32 of float32 tensors or numbers."""
    return fma32(*(torch.as_tensor(x, dtype=torch.float32) for x in (a, b, c)))


def _madd(isa: str, a, b, c) -> torch.Tensor:
    """a*b + c as the build computes it: fused on the FMA builds, rounded twice in plain C."""
    if isa == "generic":
        return torch.as_tensor(a) * b + c
    return _fma(a, b, c)


def _half(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def _bits(x: torch.Tensor) -> torch.Tensor:
    """float32 -> its bits as int64 in [0, 2^32)."""
    return x.view(torch.int32).long() & 0xFFFFFFFF


def _from_bits(b: torch.Tensor) -> torch.Tensor:
    """int64 (taken mod 2^32) -> the float32 with those bits."""
    b = b & 0xFFFFFFFF
    return torch.where(b >= 2**31, b - 2**32, b).to(torch.int32).view(torch.float32)


# ---------------------------------------------------------------- RMS_NORM, ROPE (pointwise)
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


# ------------------------------------------------------------------- ggml_v_expf, SWIGLU

# ggml_v_expf's constants: 1.5 * 2^23 (round to integer), 1/ln 2, ln 2 in two parts, and the
# polynomial's coefficients c1 (b) .. c5 (b^5).
_SHIFT, _LOG2E, _LN2_HI, _LN2_LO = map(float.fromhex, (
    "0x1.8p23", "0x1.715476p+0", "0x1.62e4p-1", "0x1.7f7d1cp-20"))
_C1, _C2, _C3, _C4, _C5 = map(float.fromhex, (
    "0x1.ffffecp-1", "0x1.fffdb6p-2", "0x1.555e66p-3", "0x1.573e2ep-5", "0x1.0e4020p-7"))


def v_expf(x: torch.Tensor, isa: str) -> torch.Tensor:
    """ggml_v_expf (vec.h) element by element on float32 x: "avx512" and "avx2" its builds'
    forms (fused multiply-adds; AVX-512 scales by _mm512_scalef_ps), "sse2" its SSE2 form
    (every product rounded: the generic variant's SWIGLU); "generic" libm's expf (ggml's
    scalar loops: the generic variant's tiled softmax)."""
    if isa == "generic":
        return expf(x)
    f = _f32
    if isa == "sse2":
        z = x * f(_LOG2E) + f(_SHIFT)
        n = z - f(_SHIFT)
        b = (x - n * f(_LN2_HI)) - n * f(_LN2_LO)
        u = b * b
        j = ((f(_C5) * b + f(_C4)) * u + (f(_C3) * b + f(_C2))) * u + f(_C1) * b
    else:
        z = _fma(x, f(_LOG2E), f(_SHIFT))
        n = z - f(_SHIFT)
        b = _fma(-n, f(_LN2_LO), _fma(-n, f(_LN2_HI), x))
        u = b * b
        inner = _fma(_fma(f(_C5), b, f(_C4)), u, _fma(f(_C3), b, f(_C2)))
        if isa == "avx512":
            j = _fma(inner, u, _fma(f(_C1), b, f(1.0)))
            res = (j.double() * torch.pow(2.0, n.double())).float()   # scalef: one rounding
            alt = torch.where(n <= 0, f(0.0), f(math.inf))
            return torch.where(n.abs() > 192, alt, res)
        j = _fma(inner, u, f(_C1) * b)
    e = (_bits(z) << 23) & 0xFFFFFFFF
    k = _from_bits(e + _bits(f(1.0)))
    g = torch.where(n <= 0, 0x82000000, 0)
    s1 = _from_bits(g + 0x7F000000)
    s2 = _from_bits(e - g)
    if isa == "sse2":
        big, small = (s2 * j + s2) * s1, k * j + k
    else:
        big, small = _fma(s2, j, s2) * s1, _fma(k, j, k)
    return torch.where(n.abs() > 192, s1 * s1, torch.where(n.abs() > 126, big, small))


def silu_f32(g: torch.Tensor) -> torch.Tensor:
    """ggml_silu_f32, every build's scalar tail: g / (1 + expf(-g)), float32 -> float32."""
    return g / (_f32(1.0) + expf(-g))


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """ggml_vec_swiglu_f32 as the generic (SSE2) build computes it. x: (..., 2N) float32,
    [gate | up] per row -> (..., N) float32 = silu(gate) * up, silu(g) = g / (1 + exp(-g)):
    the first N - N % 4 columns with ggml_v_expf's polynomial, the rest with expf."""
    n = x.shape[-1] // 2
    gate, up = x[..., :n], x[..., n:]
    m = n - n % 4
    head = gate[..., :m] / (_f32(1.0) + v_expf(_f32(0.0) - gate[..., :m], "sse2"))
    return torch.cat([head, silu_f32(gate[..., m:])], dim=-1) * up


# ------------------------------------------------------------ FLASH_ATTN_EXT (F16 cache)

def _lane_sum(x: torch.Tensor, isa: str) -> torch.Tensor:
    """Sum of the last dim (16 lanes on avx512, 8 on avx2) in the build's shuffle order."""
    if isa == "avx512":          # _mm512_reduce_add_ps: 256-bit halves, 128-bit halves, pairs
        t = x[..., 8:] + x[..., :8]
        t = t[..., 4:] + t[..., :4]
        t = t + t[..., [2, 3, 0, 1]]
        return t[..., 0] + t[..., 1]
    return hsum8(x)              # AVX2: halves, then movehl, then movehdup


def dot_f16(x: torch.Tensor, y: torch.Tensor, isa: str) -> torch.Tensor:
    """ggml_vec_dot_f16 over the last dim of x and y (fp16 values as float32; broadcast), in
    the build's order: float32 lane accumulators (4 registers of 16 or 8), their tree sum,
    then the leftovers in float64; returns float32."""
    p = x * y                                   # fp16 * fp16: exact in float32
    n = p.shape[-1]
    sumf = torch.zeros(p.shape[:-1], dtype=torch.float64)
    np_ = 0
    if isa != "generic":
        lanes = 16 if isa == "avx512" else 8
        step = 4 * lanes
        np_ = n - n % step
        acc = torch.zeros(*p.shape[:-1], 4, lanes)
        for i in range(0, np_, step):
            # fma of an exact product: one float32 add
            acc = acc + p[..., i:i + step].reshape(*p.shape[:-1], 4, lanes)
        a0 = acc[..., 0, :] + acc[..., 2, :]
        a1 = acc[..., 1, :] + acc[..., 3, :]
        a0 = a0 + a1
        if isa == "avx512":
            sumf = _lane_sum(a0, isa).double()
        else:                                    # _mm_hadd_ps twice
            t0 = a0[..., :4] + a0[..., 4:]
            sumf = ((t0[..., 0] + t0[..., 1]) + (t0[..., 2] + t0[..., 3])).double()
    for i in range(np_, n):
        sumf = sumf + p[..., i].double()
    return sumf.float()


def soft_max_sum(x: torch.Tensor, isa: str) -> torch.Tensor:
    """ggml_vec_soft_max_f32's returned sum over the last dim (x: already exp'd values):
    per vector of lanes a float32 lane sum, then all in float64."""
    n = x.shape[-1]
    lanes = {"avx512": 16, "avx2": 8}.get(isa, 0)
    sum_ = torch.zeros(x.shape[:-1], dtype=torch.float64)
    i = 0
    while lanes and i + lanes <= n:
        sum_ = sum_ + _lane_sum(x[..., i:i + lanes], isa).double()
        i += lanes
    for j in range(i, n):
        sum_ = sum_ + x[..., j].double()
    return sum_


def _online(q, k, v, lo, hi, scale, isa):
    """one_chunk's online softmax of rows q (R, D) over keys lo..hi[r] of their k, v (R, S, D):
    (fp16 accumulator as float32 (R, D), running max (R,), running sum (R,)), unnormalised."""
    R, D = q.shape
    qh = _half(q)
    s_all = dot_f16(k[:, lo:], qh[:, None, :], isa) * scale + 0.0   # (R, S - lo), + the mask's 0
    acc = torch.zeros(R, D)
    S = torch.zeros(R)
    M = torch.full((R,), -math.inf)
    for j in range(lo, int(hi.max()) + 1 if len(hi) else lo):
        on = j <= hi
        s = s_all[:, j - lo]
        new = on & (s > M)
        old = on & ~new
        e = expf(torch.where(new, M - s, torch.where(old, s - M, torch.zeros(R))))
        ms = torch.where(new, e, torch.ones(R))
        vs = torch.where(old, e, torch.ones(R))
        M = torch.where(new, s, M)
        acc = torch.where(new[:, None], _half(acc * ms[:, None]), acc)           # vec_scale_f16
        mad = _half(_madd(isa, v[:, j], vs[:, None], acc))                       # vec_mad_f16
        acc = torch.where(on[:, None], mad, acc)
        S = torch.where(on, _madd(isa, S, ms, vs), S)
    return acc, M, S


def _normalise(acc, S):
    s_inv = torch.where(S == 0, torch.zeros_like(S), 1.0 / S)
    return acc * s_inv[:, None]


def _one_chunk(q, k, v, last, scale, isa):
    """q (R, D); k, v (R, S, D) the row's kv head; last (R,) -> (R, D)."""
    acc, _, S = _online(q, k, v, 0, last, scale, isa)
    return _normalise(acc, S)


def _split_kv(q, k, v, last, scale, isa, n_kv, n_threads):
    """The split-KV decode path: keys 0..n_kv-1 in n_threads chunks, each by one_chunk, merged
    in chunk order (ggml_flash_attn_ext_reduce_partials). Shapes as _one_chunk."""
    R, D = q.shape
    chunk = -(-n_kv // n_threads)
    acc = torch.zeros(R, D)
    S = torch.zeros(R)
    M = torch.full((R,), -math.inf)
    for c in range(n_threads):
        lo = c * chunk
        if lo >= n_kv or lo > int(last.max()):
            continue
        part, Mc, Sc = _online(q, k, v, lo, torch.clamp(last, max=lo + chunk - 1), scale, isa)
        on = Sc != 0
        m_new = torch.fmax(M, Mc)
        so = expf(torch.where(on, M - m_new, torch.zeros(R)))
        sn = expf(torch.where(on, Mc - m_new, torch.zeros(R)))
        acc = torch.where(on[:, None], _madd(isa, acc, so[:, None], part * sn[:, None]), acc)
        S = torch.where(on, _madd(isa, S, so, Sc * sn), S)
        M = torch.where(on, m_new, M)
    s_inv = torch.where(S == 0, torch.ones(R), 1.0 / S)   # S == 0: acc stays (zeros)
    return torch.where((S == 0)[:, None], acc, acc * s_inv[:, None])


def _tiled(q, k, v, last, scale, isa):
    """q (R, D); k, v (R, S, D) the row's kv head; last (R,) -> (R, D)."""
    R, D = q.shape
    S_len = k.shape[1]
    acc = torch.zeros(R, D)
    S = torch.zeros(R)
    M = torch.full((R,), -math.inf)
    cols = torch.arange(TILE)
    for ic in range(0, S_len, TILE):
        kv = min(TILE, S_len - ic)
        kq = torch.zeros(R, TILE)
        for d in range(D):                                        # simd_gemm: one chain per score
            kq[:, :kv] = _madd(isa, q[:, d:d + 1], k[:, ic:ic + kv, d], kq[:, :kv])
        kq = kq * scale
        kq = kq + torch.where(ic + cols[None, :] <= last[:, None], 0.0, -math.inf)
        tile_max = kq.max(dim=1).values
        on = (ic <= last) & (tile_max != -math.inf)
        m_new = torch.fmax(M, tile_max)
        grow = on & (m_new > M)
        ms = expf(torch.where(grow, M - m_new, torch.zeros(R)))
        acc = torch.where(grow[:, None], acc * ms[:, None], acc)
        S = torch.where(grow, S * ms, S)
        M = torch.where(on, m_new, M)
        p = v_expf(kq - M[:, None], isa)                          # ggml_vec_soft_max_f32
        S = torch.where(on, (S.double() + soft_max_sum(p, isa)).float(), S)
        for j in range(kv):                                       # simd_gemm: acc += p_j * V_j
            acc = torch.where(on[:, None], _madd(isa, p[:, j:j + 1], v[:, ic + j], acc), acc)
    return _normalise(acc, S)


def ggml_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                   scale: float, step_rows: int, isa: str = "generic", n_kv: int = 0,
                   n_threads: int = 1) -> torch.Tensor:
    """llama.cpp's CPU FLASH_ATTN_EXT for one sequence (csrc/cpu/ggml_attention.c's twin).

    q: (T, Hq, D) float32 in ggml's head-dim order; k, v: (S, Hk, D) float32 holding fp16
    values (the cache's); pos: (T,) int: row t attends keys 0..pos[t]; scale: the softmax
    scale; step_rows: the query rows of llama.cpp's call (< 64: its one_chunk path, else its
    tiled path). GQA: q head h reads kv head h // (Hq // Hk). n_kv, n_threads: llama.cpp's
    padded KV length and thread count; with step_rows == 1 and n_kv >= 512 they select its
    split-KV decode path (the kernel's parallax_ggml_attention_kv_f32); n_kv = 0: never split.
    Returns (T, Hq, D) float32.
    """
    if isa not in ISAS:
        raise ValueError(f"isa={isa!r}: one of {ISAS}")
    T, Hq, D = q.shape
    S_len, Hk, _ = k.shape
    group = Hq // Hk
    # rows r = (t, h): (T*Hq, D); each row's kv head as (T*Hq, S, D)
    qr = q.float().reshape(T * Hq, D)
    kr = k.float().repeat_interleave(group, dim=1).permute(1, 0, 2)        # (Hq, S, D)
    vr = v.float().repeat_interleave(group, dim=1).permute(1, 0, 2)
    kr = kr[None].expand(T, Hq, S_len, D).reshape(T * Hq, S_len, D)
    vr = vr[None].expand(T, Hq, S_len, D).reshape(T * Hq, S_len, D)
    last = pos.long().clamp(max=S_len - 1)[:, None].expand(T, Hq).reshape(-1)
    if step_rows >= TILE:
        out = _tiled(qr, kr, vr, last, float(scale), isa)
    elif step_rows == 1 and T == 1 and n_kv >= 512:
        out = _split_kv(qr, kr, vr, last, float(scale), isa, n_kv, n_threads)
    else:
        out = _one_chunk(qr, kr, vr, last, float(scale), isa)
    return out.reshape(T, Hq, D)

"""csrc/cpu/ggml_pointwise.c (llama.cpp's CPU RMS_NORM+MUL, ROPE and SWIGLU, bit for bit), in
every kernel variant this CPU runs, against its torch twins (ops/ggml_reference.py):
bit-equal to the generic variant, within 1e-6 of the SIMD ones, and the twins against plain
math. (The whole model against llama.cpp's own recorded output: test_ggml_numerics.py.)"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from parallax.ops import cpu
from parallax.ops import ggml_reference as gref

HERE = cpu.supported_variants()
SIMD = [v for v in HERE if v != "generic"]
POS = torch.tensor([0, 1, 17, 300, 70000], dtype=torch.int32)


@pytest.fixture(scope="module")
def libs() -> list[str]:
    """The variants this CPU runs, each built and loaded into the torch ops."""
    for v in HERE:
        assert cpu.kernels(v) is not None, cpu.build_error(v)
    return HERE


def k_rms_norm(v, x, w, eps):
    return cpu.ggml_rms_norm(x, w, eps, isa=v)


def k_rope(v, x, pos, base, neox):
    return cpu.ggml_rope(x, pos, base, neox, isa=v)


def k_swiglu(v, x):
    return cpu.ggml_swiglu(x, isa=v)


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    return ((out.double() - want.double()).norm() / want.double().norm()).item()


def to_hf(x: torch.Tensor) -> torch.Tensor:
    """(..., D) with rotation pairs (2i, 2i+1) (GGUF's permuted heads) -> pairs (i, i + D/2)."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1).contiguous()


# ------------------------------------------------------------------------------- RMS_NORM

@pytest.mark.parametrize("m,k", [(1, 576), (5, 37), (3, 1), (2, 2048)])
def test_rms_norm_every_variant_equals_the_twin_bit_for_bit(libs, m, k):
    """Only plain products follow the in-order double sum: every build gives the same bits."""
    g = torch.Generator().manual_seed(m * 1000 + k)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 3, m)[:, None]
    w = torch.randn(k, generator=g)
    want = gref.rms_norm(x, w, 1e-5)
    for v in libs:
        assert torch.equal(k_rms_norm(v, x, w, 1e-5), want), v


def test_rms_norm_twin_is_rms_norm():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(4, 576, generator=g), torch.randn(576, generator=g)
    want = F.rms_norm(x.double(), (576,), w.double(), 1e-5)
    assert rel_err(gref.rms_norm(x, w, 1e-5), want) < 1e-6


def test_sqrt_f32_is_correctly_rounded():
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.rand(200_000, generator=g) * s for s in (1e-30, 1e-3, 1.0, 1e3, 1e30)])
    x[0] = 0.0
    want = torch.from_numpy(np.sqrt(x.numpy()))   # IEEE sqrt, correctly rounded
    assert torch.equal(gref.sqrt_f32(x), want)


# ----------------------------------------------------------------------------------- ROPE

@pytest.mark.parametrize("d", [64, 128, 70, 6])
@pytest.mark.parametrize("neox", [False, True])
def test_rope_generic_equals_the_twin_and_simd_is_close(libs, d, neox):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(len(POS), 3, d, generator=g)
    want = gref.rope(x.clone(), POS, 100000.0, neox)
    assert torch.equal(k_rope("generic", x, POS, 100000.0, neox), want)
    for v in SIMD:
        assert rel_err(k_rope(v, x, POS, 100000.0, neox), want) < 1e-6, v


@pytest.mark.parametrize("d", [64, 70, 6])
def test_rope_neox_on_hf_layout_is_mode_0_on_gguf_layout(libs, d):
    g = torch.Generator().manual_seed(d + 1)
    x = torch.randn(len(POS), 4, d, generator=g)
    for v in libs:
        gguf_layout = k_rope(v, x, POS, 10000.0, False)
        assert torch.equal(k_rope(v, to_hf(x), POS, 10000.0, True), to_hf(gguf_layout)), v
    assert torch.equal(gref.rope(to_hf(x), POS, 10000.0, True),
                       to_hf(gref.rope(x.clone(), POS, 10000.0, False)))


def _fma_f32(a: float, b: float, c: float) -> np.float32:
    """fmaf(a, b, c): a * b + c rounded once to float32 (nearest, ties to even), exactly."""
    exact = Fraction(a) * Fraction(b) + Fraction(c)
    near = np.float32(float(exact))
    cands = [np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.float32(np.inf))]
    return min(cands, key=lambda f: (abs(Fraction(float(f)) - exact),
                                     int(np.float32(f).view(np.int32)) & 1))


@pytest.mark.parametrize("d", [70, 38, 26, 6])
def test_rope_simd_builds_fuse_the_pairs_ggmls_vector_loop_fuses(libs, d):
    """ggml's rotate_pairs (mode 0) runs full vectors of pairs and then one half vector with
    vfmaddsub -- x0' = fma(x0, c, -(x1 s)), x1' = fma(x0, s, x1 c) -- and the pairs left over
    with separate products (as the generic build does every pair). AVX-512: 8 pairs a vector,
    then 4; AVX2: 4, then 2."""
    g = torch.Generator().manual_seed(d + 2)
    pos = POS[:3]
    x = torch.randn(len(pos), 2, d, generator=g)
    cos, sin = gref.rope_angles(pos, d, 10000.0)
    plain = gref.rope(x.clone(), pos, 10000.0, False)
    for v in SIMD:
        width = 8 if v.startswith("avx512") else 4
        npairs = d // 2
        fused = npairs // width * width
        fused += width // 2 if npairs - fused >= width // 2 else 0
        out = k_rope(v, x, pos, 10000.0, False)
        assert torch.equal(out[..., 2 * fused:], plain[..., 2 * fused:]), v
        for t in range(len(pos)):
            for h in range(2):
                for j in range(fused):
                    x0, x1 = float(x[t, h, 2 * j]), float(x[t, h, 2 * j + 1])
                    c, s = float(cos[t, j]), float(sin[t, j])
                    want0 = _fma_f32(x0, c, -float(np.float32(x1) * np.float32(s)))
                    want1 = _fma_f32(x0, s, float(np.float32(x1) * np.float32(c)))
                    assert (out[t, h, 2 * j].item(), out[t, h, 2 * j + 1].item()) == \
                        (float(want0), float(want1)), (v, t, h, j)


def test_rope_twin_is_rotary_embedding():
    """Against float64 math: theta_i = pos * base^(-2i/D) on pairs (i, i + D/2); position 0
    is the identity exactly."""
    g = torch.Generator().manual_seed(3)
    pos = torch.arange(0, 40, 3, dtype=torch.int32)
    x = torch.randn(len(pos), 3, 64, generator=g)
    out = gref.rope(x.clone(), pos, 10000.0, True)
    inv = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    ang = pos.double()[:, None, None] * inv                                  # (T, 1, D/2)
    x0, x1 = x.double()[..., :32], x.double()[..., 32:]
    want = torch.cat([x0 * ang.cos() - x1 * ang.sin(), x1 * ang.cos() + x0 * ang.sin()], -1)
    assert rel_err(out, want) < 1e-5
    assert torch.equal(out[0], x[0])


# --------------------------------------------------------------------------------- SWIGLU

def _swiglu_input(n: int, seed: int) -> torch.Tensor:
    """(4, 2n) [gate | up]: ordinary values, and gates over +-200 (exp's overflow and
    underflow branches: |n| > 126 and > 192)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 2 * n, generator=g) * 4
    x[0, :n] = torch.linspace(-200, 200, n)
    x[1, :n] = torch.linspace(-100, 100, n)
    return x


@pytest.mark.parametrize("n", [1536, 37, 16, 3, 1])
def test_swiglu_generic_equals_the_twin_and_simd_is_close(libs, n):
    x = _swiglu_input(n, n)
    want = gref.swiglu(x)
    assert torch.equal(k_swiglu("generic", x), want)
    for v in SIMD:
        assert rel_err(k_swiglu(v, x), want) < 1e-6, v


@pytest.mark.parametrize("n", [37, 45, 1543])
def test_swiglu_simd_tails_are_ggml_silu_f32(libs, n):
    """The last N % (vector width) columns go through ggml_silu_f32 (expf) in every build."""
    x = _swiglu_input(n, n + 1)
    gate, up = x[:, :n], x[:, n:]
    for v in SIMD:
        r = n % (16 if v.startswith("avx512") else 8)
        out = k_swiglu(v, x)
        assert torch.equal(out[:, n - r:], gref.silu_f32(gate[:, n - r:]) * up[:, n - r:]), v


def test_swiglu_twin_is_silu_and_mul():
    x = _swiglu_input(301, 4)
    gate, up = x.double()[:, :301], x.double()[:, 301:]
    assert rel_err(gref.swiglu(x), F.silu(gate) * up) < 1e-6

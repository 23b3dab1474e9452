"""GGUF Q8_0 / Q4_0 / Q4_1 weights kept quantized: the C kernels against their torch twins
(every CPU variant this machine runs) and against gguf's own dequantisation, the 8-bit
activation path against gguf's Q8_0 blocks, ggml's dot-product definition and its analytic
error bound; LLM(gguf) with quantized weights against
the same file dequantised to fp32 (the old path), in one process and under tp=2 / pp=2."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from parallax.ops import cpu, reference

VARIANTS = cpu.supported_variants()
Q = gguf.GGMLQuantizationType
FORMATS = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}
F32_KERNELS = ("q8_0", "q4_0")        # formats with an fp32-activation kernel (q8_0_f32.c)
K_QUANTS = {"q4_k": Q.Q4_K, "q6_k": Q.Q6_K}   # super-blocks of 256; gguf-py cannot quantise


def random_k_blocks(n: int, k: int, qtype, g: torch.Generator,
                    dmax: float = 0.02) -> torch.Tensor:
    """(N, K/256 * bytes) uint8 of ``qtype`` super-blocks: random codes, scales and mins
    (every bit pattern is a valid block) with the fp16 factors set to sane magnitudes."""
    nbytes = {Q.Q4_K: 144, Q.Q6_K: 210}[qtype]
    b = torch.randint(0, 256, (n, k // 256, nbytes), generator=g, dtype=torch.uint8)
    halves = (torch.rand(n, k // 256, 2, generator=g) * dmax + dmax / 20).half()
    halves = halves.view(torch.uint8).reshape(n, k // 256, 4)  # two fp16, little-endian bytes
    if qtype == Q.Q4_K:
        b[..., 0:4] = halves                                  # d, dmin
    else:
        b[..., 208:210] = halves[..., :2]                     # d
    return b.reshape(n, -1).contiguous()
SHAPES = [(1, 7, 32), (3, 33, 96), (5, 64, 256), (9, 17, 160), (17, 40, 64), (1, 1, 32)]


def block_bytes(w: np.ndarray, qtype=Q.Q8_0) -> torch.Tensor:
    """(N, K) float32 -> rows of ``qtype`` blocks, uint8, by gguf's own quantiser."""
    q = gguf.quants.quantize(w.astype(np.float32), qtype)
    return torch.from_numpy(np.ascontiguousarray(q))


@pytest.mark.parametrize("fmt", F32_KERNELS)
@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_block_kernel_matches_twin(isa, m, n, k, fmt):
    if cpu.kernels(isa) is None:
        pytest.fail(f"CPU kernels ({isa}) did not build: {cpu.build_error(isa)}")
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    w = torch.randn(n, k, generator=g).numpy()
    qw = block_bytes(w, FORMATS[fmt])
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g)
    want = getattr(reference, f"{fmt}_linear")(x, qw, bias)
    got = getattr(cpu, f"{fmt}_linear")(x, qw, bias, isa=isa)
    # Same dequantised values, different summation order: fp32 rounding only.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * k ** 0.5)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("m,n,k", SHAPES + [(4, 9, 1536), (8, 19, 576), (6, 8, 224)])
def test_q8_kernel_matches_twin(isa, m, n, k, fmt):
    """csrc/cpu/q8_act.c (x rounded to 8-bit blocks, integer dot products) against
    reference.{fmt}_linear_q8 (the same rounded x, dequantised, times the dequantised
    weight): both multiply exactly the same values, so only fp32 summation order differs."""
    if cpu.kernels(isa) is None:
        pytest.fail(f"CPU kernels ({isa}) did not build: {cpu.build_error(isa)}")
    g = torch.Generator().manual_seed(m * 1000 + n + k + 7)
    qw = block_bytes(torch.randn(n, k, generator=g).numpy(), FORMATS[fmt])
    x = torch.randn(m, k, generator=g) * 4
    bias = torch.randn(n, generator=g)
    y = torch.full((m, n), float("nan"))        # poisoned: every output must be written
    y.copy_(cpu.block_linear_q8(fmt, x, qw, bias, isa=isa))
    want = getattr(reference, f"{fmt}_linear_q8")(x, qw, bias)
    scale = float((x.abs() @ getattr(reference, f"{fmt}_dequantize")(qw).abs().T).max())
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("fmt", K_QUANTS)
def test_k_quant_dequantize_matches_gguf(fmt):
    """The twins' Q4_K / Q6_K dequantisation is bit-equal to gguf-py's on random blocks."""
    g = torch.Generator().manual_seed(5)
    qw = random_k_blocks(7, 512, K_QUANTS[fmt], g)
    want = torch.from_numpy(gguf.quants.dequantize(qw.numpy(), K_QUANTS[fmt])).reshape(7, 512)
    assert torch.equal(getattr(reference, f"{fmt}_dequantize")(qw), want)


@pytest.mark.parametrize("fmt", K_QUANTS)
@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("m,n,k", [(1, 7, 256), (3, 9, 512), (5, 4, 768), (1, 1, 256),
                                   (6, 13, 256)])
def test_k_quant_kernel_matches_twin(isa, m, n, k, fmt):
    """csrc/cpu/q8_act.c's Q4_K / Q6_K tiles against reference.{fmt}_linear_q8 (same rounded
    x, same dequantised weights): fp32 summation order only."""
    g = torch.Generator().manual_seed(m * 100 + n + k)
    qw = random_k_blocks(n, k, K_QUANTS[fmt], g)
    x = torch.randn(m, k, generator=g) * 3
    bias = torch.randn(n, generator=g)
    got = cpu.block_linear_q8(fmt, x, qw, bias, isa=isa)
    want = getattr(reference, f"{fmt}_linear_q8")(x, qw, bias)
    scale = float((x.abs() @ getattr(reference, f"{fmt}_dequantize")(qw).abs().T).max())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("isa", VARIANTS)
def test_quantize_q8_matches_twin(isa):
    """The kernels' activation rounding is the twin's bit for bit: codes and scales equal,
    including an all-zero block, exact .5 ties (half to even) and tiny values."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 160, generator=g) * 10
    x[0, :32] = 0.0
    x[1, :32] = torch.arange(32) - 15.5           # amax 16.5: codes at 127/16.5 steps
    x[1, 32:64] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5] + [0.0] * 26)  # id 1: ties
    x[2, 64:96] = 1e-30
    q, d = cpu.quantize_q8(x, isa=isa)
    want_q, want_d = reference.quantize_q8(x)
    assert torch.equal(q, want_q) and torch.equal(d, want_d)
    assert q[1, 33:38].tolist() == [0, 2, 2, 0, -2]
    # The rounding bound the kernels' error bound rests on (q8_error_bound).
    amax = x.reshape(5, -1, 32).abs().amax(-1, keepdim=True)
    err = (x - reference.dequantize_q8(q, d)).reshape(5, -1, 32).abs()
    assert bool((err <= q8_error_bound(amax) * (1 + 1e-6)).all())


def q8_error_bound(amax: torch.Tensor) -> torch.Tensor:
    """The most rounding x to an 8-bit block moves an element, amax the block's largest |x|:
    half a step, amax / 254, plus |code| <= 127 times the fp16 scale's rounding (2^-11 of
    amax / 127, or 2^-25 where the scale is subnormal in fp16)."""
    return amax / 254 + torch.maximum(amax / 2048, torch.full_like(amax, 127 * 2.0 ** -25))


def gguf_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """gguf-py's Q8_0 quantisation of x (M, K) (ggml's reference quantize_row_q8_0):
    (codes (M, K) int8, fp16 scales as float32 (M, K/32))."""
    b = gguf.quants.quantize(x.astype(np.float32), Q.Q8_0).reshape(-1, 34)
    codes = b[:, 2:].copy().view(np.int8).reshape(x.shape)
    return codes, b[:, :2].copy().view(np.float16).astype(np.float32).reshape(x.shape[0], -1)


def q8_test_rows(g: torch.Generator) -> torch.Tensor:
    """Rows of activations for the gguf oracle tests: uneven block magnitudes (one block
    whose fp16 scale is subnormal, one all zero, one of exact .5 ties)."""
    x = torch.randn(7, 576, generator=g) * torch.rand(1, 576, generator=g) * 4
    x[0, :32] = 0.0
    x[1, :32] *= 3e-4 / float(x[1, :32].abs().max())    # scale ~2.4e-6: subnormal in fp16
    x[2, :6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5])
    x[2, 6:32] = 0.0
    return x


@pytest.mark.parametrize("isa", VARIANTS)
def test_quantize_q8_matches_gguf(isa):
    """The activation blocks are Q8_0 blocks as ggml makes them: the scales equal gguf-py's
    (ggml's reference quantiser) bit for bit (fp16 d = amax / 127, subnormal included). The
    codes are those of ggml's x86 quantize_row_q8_0 (what llama.cpp runs: x * (127 / amax),
    half to even), which differ from the reference's (x * (1 / d), half away from zero) only
    at .5 ties or within an ulp of one: every differing code is off by one, at such a point."""
    x = q8_test_rows(torch.Generator().manual_seed(21))
    q, d = cpu.quantize_q8(x, isa=isa)
    want_q, want_d = gguf_q8_0(x.numpy())
    assert torch.equal(d, torch.from_numpy(want_d))
    assert float(d[1, 0]) < 2.0 ** -14 and float(d[1, 0]) > 0      # fp16 subnormal scale
    diff = q.numpy().astype(np.int32) - want_q
    amax = x.reshape(7, -1, 32).abs().amax(-1, keepdim=True).double()
    t = (x.reshape(7, -1, 32).double() * 127 / amax).reshape(7, -1).numpy()   # NaN: amax 0
    near_half = np.abs(np.abs(t - np.trunc(t)) - 0.5) < 1e-5
    assert set(np.unique(diff)) <= {-1, 0, 1}
    assert bool(near_half[diff != 0].all())
    assert (diff != 0).sum() == 4                                  # the four ties of row 2


@pytest.mark.parametrize("isa", VARIANTS)
def test_q8_scales_round_to_fp16_at_every_magnitude(isa):
    """The fp16 rounding of the block scales (F16C's, or the portable code in the generic
    build) equals numpy's float16 cast from 1e-12 to 1e7 (subnormal, zero and inf included),
    ties to even included: amax / 127 landing exactly halfway between two fp16 values."""
    g = torch.Generator().manual_seed(8)
    amax = torch.logspace(-12, 7, 4000, dtype=torch.float64).float()
    amax = amax * (1 + torch.rand(4000, generator=g) * 0.01)
    halfway = (torch.tensor([1.0, 1.0009765625, 3.0009765625]).double()
               + 2.0 ** -11) * 127   # d exactly between two fp16 values (and 127 * d exact)
    amax = torch.cat([amax, halfway.float()])
    assert bool(((halfway / 127).float().double() == halfway / 127).all())
    x = torch.zeros(amax.numel(), 32)
    x[:, 0] = amax
    x[:, 1] = -amax / 3
    _, d = cpu.quantize_q8(x, isa=isa)
    want = ((amax / 127).numpy().astype(np.float16).astype(np.float32))
    assert np.array_equal(d[:, 0].numpy(), want)
    assert np.isinf(want).any() and (want == 0).any() and (want[want > 0] < 2.0 ** -14).any()


@pytest.mark.parametrize("fmt", F32_KERNELS)
@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("m", [1, 3, 7])
def test_linear_q8_is_ggml_dot(isa, fmt, m):
    """What ggml's vec_dot_q8_0_q8_0 / vec_dot_q4_0_q8_0 compute: x as gguf-py's Q8_0 blocks,
    per block the integer dot times fp16(d_w) * fp16(d_x) (exact in fp32), summed: equal to
    the float64 product of the two dequantised operands, up to fp32 summation (a scale
    kept in fp32 instead of fp16 moves each block's term by up to 2^-11: ~30x this
    tolerance here). Row kernels (m = 1, 3) and tiles (m = 7)."""
    g = torch.Generator().manual_seed(5 + m)
    x = q8_test_rows(g)[:m]
    k = x.shape[1]
    qw = block_bytes(torch.randn(96, k, generator=g).numpy(), FORMATS[fmt])
    w = torch.from_numpy(gguf.quants.dequantize(qw.numpy(), FORMATS[fmt])).reshape(96, k)
    codes, scales = gguf_q8_0(x.numpy())
    if m > 2:   # row 2's ties: use the codes this path takes (the x86 rule, checked above)
        codes[2] = cpu.quantize_q8(x[2:3], isa=isa)[0].numpy()
    x8 = torch.from_numpy(codes).double().reshape(m, -1, 32) * torch.from_numpy(scales).double()[..., None]
    want = x8.reshape(m, k) @ w.double().T
    got = cpu.block_linear_q8(fmt, x, qw, isa=isa).double()
    tol = 2e-6 * (x8.reshape(m, k).abs() @ w.double().abs().T) + 1e-30
    assert bool(((got - want).abs() <= tol).all()), float(((got - want).abs() / tol).max())


def ggml_q8_1(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A numpy model of ggml's x86 quantize_row_q8_1 (llama.cpp's activations for Q4_1), in
    fp32 as it computes: per block of 32, d = amax / 127, codes = round-half-even(x * (127 /
    amax)), the block's fp16 d, and s = fp16(d * sum(codes)) with d still fp32 ->
    (codes int8, fp16 d, fp16 s as float32)."""
    b = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(b).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    codes = np.rint(b * inv).astype(np.int8)
    d = (amax / np.float32(127)).astype(np.float32)[..., 0]
    s = (d * codes.astype(np.int32).sum(-1).astype(np.float32)).astype(np.float32)
    return (codes.reshape(x.shape), d.astype(np.float16).astype(np.float32),
            s.astype(np.float16).astype(np.float32))


def ggml_q8_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A numpy model of ggml's quantize_row_q8_K_ref (what its x86 build runs for the
    K-quants' activations), literally: per 256, max = the first x of largest |x| (strict >
    scan), iscale = -127 / max in fp32, code = min(127, nearest_int(iscale * x)) with
    ggml's nearest_int (add 1.5 * 2^23 in fp32, read the mantissa), d = 1 / iscale in fp32,
    bsums = the codes' sums per 16; an all-zero block: d 0, codes 0 (bsums 0 here) ->
    (codes int8, d float32 (M, K/256), bsums float32 (M, K/16))."""
    b = x.astype(np.float32).reshape(x.shape[0], -1, 256)
    codes = np.zeros(b.shape, np.int8)
    d = np.zeros(b.shape[:2], np.float32)
    for i, j in np.ndindex(*b.shape[:2]):
        blk = b[i, j]
        first = int(np.argmax(np.abs(blk) == np.abs(blk).max()))
        if blk[first] == 0:
            continue
        iscale = np.float32(-127) / blk[first]
        val = (iscale * blk).astype(np.float32) + np.float32(12582912)
        v = (val.view(np.int32) & 0x007FFFFF) - 0x00400000
        codes[i, j] = np.minimum(127, v)
        d[i, j] = np.float32(1) / iscale
    bsums = codes.astype(np.int32).reshape(x.shape[0], -1, 16).sum(-1).astype(np.float32)
    return codes.reshape(x.shape), d, bsums


def k_test_rows(g: torch.Generator) -> torch.Tensor:
    """Activation rows for the Q8_K tests (K = 768): uneven super-blocks, one all zero, one
    whose largest |x| is negative and comes again positive later (ggml keeps the first: the
    codes and d change sign with it), one of .5 ties, one with a tiny scale."""
    x = torch.randn(6, 768, generator=g) * torch.rand(1, 768, generator=g) * 4
    x[0, :256] = 0.0
    x[1, 256 + 7] = -float(x[1, 256:512].abs().max()) * 2
    x[1, 256 + 200] = -x[1, 256 + 7]
    x[2, :256] = 0.0
    x[2, :6] = torch.tensor([-127.0, 0.5, 1.5, 2.5, -0.5, -2.5])   # iscale 1: exact ties
    x[3, 512:] *= 1e-30
    return x


ACT_KINDS = {"q8_0": 32, "q8_1": 32, "q8_k": 256}   # activation kind -> block


@pytest.mark.parametrize("kind", ACT_KINDS)
@pytest.mark.parametrize("isa", VARIANTS)
def test_quantize_act_matches_twin(isa, kind):
    """csrc/cpu/q8_act.c's activation blocks (codes, scales, sums) equal the twin's
    (reference.quantize_act) bit for bit, on rows with zero, subnormal-scale and tie blocks."""
    x = q8_test_rows(torch.Generator().manual_seed(4))[:, :512].contiguous()
    got = cpu.quantize_act(kind, x, isa=isa)
    want = reference.quantize_act(kind, x)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize("isa", VARIANTS)
def test_quantize_q8_1_matches_ggml(isa):
    """The Q4_1 path's activations are ggml's block_q8_1 (ggml_q8_1, a numpy model of its
    x86 quantize_row_q8_1): codes, fp16 d and fp16 s bit-equal, s being fp16(d * sum) with
    d in fp32, which differs from the fp16 d times the sum (rounded to fp16) on about a
    quarter of the blocks here."""
    x = q8_test_rows(torch.Generator().manual_seed(23))
    q, d, s = cpu.quantize_act("q8_1", x, isa=isa)
    want_q, want_d, want_s = ggml_q8_1(x.numpy())
    assert np.array_equal(q.numpy(), want_q)
    assert np.array_equal(d.numpy(), want_d) and np.array_equal(s.numpy(), want_s)
    sums = q.reshape(7, -1, 32).sum(-1, dtype=torch.int32).float()
    assert float((s != (d * sums).half().float()).float().mean()) > 0.15


@pytest.mark.parametrize("isa", VARIANTS)
def test_quantize_q8_k_matches_ggml(isa):
    """The K-quant path's activations are ggml's block_q8_K (ggml_q8_k, a literal numpy model
    of quantize_row_q8_K_ref): codes, fp32 d and bsums bit-equal, including the sign rule
    (a negative max flips the codes and d), ties (half to even) and an all-zero block."""
    x = k_test_rows(torch.Generator().manual_seed(31))
    q, d, bs = cpu.quantize_act("q8_k", x, isa=isa)
    want_q, want_d, want_bs = ggml_q8_k(x.numpy())
    assert np.array_equal(q.numpy(), want_q) and np.array_equal(d.numpy(), want_d)
    assert np.array_equal(bs.numpy(), want_bs)
    assert float(d[1, 1]) > 0 and float(d[0, 0]) == 0 and q[2, :6].tolist() == [-127, 0, 2, 2, 0, -2]


def k_parts(fmt: str, qw: torch.Tensor):
    """Q4_K / Q6_K super-blocks decoded in numpy from their bytes (gguf-py's layouts): codes
    (N, K/256, 256) int64 (Q6_K: q - 32), per-16 scales (N, K/256, 16) int64, fp16 d and
    (Q4_K) dmin as float32 (N, K/256), per-32 mins (N, K/256, 8) int64 (Q6_K: zeros)."""
    n = qw.shape[0]
    if fmt == "q4_k":
        b = qw.numpy().reshape(n, -1, 144).astype(np.int64)
        d = b[..., 0:2].astype(np.uint8).copy().view(np.float16).astype(np.float32)[..., 0]
        dmin = b[..., 2:4].astype(np.uint8).copy().view(np.float16).astype(np.float32)[..., 0]
        s = b[..., 4:16]
        sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], -1)
        mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
        qs = b[..., 16:].reshape(n, -1, 4, 32)
        q = np.stack([qs & 15, qs >> 4], axis=3).reshape(n, -1, 256)      # sub-blocks 2p, 2p+1
        return q, np.repeat(sc, 2, axis=-1), d, dmin, mn
    b = qw.numpy().reshape(n, -1, 210).astype(np.int64)
    i = np.arange(256)
    h, t, l = i // 128, (i % 128) // 32, i % 32
    ql = b[..., h * 64 + (t & 1) * 32 + l]
    nib = np.where(t < 2, ql & 15, ql >> 4)
    q = (nib | (((b[..., 128 + h * 32 + l] >> (2 * t)) & 3) << 4)) - 32
    sc = b[..., 192:208].astype(np.uint8).view(np.int8).astype(np.int64)
    d = b[..., 208:210].astype(np.uint8).copy().view(np.float16).astype(np.float32)[..., 0]
    return q, sc, d, np.zeros_like(d), np.zeros(d.shape + (8,), np.int64)


def ggml_dot_k(fmt: str, x: np.ndarray, qw: torch.Tensor) -> np.ndarray:
    """A float64 model of ggml_vec_dot_q4_K_q8_K / _q6_K_q8_K (x as ggml_q8_k blocks): per
    super-block the exact integer sum_i scale_i * (q_i . qx_i) over its 16-weight groups times
    fp32(fp16 d_w * d_x), minus (Q4_K) fp32(fp16 dmin_w * d_x) times the exact
    sum_j m_j * sum(qx_j); summed exactly. -> (M, N) float64."""
    q, sc, d, dmin, mn = k_parts(fmt, qw)
    codes, dx, bsums = ggml_q8_k(x)
    cx = codes.astype(np.int64).reshape(x.shape[0], -1, 16, 16)               # (M, S, 16, 16)
    dots = np.einsum("msgi,nsgi->mnsg", cx, q.reshape(*q.shape[:2], 16, 16))  # per 16
    sumi = (dots * sc[None]).sum(-1)                                           # (M, N, S)
    s32 = bsums.astype(np.int64).reshape(x.shape[0], -1, 8, 2).sum(-1)         # (M, S, 8)
    summ = np.einsum("msj,nsj->mns", s32, mn)
    dd = (d[None] * dx[:, None]).astype(np.float32).astype(np.float64)
    ddm = (dmin[None] * dx[:, None]).astype(np.float32).astype(np.float64)
    return (dd * sumi - ddm * summ).sum(-1)


@pytest.mark.parametrize("fmt", K_QUANTS)
@pytest.mark.parametrize("isa", VARIANTS)
def test_linear_q8_is_ggml_dot_k(isa, fmt):
    """Q4_K / Q6_K weights with 8-bit activations compute ggml's dot (ggml_dot_k, float64)
    up to fp32 summation, in every variant, 22 weight rows (tiles of 4 and the 2 left
    over). x as per-32 Q8_0 blocks (the old rule) misses it by > 5x this tolerance."""
    g = torch.Generator().manual_seed(17)
    x = k_test_rows(g)
    qw = random_k_blocks(22, 768, K_QUANTS[fmt], g)
    want = torch.from_numpy(ggml_dot_k(fmt, x.numpy(), qw))
    got = cpu.block_linear_q8(fmt, x, qw, isa=isa).double()
    w = getattr(reference, f"{fmt}_dequantize")(qw).double()
    tol = 2e-6 * (x.double().abs() @ w.abs().T) + 1e-30
    assert bool(((got - want).abs() <= tol).all()), float(((got - want).abs() / tol).max())
    x8 = reference.dequantize_q8(*reference.quantize_q8(x)).double()
    assert float(((x8 @ w.T - want).abs() / tol).max()) > 5


def ggml_dot(fmt: str, x: np.ndarray, qw: torch.Tensor) -> np.ndarray:
    """A float64 model of what llama.cpp's CPU matmul computes per output for Q4_1 weights
    (ggml_vec_dot_q4_1_q8_1, x as ggml_q8_1 blocks): per block, the exact integer dot of
    the 4-bit codes with the activation codes times fp32(fp16 d_w * fp16 d_x), plus fp16 m_w
    times fp16 s_x; summed exactly. -> (M, N) float64."""
    assert fmt == "q4_1"
    n = qw.shape[0]
    blk = qw.numpy().reshape(n, -1, 20)
    dw = blk[..., 0:2].copy().view(np.float16).astype(np.float32)[..., 0]   # (N, K/32)
    mw = blk[..., 2:4].copy().view(np.float16).astype(np.float64)[..., 0]
    qs = blk[..., 4:].astype(np.int64)
    qw4 = np.concatenate([qs & 15, qs >> 4], axis=-1)                      # (N, K/32, 32)
    codes, dx, sx = ggml_q8_1(x)
    cx = codes.astype(np.int64).reshape(x.shape[0], -1, 32)                # (M, K/32, 32)
    sumi = np.einsum("mbi,nbi->mnb", cx, qw4)                              # exact integers
    scale = (dw[None] * dx[:, None]).astype(np.float32).astype(np.float64)  # fp32 product
    return (scale * sumi).sum(-1) + sx.astype(np.float64) @ mw.T


@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("m", [1, 3, 7])
def test_linear_q8_is_ggml_dot_q4_1(isa, m):
    """Q4_1 weights with 8-bit activations compute ggml's Q4_1 dot (ggml_dot, float64) up to
    fp32 summation, in every variant: row kernels (m = 1, 3) and tiles (m = 7). The old
    rule (the minimum times the fp16 d_x times the codes' sum) misses it by ~50x this
    tolerance on these rows."""
    g = torch.Generator().manual_seed(9 + m)
    x = q8_test_rows(g)[:m]
    k = x.shape[1]
    qw = block_bytes(torch.randn(96, k, generator=g).numpy(), Q.Q4_1)
    want = torch.from_numpy(ggml_dot("q4_1", x.numpy(), qw))
    got = cpu.block_linear_q8("q4_1", x, qw, isa=isa).double()
    w = reference.q4_1_dequantize(qw).double()
    tol = 2e-6 * (x.double().abs() @ w.abs().T) + 1e-30
    assert bool(((got - want).abs() <= tol).all()), float(((got - want).abs() / tol).max())
    x8 = reference.dequantize_q8(*reference.quantize_q8(x)).double()
    assert float(((x8 @ w.T - want).abs() / tol).max()) > 5


@pytest.mark.parametrize("fmt", FORMATS)
def test_q8_activation_error_bound(fmt):
    """Rounding x to 8-bit blocks moves each x_i by at most e_b = q8_error_bound(amax_b)
    (amax_b the largest |x| of its block of 32), so each output moves by at most
        sum_b e_b * sum_{i in b} |w_ni|
    from the exact product with the dequantised weight: the kernel (default variant) is
    checked against that analytic bound (plus fp32 rounding), and the bound must be tight
    enough to mean something (the observed error is a sizeable share of it)."""
    g = torch.Generator().manual_seed(11)
    n, k = 96, 576
    qw = block_bytes(torch.randn(n, k, generator=g).numpy(), FORMATS[fmt])
    w = getattr(reference, f"{fmt}_dequantize")(qw)                        # (N, K)
    x = torch.randn(8, k, generator=g) * torch.rand(1, k, generator=g) * 3  # uneven blocks
    exact = (x.double() @ w.double().T)
    got = cpu.block_linear_q8(fmt, x, qw).double()
    amax = x.reshape(8, -1, 32).abs().amax(-1).double()                   # (M, K/32)
    wsum = w.abs().reshape(n, -1, 32).sum(-1).double()                     # (N, K/32)
    bound = q8_error_bound(amax) @ wsum.T + 1e-6 * (x.abs().double() @ w.abs().double().T)
    err = (got - exact).abs()
    assert bool((err <= bound).all()), float((err / bound).max())
    assert float((err / bound).max()) > 0.05


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_matches_gguf(fmt):
    """The twin's dequantisation is bit-equal to gguf's; every kernel variant multiplies by
    those values (zero and subnormal-scale blocks included)."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(13, 128, generator=g) * 3).numpy()
    w[0, :32] = 0.0                    # an all-zero block (scale 0)
    w[1, 32:64] = 1e-6                 # a block whose fp16 scale is subnormal
    qw = block_bytes(w, FORMATS[fmt])
    want = torch.from_numpy(gguf.quants.dequantize(qw.numpy(), FORMATS[fmt])).reshape(13, 128)
    assert torch.equal(getattr(reference, f"{fmt}_dequantize")(qw), want)
    x = torch.randn(2, 128, generator=g)
    x8, s = reference.q8_activations(fmt, x)
    y8 = x8 @ want.T
    if fmt == "q4_1":   # ggml's Q4_1 dot: the minimum times block_q8_1's fp16 s, not sum(x8)
        m = torch.from_numpy(qw.numpy().reshape(13, -1, 20)[..., 2:4].copy().view(np.float16))
        y8 += (s - x8.reshape(2, -1, 32).sum(-1)) @ m.float().reshape(13, -1).T
    for isa in VARIANTS:
        if fmt in F32_KERNELS:
            torch.testing.assert_close(getattr(cpu, f"{fmt}_linear")(x, qw, isa=isa),
                                       x @ want.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cpu.block_linear_q8(fmt, x, qw, isa=isa), y8,
                                   rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- whole models
def tiny_gguf(tmp_path, tied: bool, fmt: str = "q8_0", **overrides) -> str:
    """A tiny random llama as a GGUF with every 2-D weight in ``fmt`` (vectors F32)."""
    from conftest import make_checkpoint
    from test_gguf import write_from_hf
    hf = make_checkpoint(str(tmp_path / f"hf-{tied}"), "llama", tie_word_embeddings=tied,
                         **overrides)
    path = str(tmp_path / f"{fmt}-{tied}.gguf")
    write_from_hf(path, hf, {}, qtype=FORMATS[fmt])
    return path


def _weight_formats(llm) -> dict[str, str]:
    model = llm._runner.model
    return {name: m.quant_method.name for name, m in model.named_modules()
            if getattr(m, "quant_method", None) is not None}


PROMPTS = [[5, 6, 7, 8, 9], [1, 2], list(range(30, 60))]
GREEDY = dict(max_new_tokens=32, ignore_eos=True)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fmt", F32_KERNELS)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_model_matches_dequantised_fp32(tmp_path, monkeypatch, tied, fmt):
    """Quantized weights with fp32 activations (PARALLAX_GGUF_ACTIVATIONS=f32) vs the same
    file dequantised to fp32 on load (the old path): both multiply by exactly the same
    dequantised values, so the only difference is fp32 summation order: logits agree to 1e-5
    relative to their scale (measured 6e-7), greedy tokens are equal for 32 tokens, and the
    weights take the block bytes (34 or 18 per 32). Q4_1 has no exact kernel: with fp32
    activations it is dequantised on load (test_exact_activations_dequantise_q4_1)."""
    import parallax
    path = tiny_gguf(tmp_path, tied, fmt)
    monkeypatch.setenv("PARALLAX_GGUF_ACTIVATIONS", "f32")
    monkeypatch.setenv("PARALLAX_GGUF_DEQUANTIZE", "1")
    with parallax.LLM(path) as ref:
        ref_logits = ref.logits(PROMPTS)
        ref_tokens = [o.token_ids for o in ref.generate(PROMPTS, **GREEDY)]
        ref_bytes = ref.memory()[0]["weight_bytes"]
        assert set(_weight_formats(ref).values()) == {"float"}
    monkeypatch.delenv("PARALLAX_GGUF_DEQUANTIZE")
    with parallax.LLM(path) as llm:
        formats = _weight_formats(llm)
        logits = llm.logits(PROMPTS)
        tokens = [o.token_ids for o in llm.generate(PROMPTS, **GREEDY)]
        q_bytes = llm.memory()[0]["weight_bytes"]
    assert set(formats.values()) == {fmt}, formats
    scale = float(ref_logits.nan_to_num().abs().max())    # ragged prompts: NaN padding
    torch.testing.assert_close(logits, ref_logits, atol=1e-5 * scale, rtol=0, equal_nan=True)
    assert tokens == ref_tokens
    # fp32 matrices (4 bytes a weight) became 34/32 or 18/32; the fp32 vectors stay.
    with parallax.loading.gguf.GGUFCheckpoint(path) as ckpt:
        mats = sum(int(np.prod(ckpt.shape(n))) for n in ckpt.names() if len(ckpt.shape(n)) == 2)
    per_block = reference.GGUF_BLOCK_BYTES[fmt]
    assert ref_bytes - q_bytes == mats * 4 - mats // 32 * per_block


@pytest.mark.timeout(300)
def test_exact_activations_dequantise_q4_1(tmp_path, monkeypatch):
    """The default (PARALLAX_GGUF_ACTIVATIONS unset: exact activations) keeps only the types
    with an exact kernel; a Q4_1 file loads as fp32, the old path; with q8 it stays Q4_1."""
    import parallax
    path = tiny_gguf(tmp_path, True, "q4_1")
    monkeypatch.delenv("PARALLAX_GGUF_ACTIVATIONS", raising=False)
    with parallax.LLM(path) as llm:
        assert set(_weight_formats(llm).values()) == {"float"}
    monkeypatch.setenv("PARALLAX_GGUF_ACTIVATIONS", "q8")
    with parallax.LLM(path) as llm:
        assert set(_weight_formats(llm).values()) == {"q4_1"}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fmt", FORMATS)
def test_model_q8_activations(tmp_path, monkeypatch, fmt):
    """8-bit activations (PARALLAX_GGUF_ACTIVATIONS=q8), end to end, by the C kernels (PARALLAX_CPU_MATMUL=
    kernel) and by the torch twin path (=torch): against the file dequantised to fp32 with
    exact activations, both keep the logits within 5e-2 of their scale (an empirical bound
    for this 2-layer model, ~3x the largest error measured over the three formats, 1.6e-2; the
    per-matmul analytic bound is test_q8_activation_error_bound's). The two paths are not
    compared to fp32 rounding: one ulp of difference in an activation can move its 8-bit
    code by one step in the next matmul, an error of the quantization's own size."""
    import parallax
    path = tiny_gguf(tmp_path, True, fmt)
    monkeypatch.setenv("PARALLAX_GGUF_DEQUANTIZE", "1")
    with parallax.LLM(path) as ref:
        exact = ref.logits(PROMPTS)
    monkeypatch.delenv("PARALLAX_GGUF_DEQUANTIZE")
    monkeypatch.setenv("PARALLAX_GGUF_ACTIVATIONS", "q8")
    scale = float(exact.nan_to_num().abs().max())
    errors = {}
    for path_name in ("kernel", "torch"):
        monkeypatch.setenv("PARALLAX_CPU_MATMUL", path_name)
        with parallax.LLM(path) as llm:
            assert set(_weight_formats(llm).values()) == {fmt}
            logits = llm.logits(PROMPTS)
        assert torch.equal(logits.isnan(), exact.isnan())
        errors[path_name] = float((logits - exact).nan_to_num().abs().max()) / scale
    assert max(errors.values()) < 5e-2, errors
    print(fmt, errors)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fmt", K_QUANTS)
def test_model_k_quants_match_dequantised(tmp_path, monkeypatch, fmt):
    """A tiny llama (hidden 256, so every K is whole super-blocks) whose 2-D weights are
    random Q4_K / Q6_K super-blocks (gguf-py cannot quantise to K-quants): with fp32
    activations (the default; no exact K-quant kernel) it is dequantised on load and equals
    PARALLAX_GGUF_DEQUANTIZE=1 up to summation order (logits 1e-4 of their scale: the
    structureless random weights cancel more than trained ones; same greedy tokens). With
    8-bit activations (kept in blocks)
    the C kernels agree with the torch twin path (PARALLAX_CPU_MATMUL=torch) within 5e-2 of
    the logits' scale (measured for Q6_K: 3.6% at one of 46080 logits, 1.5% at the 99.9th
    percentile, median 0; Q4_K 1e-4: the twins differ only by summation order per matmul,
    but a code one step off in the next layer's input is an error of the quantization's
    size, and a step of ggml's block_q8_K is max|x| / 127 over 256 values). Against exact fp32 these random weights are not a fair measure of
    8-bit activations (Q6_K's random codes and signed scales cancel: ~20% of the scale for
    both paths alike); test_q8_activation_error_bound holds each matmul to its bound. The
    weights take the super-block bytes."""
    import parallax
    from conftest import make_checkpoint
    from test_gguf import write_from_hf
    g = torch.Generator().manual_seed(2)
    monkeypatch.setattr(gguf.quants, "quantize", lambda x, qt: random_k_blocks(
        x.shape[0], x.shape[1], qt, g, dmax=5e-4).numpy())
    hf = make_checkpoint(str(tmp_path / "hf"), "llama", hidden_size=256, intermediate_size=512,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    path = str(tmp_path / f"{fmt}.gguf")
    write_from_hf(path, hf, {}, qtype=K_QUANTS[fmt])
    monkeypatch.setenv("PARALLAX_GGUF_DEQUANTIZE", "1")
    with parallax.LLM(path) as ref:
        ref_logits = ref.logits(PROMPTS)
        ref_tokens = [o.token_ids for o in ref.generate(PROMPTS, **GREEDY)]
        ref_bytes = ref.memory()[0]["weight_bytes"]
    monkeypatch.delenv("PARALLAX_GGUF_DEQUANTIZE")
    scale = float(ref_logits.nan_to_num().abs().max())
    logits = {}
    for act, path_name in (("f32", "auto"), ("q8", "kernel"), ("q8", "torch")):
        monkeypatch.setenv("PARALLAX_GGUF_ACTIVATIONS", act)
        monkeypatch.setenv("PARALLAX_CPU_MATMUL", path_name)
        with parallax.LLM(path) as llm:   # exact activations: no kernel, dequantised
            assert set(_weight_formats(llm).values()) == {fmt if act == "q8" else "float"}
            logits[act, path_name] = llm.logits(PROMPTS)
            if act == "f32":
                assert [o.token_ids for o in llm.generate(PROMPTS, **GREEDY)] == ref_tokens
            if act == "q8":
                q_bytes = llm.memory()[0]["weight_bytes"]
    torch.testing.assert_close(logits["f32", "auto"], ref_logits, atol=1e-4 * scale, rtol=0,
                               equal_nan=True)
    torch.testing.assert_close(logits["q8", "kernel"], logits["q8", "torch"], atol=5e-2 * scale,
                               rtol=0, equal_nan=True)
    with parallax.loading.gguf.GGUFCheckpoint(path) as ckpt:
        mats = sum(int(np.prod(ckpt.shape(n))) for n in ckpt.names() if len(ckpt.shape(n)) == 2)
    assert ref_bytes - q_bytes == mats * 4 - mats // 256 * reference.GGUF_BLOCKS[fmt][1]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act", ["q8", "f32"])
@pytest.mark.parametrize("kw", [dict(tp=2), dict(pp=2)], ids=["tp2", "pp2"])
def test_layouts_match_one_process(tmp_path, monkeypatch, kw, fmt, act):
    """tp=2 / pp=2 with block weights equal one process with block weights, with either kind
    of activations (PARALLAX_GGUF_ACTIVATIONS): greedy tokens equal and logits within 1e-5
    of their scale, except tp=2 with 8-bit activations; every rank holds its share in blocks
    (intermediate 128: tp=2 splits K at block edges). tp reorders the o_proj/down_proj sums;
    with 8-bit activations an ulp of difference can move a code of the next matmul's input
    by one step, so there the logits are held to the quantization's own error (5e-2 of their
    scale, test_model_q8_activations' bound) and tokens are not compared. pp moves whole
    layers, sums unchanged: exact in both modes."""
    import parallax
    monkeypatch.setenv("PARALLAX_GGUF_ACTIVATIONS", act)
    strict = act == "f32" or "pp" in kw
    path = tiny_gguf(tmp_path, True, fmt, intermediate_size=128)
    with parallax.LLM(path) as one:
        ref_tokens = [o.token_ids for o in one.generate(PROMPTS, **GREEDY)]
        ref_logits = one.logits(PROMPTS)
        one_bytes = one.memory()[0]["weight_bytes"]
    with parallax.LLM(path, threads_per_rank=1, **kw) as llm:
        tokens = [o.token_ids for o in llm.generate(PROMPTS, **GREEDY)]
        assert tokens == ref_tokens or not strict
        scale = float(ref_logits.nan_to_num().abs().max())
        torch.testing.assert_close(llm.logits(PROMPTS), ref_logits, rtol=0, equal_nan=True,
                                   atol=(1e-5 if strict else 5e-2) * scale)
        per_rank = [m["weight_bytes"] for m in llm.memory()]
    # Quantized shards: every rank holds well under the one-process Q8_0 total.
    assert all(b < 0.8 * one_bytes for b in per_rank), (per_rank, one_bytes)
    if "tp" in kw:     # block rows and whole blocks split exactly; the fp32 norms (2 per
        norms = (2 * 4 + 1) * 64 * 4       # layer + the final one, hidden 64) are replicated
        assert sum(per_rank) == one_bytes + norms, (per_rank, one_bytes)


@pytest.mark.timeout(300)
def test_tp_split_through_a_block_falls_back_to_float(tmp_path, caplog):
    """intermediate 96 at tp=2: down_proj's K shard [48, 96) cuts a Q8_0 block, so that
    layer is dequantised to fp32 with a warning and the rest stays Q8_0 (rank 1's shard,
    built in this process: building reads weights only, no collectives)."""
    import logging
    import parallax
    from parallax.loading.gguf import GGUFCheckpoint
    from parallax.models.loader import build_model
    from parallax.parallel.context import ParallelContext
    path = tiny_gguf(tmp_path, False)                     # intermediate_size 96
    ctx = ParallelContext(rank=1, world_size=2, tp_size=2)
    with GGUFCheckpoint(path) as ckpt, caplog.at_level(logging.WARNING):
        model = build_model(ckpt, ctx, torch.float32)
    formats = {n: m.quant_method.name for n, m in model.named_modules()
               if getattr(m, "quant_method", None) is not None}
    assert {f for n, f in formats.items() if n.endswith("down_proj")} == {"float"}
    assert {f for n, f in formats.items() if not n.endswith("down_proj")} == {"q8_0"}
    assert "cuts Q8_0 blocks" in caplog.text


@pytest.mark.parametrize("fmt", FORMATS)
def test_chunked_dequantise_path_matches_twin(fmt, monkeypatch):
    """The dispatcher's torch path (dequantise a few rows at a time) gives the twin's result;
    a tiny chunk forces several chunks and a ragged last one."""
    monkeypatch.setattr(cpu, "DEQUANT_CHUNK_BYTES", 4 * 64 * 5)      # 5 rows a chunk
    g = torch.Generator().manual_seed(1)
    qw = block_bytes(torch.randn(23, 64, generator=g).numpy(), FORMATS[fmt])
    x, bias = torch.randn(3, 64, generator=g), torch.randn(23, generator=g)
    torch.testing.assert_close(cpu.block_linear_dequant(fmt, x, qw, bias),
                               getattr(reference, f"{fmt}_linear")(x, qw, bias),
                               rtol=1e-6, atol=1e-6)


def test_raw_slice_through_a_block_refused(tmp_path):
    """GGUFCheckpoint.read_quantized: a K slice must start and end on block boundaries;
    whole blocks come back as the file's bytes (equal to the full read's columns)."""
    from parallax.errors import CheckpointError
    from parallax.loading.gguf import GGUFCheckpoint
    path = tiny_gguf(tmp_path, False, intermediate_size=128)
    name = "model.layers.0.mlp.down_proj.weight"                  # (64, 128)
    with GGUFCheckpoint(path) as ckpt:
        full = ckpt.read_quantized(name)
        assert full.shape == (64, 128 // 32 * 34) and full.dtype == torch.uint8
        assert torch.equal(ckpt.read_quantized(name, 1, 64, 64), full[:, 2 * 34:])
        assert torch.equal(reference.q8_0_dequantize(full), ckpt.read(name))
        with pytest.raises(CheckpointError, match="block boundaries"):
            ckpt.read_quantized(name, 1, 48, 48)

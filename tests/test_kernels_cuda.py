"""Every CUDA kernel against its torch reference (ops/reference.py) on a GPU.

Error is measured flash-attention style: ||out - ref|| / ||ref|| against a float64 (or float32
where the reference computes in fp32) oracle, and must be at most twice the error plain torch
makes on the same low-precision inputs, plus a small eps. Inputs are fresh random draws,
outputs are poisoned with NaN before each run (so an unwritten element fails), and cache rows
past each sequence's length are poisoned too (so a read past the end fails).
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("needs an NVIDIA GPU", allow_module_level=True)

import parallax.ops as ops  # noqa: E402
from parallax.ops import cuda as C  # noqa: E402
from parallax.ops import reference as ref  # noqa: E402

DEV = "cuda"
EPS = {torch.bfloat16: 2e-4, torch.float16: 5e-5}


@pytest.fixture(scope="module", autouse=True)
def extension():
    assert C.load_extension(), f"the CUDA extension did not load: {C.load_error()}"
    assert ops.active_backend() == "cuda"


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    out, want = out.double(), want.double()
    assert torch.isfinite(out).all(), "non-finite values in the kernel output"
    return ((out - want).norm() / want.norm().clamp_min(1e-30)).item()


def check(out, want, torch_lowp, dtype, what=""):
    err, base = rel_err(out, want), rel_err(torch_lowp, want)
    assert err <= 2 * base + EPS[dtype], f"{what}: kernel err {err:.3e} vs torch {base:.3e}"


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


# ----------------------------------------------------------------------------- decode attention

def decode_oracle(q, kc, vc, lens, scale):
    """float64 attention, one sequence at a time over exactly its valid rows."""
    b, hq, d = q.shape
    rep = hq // kc.shape[1]
    out = torch.empty(b, hq, d, dtype=torch.float64, device=q.device)
    for i, n in enumerate(lens.tolist()):
        k = kc[i, :, :n].double().repeat_interleave(rep, 0)         # (Hq, n, D)
        v = vc[i, :, :n].double().repeat_interleave(rep, 0)
        p = torch.softmax((k @ q[i].double()[:, :, None]).squeeze(-1) * scale, dim=-1)
        out[i] = (p[:, None, :] @ v).squeeze(1)
    return out


DECODE_CASES = [
    # (batch, Hq, Hk, D, context lengths: a list cycled over the batch)
    (1, 8, 8, 128, [1]),
    (1, 32, 8, 128, [16384]),
    (2, 9, 3, 64, [4097, 63]),
    (3, 32, 4, 128, [1000, 65, 8191]),
    (4, 24, 8, 64, [257, 1, 129, 3000]),
    (8, 32, 8, 128, [4096, 17, 2049, 511, 1, 33, 777, 1234]),
    (16, 16, 16, 64, [100, 2000]),
    (32, 32, 8, 128, [1, 5, 64, 300, 1025, 2047, 512, 31]),
    (5, 56, 8, 128, [3333]),     # GQA 7: bucket 8 with one masked head
    (2, 16, 1, 128, [999, 4000]),  # MQA 16: two query chunks per KV head
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,hq,hk,d,lens", DECODE_CASES)
def test_decode_attention(b, hq, hk, d, lens, dtype):
    lens_t = torch.tensor([lens[i % len(lens)] for i in range(b)], dtype=torch.int32)
    s_cap = int(lens_t.max()) + 37
    q = torch.randn(b, hq, d, device=DEV, dtype=dtype)
    # caches as a slice of a larger head dim: batch/head strides are not the contiguous ones
    kbig = torch.randn(b, hk + 2, s_cap, d, device=DEV, dtype=dtype)
    vbig = torch.randn(b, hk + 2, s_cap, d, device=DEV, dtype=dtype)
    kc, vc = kbig[:, 1:hk + 1], vbig[:, 1:hk + 1]
    for i, n in enumerate(lens_t.tolist()):   # never read past the end
        kc[i, :, n:] = float("nan")
        vc[i, :, n:] = float("nan")
    lens_d = lens_t.to(DEV)
    scale = 1.0 / math.sqrt(d)
    want = decode_oracle(q, kc, vc, lens_t, scale)
    out = nan_like(q)
    torch.ops.parallax.decode_attention(out, q, kc, vc, lens_d, scale)
    # plain torch in the same precision, on caches without the poison
    kc_clean, vc_clean = kc.nan_to_num(0.0), vc.nan_to_num(0.0)
    torch_lowp = ref.decode_attention(q, kc_clean, vc_clean, lens_d, scale)
    check(out, want, torch_lowp, dtype, f"decode b={b} hq={hq} hk={hk} d={d}")
    # the dispatcher routes GPU tensors to the kernel and gives the same answer
    again = ops.decode_attention(q, kc, vc, lens_d, scale)
    assert torch.equal(again, out)


@pytest.mark.parametrize("ctx", [2048, 8])   # several splits, one split
@pytest.mark.parametrize("bad", [0, -5, 4097])
def test_decode_attention_bad_context_lens(bad, ctx):
    """A length outside [1, S]: the kernel reads nothing (NaN-poisoned caches, and the sanitizer
    run) and answers NaN for that sequence only; the dispatcher refuses it on the host."""
    from parallax.errors import KernelInputError
    b, hq, hk, d, s_cap = 3, 8, 2, 128, 4096
    q = torch.randn(b, hq, d, device=DEV, dtype=torch.bfloat16)
    kc = torch.randn(b, hk, s_cap, d, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    kc[1], vc[1] = float("nan"), float("nan")
    lens = torch.tensor([ctx, bad, ctx], dtype=torch.int32, device=DEV)
    out = torch.zeros_like(q)
    torch.ops.parallax.decode_attention(out, q, kc, vc, lens, d ** -0.5)
    assert out[1].isnan().all() and torch.isfinite(out[[0, 2]]).all()
    with pytest.raises(KernelInputError, match=r"context_lens\[1\]"):
        ops.decode_attention(q, kc, vc, lens, d ** -0.5)


# ----------------------------------------------------------------------------- int8 linear

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13, 16])
@pytest.mark.parametrize("n,k,bias", [(4096, 4096, False), (1000, 1040, True),
                                      (4096, 14336, False), (14336, 4096, True), (7, 16, True)])
def test_int8_linear(m, n, k, bias, dtype):
    w = torch.randn(n, k, device=DEV, dtype=torch.float32) * 0.02
    qw, scales = ref.quantize_int8(w.to(dtype))
    x = torch.randn(m, k, device=DEV, dtype=dtype)
    b = torch.randn(n, device=DEV, dtype=dtype) if bias else None
    want = x.double() @ (qw.double() * scales.double()[:, None]).T
    if b is not None:
        want = want + b.double()
    out = torch.full((m, n), float("nan"), device=DEV, dtype=dtype)
    torch.ops.parallax.int8_linear(out, x, qw, scales, b)
    check(out, want, ref.int8_linear(x, qw, scales, b), dtype, f"int8 m={m} n={n} k={k}")
    y = ops.int8_linear(x.view(1, m, k), qw, scales, b)     # leading dims through the wrapper
    assert y.shape == (1, m, n) and torch.equal(y[0], out)


# ----------------------------------------------------------------------------- norms

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 4096), (7, 576), (3, 11, 5120), (5, 100), (2, 8192)])
def test_rms_norm_and_add_rms_norm(shape, dtype):
    d = shape[-1]
    x = torch.randn(shape, device=DEV, dtype=dtype)
    r = torch.randn(shape, device=DEV, dtype=dtype)
    w = torch.randn(d, device=DEV, dtype=dtype)
    eps = 1e-5

    def oracle(v):
        v = v.double()
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * w.double()

    out = nan_like(x)
    torch.ops.parallax.rms_norm(out, x, w, eps)
    check(out, oracle(x), ref.rms_norm(x, w, eps), dtype, "rms_norm")

    out, res = nan_like(x), nan_like(x)
    torch.ops.parallax.add_rms_norm(out, res, x, r, w, eps)
    want_out, want_res = ref.add_rms_norm(x, r, w, eps)
    assert torch.equal(res, want_res)                   # x + r rounded once, like torch
    check(out, oracle(want_res), want_out, dtype, "add_rms_norm")


# ----------------------------------------------------------------------------- rotary

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,t,hq,hk,d", [(1, 1, 32, 8, 128), (4, 17, 9, 3, 64),
                                         (2, 300, 32, 8, 128), (3, 5, 8, 8, 64)])
def test_rotary_in_place_on_strided_views(b, t, hq, hk, d, dtype):
    # q, k as views of a fused qkv projection, like the model makes them
    qkv = torch.randn(b, t, (hq + 2 * hk) * d, device=DEV, dtype=dtype)
    q = qkv[..., : hq * d].view(b, t, hq, d)
    k = qkv[..., hq * d: (hq + hk) * d].view(b, t, hk, d)
    v_before = qkv[..., (hq + hk) * d:].clone()
    theta = torch.rand(b, t, d // 2, device=DEV) * 100
    cos, sin = theta.cos(), theta.sin()
    want_q, want_k = ref.rotary_embedding(q.clone(), k.clone(), cos, sin)

    def oracle(x):
        x1, x2 = x.double().chunk(2, -1)
        c, s = cos.double()[:, :, None], sin.double()[:, :, None]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)

    oq, ok = oracle(q), oracle(k)
    rq, rk = ops.rotary_embedding(q, k, cos, sin)
    assert rq.data_ptr() == q.data_ptr() and rk.data_ptr() == k.data_ptr()  # in place
    check(q, oq, want_q, dtype, "rotary q")
    check(k, ok, want_k, dtype, "rotary k")
    assert torch.equal(qkv[..., (hq + hk) * d:], v_before)                 # v untouched


# ----------------------------------------------------------------------------- op registration

def test_opcheck_every_op():
    bf = dict(device=DEV, dtype=torch.bfloat16)
    x, r, w = torch.randn(4, 256, **bf), torch.randn(4, 256, **bf), torch.randn(256, **bf)
    torch.library.opcheck(torch.ops.parallax.rms_norm.default,
                          (torch.empty_like(x), x, w, 1e-5))
    torch.library.opcheck(torch.ops.parallax.add_rms_norm.default,
                          (torch.empty_like(x), torch.empty_like(x), x, r, w, 1e-5))
    q, k = torch.randn(2, 3, 8, 64, **bf), torch.randn(2, 3, 2, 64, **bf)
    cs = torch.rand(2, 3, 32, device=DEV)
    torch.library.opcheck(torch.ops.parallax.rotary_embedding.default, (q, k, cs, cs))
    qd = torch.randn(2, 8, 128, **bf)
    kc, vc = torch.randn(2, 2, 600, 128, **bf), torch.randn(2, 2, 600, 128, **bf)
    lens = torch.tensor([600, 3], dtype=torch.int32, device=DEV)
    torch.library.opcheck(torch.ops.parallax.decode_attention.default,
                          (torch.empty_like(qd), qd, kc, vc, lens, 0.088))
    qw, sc = ref.quantize_int8(torch.randn(96, 256, **bf))
    xs = torch.randn(3, 256, **bf)
    for bias in (None, torch.randn(96, **bf)):
        torch.library.opcheck(torch.ops.parallax.int8_linear.default,
                              (torch.empty(3, 96, **bf), xs, qw, sc, bias))


def test_input_checks_give_actionable_errors():
    bf = dict(device=DEV, dtype=torch.bfloat16)
    q = torch.randn(2, 8, 96, **bf)
    kc = torch.randn(2, 2, 10, 96, **bf)
    lens = torch.tensor([3, 4], dtype=torch.int32, device=DEV)
    with pytest.raises(RuntimeError, match="head dim must be 64 or 128"):
        torch.ops.parallax.decode_attention(torch.empty_like(q), q, kc, kc, lens, 0.1)
    x = torch.randn(4, 64, **bf)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.parallax.rms_norm(torch.empty_like(x), x, torch.randn(32, **bf), 1e-5)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        xf = x.float()
        torch.ops.parallax.rms_norm(torch.empty_like(xf), xf, xf[0], 1e-5)
    # unsupported cases fall back to the reference through the dispatcher
    q96 = torch.randn(2, 8, 96, **bf)
    out = ops.decode_attention(q96, kc, kc, lens, 0.1)
    assert torch.equal(out, ref.decode_attention(q96, kc, kc, lens, 0.1))


def test_torch_compile_traces_the_ops():
    bf = dict(device=DEV, dtype=torch.bfloat16)

    def step(x, r, w, q, kc, vc, lens):
        h, r = ops.add_rms_norm(x, r, w, 1e-5)
        return ops.decode_attention(q, kc, vc, lens, 0.125), h, r

    args = (torch.randn(2, 256, **bf), torch.randn(2, 256, **bf), torch.randn(256, **bf),
            torch.randn(2, 8, 64, **bf), torch.randn(2, 2, 100, 64, **bf),
            torch.randn(2, 2, 100, 64, **bf), torch.tensor([100, 7], dtype=torch.int32,
                                                            device=DEV))
    eager = step(*args)
    compiled = torch.compile(step, fullgraph=True)(*args)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)

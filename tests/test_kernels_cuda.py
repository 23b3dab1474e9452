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


# ----------------------------------------------------------------------------- paged attention

PAGED_EPS = {**EPS, torch.float32: 1e-5}
PAGED_VARIANTS = {"plain": (None, None), "window": (37, None), "softcap": (None, 30.0),
                  "window-softcap": (5, 2.0)}


def paged_case(name, dtype, seed=0):
    import paged_cases as pc
    return pc.case(name, seed=seed, dtype=dtype, device=DEV, strided=name == "mixed-chunked")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", PAGED_VARIANTS)
@pytest.mark.parametrize("name", ["decode-ragged", "prefill-ragged", "mixed-chunked",
                                  "block-boundaries", "odd-block-size", "mqa-16",
                                  "head-dim-256", "block-size-1", "shared-prefix",
                                  "long-decode", "long-prefill", "long-mqa-256"])
def test_paged_attention(name, variant, dtype):
    """Against a float64 oracle (error at most twice torch's in the same dtype), with the
    new tokens' rotated k and v in their slots and nothing else in the caches moved."""
    import paged_cases as pc
    window, softcap = PAGED_VARIANTS[variant]
    c = paged_case(name, dtype, seed=len(variant))
    scale = c["q"].shape[-1] ** -0.5
    a = pc.args(c)
    out = C.paged_attention_with_kvcache(*a, scale, window, softcap)
    want = pc.oracle(c, scale, window, softcap).to(DEV)
    torch_lowp = ref.paged_attention_with_kvcache(*pc.args(c), scale, window, softcap)
    err, base = rel_err(out, want), rel_err(torch_lowp, want)
    assert err <= 2 * base + PAGED_EPS[dtype], f"{name}: kernel err {err:.3e} vs torch {base:.3e}"
    kc, vc = pc.expected_caches(c)
    if dtype == torch.float32:
        torch.testing.assert_close(a[3], kc, atol=1e-6, rtol=1e-6)
    else:   # rotated in fp32 then rounded: an FMA may round one ulp differently
        torch.testing.assert_close(a[3].float(), kc.float(), atol=1e-2, rtol=1e-2)
    assert torch.equal(a[4], vc)
    slots, bs = c["slot_mapping"], kc.shape[2]
    moved = torch.zeros(kc.shape[0] * bs, dtype=torch.bool, device=DEV)
    moved[slots] = True
    flat = lambda x: x.transpose(1, 2).reshape(-1, *x.shape[1:2], x.shape[-1])  # noqa: E731
    assert torch.equal(flat(a[3])[~moved], flat(c["k_cache"])[~moved])
    # the dispatcher (what models/attention.py calls) takes the kernel: the same bits
    again = pc.args(c)
    assert torch.equal(ops.paged_attention_with_kvcache(*again, scale, window, softcap), out)


@pytest.mark.parametrize("bad", ["negative-slot", "slot-beyond-capacity", "zero-length",
                                 "block-beyond-cache", "negative-block", "broken-partition"])
def test_paged_attention_bad_metadata(bad):
    """The kernel: NaN for the bad sequence (every sequence for a broken partition), none of
    its tokens written, the others right. The dispatcher: ParallaxError, caches untouched."""
    import paged_cases as pc
    from parallax.errors import ParallaxError
    c = pc.make_case(5, [(20, 1), (9, 4), (30, 2)], hq=8, hk=2, d=128, bs=8,
                     dtype=torch.bfloat16, device=DEV)
    pc.corrupt(c, bad)
    a, outer = pc.guarded(c)
    out = C.paged_attention_with_kvcache(*a, 0.1)
    torch.cuda.synchronize()
    assert pc.guards_intact(outer), "a write landed outside the cache"
    if bad == "broken-partition":
        assert out.isnan().all()
        assert torch.equal(a[3], c["k_cache"]) and torch.equal(a[4], c["v_cache"])
    else:
        assert out[1:5].isnan().all() and torch.isfinite(out[[0, 5, 6]]).all()
        kc, vc = pc.expected_caches(c, torch.tensor([0, 5, 6]))
        torch.testing.assert_close(a[3].float(), kc.float(), atol=1e-2, rtol=1e-2)
        assert torch.equal(a[4], vc)
    a = pc.args(c)
    with pytest.raises(ParallaxError):
        ops.paged_attention_with_kvcache(*a, 0.1)
    assert torch.equal(a[3], c["k_cache"]) and torch.equal(a[4], c["v_cache"])


def test_paged_attention_layer_runs_the_kernel():
    """models/attention.py's PagedAttention on GPU tensors: the dispatcher picks the kernel
    (kernel_report) and the layer equals the torch reference."""
    import paged_cases as pc
    from parallax.models.attention import AttentionMetadata, PagedAttention
    assert ops.kernel_report()["ops"]["paged_attention_with_kvcache"] == "cuda"
    c = pc.case("mixed-chunked", dtype=torch.bfloat16, device=DEV)
    meta = AttentionMetadata(positions=torch.zeros(c["q"].shape[0], device=DEV),
                             slot_mapping=c["slot_mapping"], block_tables=c["block_tables"],
                             context_lens=c["context_lens"],
                             query_start_loc=c["query_start_loc"])
    layer = PagedAttention(9, 3, 64, 0.125, window=20, softcap=50.0)
    kc, vc = c["k_cache"].clone(), c["v_cache"].clone()
    out = layer(c["q"], c["k"], c["v"], c["cos"], c["sin"], meta, kc, vc)
    want = ref.paged_attention_with_kvcache(*pc.args(c), 0.125, 20, 50.0)
    err = rel_err(out, pc.oracle(c, 0.125, 20, 50.0).to(DEV))
    assert err <= 2 * rel_err(want, pc.oracle(c, 0.125, 20, 50.0).to(DEV)) + EPS[torch.bfloat16]


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
    import paged_cases as pc
    c = pc.make_case(1, [(20, 1), (9, 4)], hq=8, hk=2, d=64, bs=8, dtype=torch.bfloat16,
                     device=DEV)
    a = pc.args(c)
    torch.library.opcheck(torch.ops.parallax.paged_attention_with_kvcache.default,
                          (torch.empty_like(c["q"]), *a[:5], a[5].contiguous(),
                           a[6].contiguous(), *a[7:], 0.125, 0, 0.0))
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

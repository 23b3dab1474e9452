"""CUDA kernels run on the CPU through the emulation in tests/cuda_emu (their own source,
g++, one std::thread per CUDA thread), against float64 oracles. The paged attention kernel
(csrc/paged_attention.cu): ragged mixed prefill/decode batches, block boundaries, shared
prefix blocks, GQA, every head dim and dtype, sliding window, soft-cap, split-KV; the cache
writes; the device-side checks of bad metadata. The decode attention kernel
(csrc/decode_attention.cu): ragged lengths, GQA buckets, splits, bad lengths. The norm,
rotary and int8 kernels against their references. The same problems run on a GPU in
test_kernels_cuda.py.
"""

from __future__ import annotations

import pytest
import torch

import cuda_emu
import paged_cases as pc
from parallax.ops import reference as ref

pytestmark = pytest.mark.skipif(cuda_emu.CXX is None or cuda_emu.CUDA_INCLUDE is None,
                                reason="needs g++ and the CUDA toolkit's headers")

EPS = {torch.float32: 1e-5, torch.bfloat16: 2e-4, torch.float16: 5e-5}
# (dtype, window, softcap, splits): each case runs in every variant
VARIANTS = {"f32": (torch.float32, None, None, 1),
            "f32-window-softcap-split3": (torch.float32, 6, 1.5, 3),
            "bf16": (torch.bfloat16, None, None, 1),
            "f16-window-split2": (torch.float16, 11, None, 2)}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return cuda_emu.build(str(tmp_path_factory.mktemp("cuda_emu")))


@pytest.fixture(scope="module")
def small_lib(tmp_path_factory):
    return cuda_emu.build(str(tmp_path_factory.mktemp("cuda_emu")),
                          ("norm.cu", "rotary.cu", "int8_linear.cu"))


@pytest.fixture(scope="module")
def decode_lib(tmp_path_factory):
    return cuda_emu.build(str(tmp_path_factory.mktemp("cuda_emu")), ("decode_attention.cu",))


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite values in the kernel output"
    return ((out.double() - want).norm() / want.norm()).item()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", pc.CASES)
def test_kernel_matches_oracle_and_writes_only_new_slots(lib, name, variant):
    dtype, window, softcap, splits = VARIANTS[variant]
    c = pc.case(name, dtype=dtype, strided=name == "mixed-chunked")
    d = c["q"].shape[-1]
    scale = d ** -0.5
    a = pc.args(c)
    out, status = cuda_emu.paged_attention(lib, *a, scale, window, softcap, splits)
    assert status.tolist() == [0] * (len(status) - 1) + [0]
    want = pc.oracle(c, scale, window, softcap)
    base = ref.paged_attention_with_kvcache(*pc.args(c), scale, window, softcap)
    err, base_err = rel_err(out, want), rel_err(base, want)
    assert err <= 2 * base_err + EPS[dtype], f"kernel {err:.3e} vs torch {base_err:.3e}"
    kc, vc = pc.expected_caches(c)
    torch.testing.assert_close(a[3], kc, atol=0, rtol=0) if dtype == torch.float32 \
        else torch.testing.assert_close(a[3].float(), kc.float(), atol=1e-2, rtol=1e-2)
    assert torch.equal(a[4], vc)
    # nothing but the new slots moved (the tolerance above must not hide a stray write)
    slots = c["slot_mapping"]
    bs = kc.shape[2]
    moved = torch.zeros(kc.shape[0] * bs, dtype=torch.bool)
    moved[slots] = True
    flat = lambda x: x.transpose(1, 2).reshape(-1, *x.shape[1:2], x.shape[-1])  # noqa: E731
    assert torch.equal(flat(a[3])[~moved], flat(c["k_cache"])[~moved])



@pytest.mark.timeout(300)
def test_blocks_before_the_window_may_be_freed(lib):
    """The engine frees blocks wholly behind an all-sliding model's window (their table
    entries become -1): the kernel neither reads nor rejects them."""
    window, bs = 10, 8
    c = pc.make_case(3, [(70, 1), (41, 3)], hq=4, hk=2, d=64, bs=bs)
    scale = 64 ** -0.5
    full, _ = cuda_emu.paged_attention(lib, *pc.args(c), scale, window, None, 1)
    freed = dict(c, block_tables=c["block_tables"].clone())
    for b, (length, n) in enumerate([(70, 1), (41, 3)]):
        freed["block_tables"][b, :ref.first_block_read(length, n, bs, window)] = -1
    assert (freed["block_tables"] == -1).sum() > (c["block_tables"] == -1).sum()
    out, status = cuda_emu.paged_attention(lib, *pc.args(freed), scale, window, None, 1)
    assert status.tolist() == [0, 0, 0]
    torch.testing.assert_close(out, full, atol=0, rtol=0)

BAD = {  # what breaks sequence 1 of three -> the status code the kernel reports
    "negative-slot": 1, "slot-beyond-capacity": 1, "length-below-new-tokens": 2,
    "length-beyond-table": 2, "block-beyond-cache": 3, "negative-block": 3}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("bad", BAD)
def test_bad_sequence_gets_nan_and_writes_nothing(lib, bad, splits):
    c = pc.make_case(5, [(20, 1), (9, 4), (30, 2)], hq=4, hk=2, d=64, bs=8)
    pc.corrupt(c, bad)
    a, outer = pc.guarded(c)
    out, status = cuda_emu.paged_attention(lib, *a, 0.125, None, None, splits)
    assert pc.guards_intact(outer), "a write landed outside the cache"
    assert status.tolist() == [0, BAD[bad], 0, 0]
    assert out[1:5].isnan().all()                          # sequence 1's four tokens
    good = torch.tensor([0, 5, 6])
    assert torch.isfinite(out[good]).all()
    want = pc.oracle({**c, **_only(c, [0, 2])}, 0.125)
    torch.testing.assert_close(out[good].double(), want, atol=1e-5, rtol=1e-5)
    kc, vc = pc.expected_caches(c, good)                   # the good tokens' slots only
    assert torch.equal(a[3], kc) and torch.equal(a[4], vc)


def _only(c: dict, seqs: list[int]) -> dict:
    """The metadata of a case restricted to some of its sequences (their tokens in order)."""
    qsl = c["query_start_loc"].tolist()
    toks = torch.cat([torch.arange(qsl[b], qsl[b + 1]) for b in seqs])
    n = [qsl[b + 1] - qsl[b] for b in seqs]
    return dict(q=c["q"][toks], k=c["k"][toks], v=c["v"][toks], cos=c["cos"][toks],
                sin=c["sin"][toks], slot_mapping=c["slot_mapping"][toks],
                block_tables=c["block_tables"][seqs], context_lens=c["context_lens"][seqs],
                query_start_loc=torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(),
                                             dtype=torch.int32))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("qsl", [[0, 1, 1, 7], [0, 5, 3, 7], [1, 2, 5, 7], [0, 1, 5, 6],
                                 [0, 1, 5, 9], [-2, 1, 5, 7]])
def test_broken_query_start_loc_makes_everything_nan_and_writes_nothing(lib, qsl, splits):
    """A sequence without tokens, a decreasing or short/long partition (the batch has 7
    tokens): no sequence owns well-defined rows, so all are bad."""
    c = pc.make_case(6, [(20, 1), (9, 4), (30, 2)], hq=4, hk=2, d=64, bs=8)
    c["query_start_loc"] = torch.tensor(qsl, dtype=torch.int32)
    a, outer = pc.guarded(c)
    out, status = cuda_emu.paged_attention(lib, *a, 0.125, None, None, splits)
    assert pc.guards_intact(outer), "a write landed outside the cache"
    assert status.tolist() == [4, 4, 4, 1]
    assert out.isnan().all()
    assert torch.equal(a[3], c["k_cache"]) and torch.equal(a[4], c["v_cache"])


def _decode_oracle(q, kc, vc, lens, scale):
    b, hq, d = q.shape
    rep = hq // kc.shape[1]
    out = torch.empty(b, hq, d, dtype=torch.float64)
    for i, n in enumerate(lens.tolist()):
        k = kc[i, :, :n].double().repeat_interleave(rep, 0)          # (Hq, n, D)
        v = vc[i, :, :n].double().repeat_interleave(rep, 0)
        p = torch.softmax((k @ q[i].double()[:, :, None]).squeeze(-1) * scale, dim=-1)
        out[i] = (p[:, None, :] @ v).squeeze(1)
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("b,hq,hk,d,lens,splits,dtype", [
    (3, 9, 3, 64, [5, 70, 1], 1, torch.bfloat16),
    (2, 8, 2, 128, [300, 33], 3, torch.float16),
    (2, 16, 1, 64, [40, 9], 2, torch.bfloat16),     # MQA: two query chunks per KV head
    (2, 14, 2, 128, [100, 64], 2, torch.float16),   # GQA 7: bucket 8, one head masked
])
def test_decode_attention_kernel_matches_oracle(decode_lib, b, hq, hk, d, lens, splits, dtype):
    """Cache rows past each length hold NaN: a read past the end would show."""
    g = torch.Generator().manual_seed(b * hq + d)
    s = max(lens) + 9
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    kc = torch.randn(b, hk + 1, s, d, generator=g).to(dtype)[:, 1:]   # strided heads
    vc = torch.randn(b, hk + 1, s, d, generator=g).to(dtype)[:, 1:]
    lens_t = torch.tensor(lens, dtype=torch.int32)
    want = _decode_oracle(q, kc, vc, lens_t, d ** -0.5)
    base = ref.decode_attention(q, kc, vc, lens_t, d ** -0.5)
    for i, n in enumerate(lens):
        kc[i, :, n:] = float("nan")
        vc[i, :, n:] = float("nan")
    out = cuda_emu.decode_attention(decode_lib, q, kc, vc, lens_t, d ** -0.5, splits)
    err, base_err = rel_err(out, want), rel_err(base, want)
    assert err <= 2 * base_err + EPS[dtype], f"kernel {err:.3e} vs torch {base_err:.3e}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("bad", [0, -5, 301])
def test_decode_attention_kernel_bad_length_is_nan(decode_lib, bad, splits):
    q = torch.randn(3, 8, 64).to(torch.bfloat16)
    kc = torch.randn(3, 2, 300, 64).to(torch.bfloat16)
    vc = torch.randn_like(kc)
    kc[1], vc[1] = float("nan"), float("nan")
    lens = torch.tensor([40, bad, 300], dtype=torch.int32)
    out = cuda_emu.decode_attention(decode_lib, q, kc, vc, lens, 0.125, splits)
    assert out[1].isnan().all() and torch.isfinite(out[[0, 2]]).all()


HALF = [torch.bfloat16, torch.float16]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(3, 100), (2, 576), (1, 4096)])   # scalar and vector paths
def test_norm_kernels_match_reference(small_lib, shape, dtype):
    g = torch.Generator().manual_seed(shape[1])
    x, r = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    w = torch.randn(shape[1], generator=g).to(dtype)
    out, res = cuda_emu.add_rms_norm(small_lib, x, r, w, 1e-5)
    want_out, want_res = ref.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(res, want_res)                    # x + r rounded once, like torch
    torch.testing.assert_close(out, want_out)
    out, _ = cuda_emu.add_rms_norm(small_lib, x, None, w, 1e-5)
    torch.testing.assert_close(out, ref.rms_norm(x, w, 1e-5))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", HALF)
def test_rotary_kernel_rotates_strided_views_in_place(small_lib, dtype):
    qkv = torch.randn(2, 5, 15 * 64).to(dtype)           # q, k, v views of one projection
    q, k = qkv[..., :9 * 64].view(2, 5, 9, 64), qkv[..., 9 * 64:12 * 64].view(2, 5, 3, 64)
    theta = torch.rand(2, 5, 32) * 10
    want_q, want_k = ref.rotary_embedding(q.clone(), k.clone(), theta.cos(), theta.sin())
    v_before = qkv[..., 12 * 64:].clone()
    cuda_emu.rotary_embedding(small_lib, q, k, theta.cos(), theta.sin())
    torch.testing.assert_close(q, want_q)
    torch.testing.assert_close(k, want_k)
    assert torch.equal(qkv[..., 12 * 64:], v_before)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("m,n,k", [(1, 96, 256), (3, 37, 528), (16, 64, 64)])
def test_int8_kernel_matches_oracle(small_lib, m, n, k, dtype):
    g = torch.Generator().manual_seed(m * n)
    qw, sc = ref.quantize_int8(torch.randn(n, k, generator=g).to(dtype))
    x, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    want = x.double() @ (qw.double() * sc.double()[:, None]).T + b.double()
    out = cuda_emu.int8_linear(small_lib, x, qw, sc, b)
    err, base_err = rel_err(out, want), rel_err(ref.int8_linear(x, qw, sc, b), want)
    assert err <= 2 * base_err + EPS[dtype], f"kernel {err:.3e} vs torch {base_err:.3e}"

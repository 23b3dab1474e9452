"""csrc/cpu/ggml_attention.c (llama.cpp's CPU flash attention over an F16 cache, bit for bit)
against its torch twin ops/ggml_reference.py, for every kernel variant this CPU runs: the
generic build equals the twin's plain-C arithmetic bit for bit, the SIMD builds the twin's
emulation of their ggml build (avx512* -> "avx512", avx2/avxvnni -> "avx2") within 1e-6; the
twin itself against float64 attention. Bit-equality with llama.cpp's own recorded outputs is
checked outside the suite (it needs llama.cpp's dumps; the report of the branch gives counts).
"""

from __future__ import annotations

import math

import pytest
import torch

from parallax.ops import cpu
from parallax.ops.ggml_reference import ggml_attention

HERE = cpu.supported_variants()
ISA = {"avx512vnni": "avx512", "avx512": "avx512", "avxvnni": "avx2", "avx2": "avx2",
       "generic": "generic"}


def call(var, q, k, v, pos, scale, step_rows, n_kv=0, n_threads=1):
    """The kernel of variant ``var`` (through its torch op) on float32 tensors."""
    q, k, v = (x.float().contiguous() for x in (q, k, v))
    return cpu.ggml_attention(q, k, v, pos.to(torch.int32).contiguous(), scale, step_rows,
                              n_kv, n_threads, isa=var)


def problem(seed, T, n_past, Hq, Hk, D):
    """Random q (T, Hq, D); k, v (S, Hk, D) of fp16 values; causal pos n_past.."""
    g = torch.Generator().manual_seed(seed)
    S = n_past + T
    q = torch.randn(T, Hq, D, generator=g) * 2
    k = torch.randn(S, Hk, D, generator=g).half().float()
    v = torch.randn(S, Hk, D, generator=g).half().float()
    return q, k, v, torch.arange(n_past, S, dtype=torch.int32)


def float64_attention(q, k, v, pos, scale):
    """Softmax attention in float64: row t over keys 0..pos[t]; GQA by repeated kv heads."""
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, 1)                     # (S, Hq, D)
    vv = v.double().repeat_interleave(group, 1)
    s = torch.einsum("thd,shd->hts", q.double(), kk) * scale       # (Hq, T, S)
    keep = torch.arange(k.shape[0])[None, :] <= pos.long()[:, None]
    s = s.masked_fill(~keep[None], -math.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)                     # a row with no key: 0
    return torch.einsum("hts,shd->thd", p, vv)


def assert_matches_twin(var, out, twin):
    if var == "generic":
        assert torch.equal(out, twin), (out - twin).abs().max()
    else:
        err = (out - twin).abs().max().item()
        assert err <= 1e-6 * twin.abs().max().item(), f"{var}: max |diff| {err}"


# (T, n_past, Hq, Hk, D, step_rows): one_chunk below 64 step rows, tiled from 64
CASES = {
    "one_chunk_gqa": (5, 7, 4, 2, 64, 5),
    "decode_group3": (1, 19, 6, 2, 64, 1),
    "one_chunk_d40_leftovers": (3, 4, 2, 1, 40, 3),
    "tiled_two_kv_tiles": (70, 10, 4, 1, 24, 70),
    "tiled_d64": (66, 0, 2, 2, 64, 66),
    "tiled_rows_of_a_bigger_step": (8, 60, 3, 3, 16, 100),
}
# split-KV decode: (n_past, Hq, Hk, D, n_kv, n_threads); n_kv is llama.cpp's padded KV length
SPLIT = {
    "two_threads": (399, 4, 2, 16, 512, 2),
    "three_threads_last_chunk_empty": (299, 2, 1, 24, 512, 3),
    "not_split_below_512": (199, 2, 1, 16, 256, 2),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("var", HERE)
def test_kernel_equals_twin(var, case):
    T, n_past, Hq, Hk, D, step = CASES[case]
    q, k, v, pos = problem(sum(CASES[case]), T, n_past, Hq, Hk, D)
    out = call(var, q, k, v, pos, D ** -0.5, step)
    assert_matches_twin(var, out, ggml_attention(q, k, v, pos, D ** -0.5, step, isa=ISA[var]))


@pytest.mark.parametrize("case", SPLIT)
@pytest.mark.parametrize("var", HERE)
def test_split_kv_equals_twin(var, case):
    n_past, Hq, Hk, D, n_kv, nth = SPLIT[case]
    q, k, v, pos = problem(n_past, 1, n_past, Hq, Hk, D)
    out = call(var, q, k, v, pos, D ** -0.5, 1, n_kv=n_kv, n_threads=nth)
    twin = ggml_attention(q, k, v, pos, D ** -0.5, 1, isa=ISA[var], n_kv=n_kv, n_threads=nth)
    assert_matches_twin(var, out, twin)
    unsplit = call(var, q, k, v, pos, D ** -0.5, 1)   # n_kv 0: never split
    if n_kv < 512:
        assert torch.equal(out, unsplit)
    else:   # the split's fp16 accumulators restart per chunk: another result
        assert not torch.equal(out, unsplit)


@pytest.mark.parametrize("step", [4, 64])
def test_twin_is_attention(step):
    """The twin against float64 attention, masking included (arbitrary pos, a row with no
    key): one_chunk keeps Q and the V accumulator in fp16 (errors ~ 2^-11 relative per step),
    tiled computes in float32."""
    q, k, v, _ = problem(step, 4, 6, 4, 2, 32)
    pos = torch.tensor([3, 0, -1, 9], dtype=torch.int32)
    want = float64_attention(q, k, v, pos, 32 ** -0.5)
    for isa in ("generic", "avx512", "avx2"):
        out = ggml_attention(q, k, v, pos, 32 ** -0.5, step, isa=isa)
        assert torch.equal(out[2], torch.zeros_like(out[2]))
        tol = 4e-3 if step < 64 else 1e-5
        assert (out.double() - want).abs().max() <= tol * want.abs().max()


@pytest.mark.parametrize("step", [4, 64])
@pytest.mark.parametrize("var", HERE)
def test_masking_by_pos(var, step):
    """Non-causal pos patterns (a row with no key: zeros), both paths, against the twin."""
    q, k, v, _ = problem(7 + step, 4, 6, 4, 2, 32)
    pos = torch.tensor([3, 0, -1, 9], dtype=torch.int32)
    out = call(var, q, k, v, pos, 32 ** -0.5, step)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert_matches_twin(var, out, ggml_attention(q, k, v, pos, 32 ** -0.5, step, isa=ISA[var]))


@pytest.mark.parametrize("var", HERE)
def test_tiled_rows_do_not_depend_on_their_batch(var):
    """llama.cpp groups rows into Q tiles by its threads' chunks; a row's result is its own:
    rows 20..44 alone equal the same rows of the whole 70-row call, bit for bit."""
    q, k, v, pos = problem(3, 70, 10, 4, 2, 32)
    whole = call(var, q, k, v, pos, 32 ** -0.5, 70)
    part = call(var, q[20:45], k, v, pos[20:45], 32 ** -0.5, 70)
    assert torch.equal(part, whole[20:45])


def test_split_twin_is_attention():
    q, k, v, pos = problem(5, 1, 299, 2, 1, 24)
    want = float64_attention(q, k, v, pos, 24 ** -0.5)
    out = ggml_attention(q, k, v, pos, 24 ** -0.5, 1, n_kv=512, n_threads=3)
    assert (out.double() - want).abs().max() <= 4e-3 * want.abs().max()


@pytest.mark.parametrize("D,Hq,Hk", [(0, 2, 1), (2048, 2, 1), (16, 3, 2)])
def test_unsupported_input_is_refused(D, Hq, Hk):
    """A head dim outside 1..1024 or kv heads not dividing q heads: an error, nothing run."""
    q, k, v = torch.zeros(2, Hq, D), torch.zeros(3, Hk, D), torch.zeros(3, Hk, D)
    for var in HERE:
        with pytest.raises(RuntimeError, match="ggml_attention"):
            call(var, q, k, v, torch.arange(1, 3), 0.25, 2)
    q, k, v, pos = problem(0, 1, 2, 2, 1, 16)
    for n_kv, nth in [(2, 1), (512, 0)]:   # n_kv below S, no thread
        with pytest.raises(RuntimeError, match="ggml_attention"):
            call(HERE[0], q, k, v, pos, 0.25, 1, n_kv=n_kv, n_threads=nth)

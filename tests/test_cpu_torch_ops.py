"""The CPU kernels as torch ops (``torch.ops.parallax_cpu``, csrc/cpu/torch_ops.cpp): their
schemas, torch.compile with fullgraph=True on every CPU variant this machine runs (equal to
the torch twins, cache writes included), the build cache, and the fallback to torch when
the shim cannot be built."""
from __future__ import annotations

import logging

import gguf
import numpy as np
import pytest
import torch

import parallax.ops as ops
from parallax.ops import cpu
from parallax.ops import reference as ref

HERE = cpu.supported_variants()
OPS = ["gemm_packed_f32", "int8_linear_f32", "block_linear_f32", "block_linear_q8", "quantize_act",
       "add_rms_norm_f32",
       "silu_and_mul_f32", "argmax_rows_f32", "decode_attention_kv_f32", "paged_attention_kv_f32",
       "attention_half_f32", "mlp_half_f32"]


@pytest.fixture(scope="module")
def parallax_cpu():
    ns = cpu.torch_ops()
    assert ns is not None, cpu.build_error()
    return ns


def test_every_op_has_a_schema_and_marks_the_caches_it_writes(parallax_cpu):
    for name in OPS:
        schema = str(getattr(parallax_cpu, name).default._schema)
        assert schema.startswith(f"parallax_cpu::{name}(") and "str isa" in schema
        writes = "Tensor(a!) k_cache" in schema and "Tensor(b!) v_cache" in schema
        assert writes == ("attention" in name), schema


def _inputs(seed: int = 0):
    """Weights in every format the ops take, and decode-attention inputs (B=2 sequences)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 96, generator=g)
    qw8 = (torch.randn(64, 96, generator=g) * 40).round().clamp(-127, 127).to(torch.int8)
    scales = torch.rand(64, generator=g) / 50
    blocks = torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(
        torch.randn(64, 96, generator=g).numpy(), gguf.GGMLQuantizationType.Q8_0)))
    norm_w = torch.rand(64, generator=g) + 0.5
    b, hq, hk, d, s = 2, 4, 2, 32, 16
    qkv = torch.randn(b, (hq + 2 * hk) * d, generator=g)
    q, k, v = (t.view(b, -1, d) for t in qkv.split([hq * d, hk * d, hk * d], dim=-1))
    kc, vc = torch.randn(b, hk, s, d, generator=g), torch.randn(b, hk, s, d, generator=g)
    theta = torch.rand(b, d // 2, generator=g) * 100
    attn = (q, k, v, kc, vc, theta.cos(), theta.sin(), torch.tensor([16, 5], dtype=torch.int32))
    return w, qw8, scales, blocks, norm_w, attn


def _step(x, w, qw8, scales, blocks, norm_w, attn, *, isa=None, twin=False):
    """A little of everything the decode step calls, by the kernels (twin=False) or by the
    torch references (twin=True). x: (3, 96)."""
    if twin:
        h = ref.linear_packed(x, cpu.pack(w)) + ref.int8_linear(x, qw8, scales) \
            + ref.q8_0_linear(x, blocks)
        n, r = ref.add_rms_norm(h, h * 0.5, norm_w, 1e-5)
        a = ref.decode_attention_with_kvcache(*attn, 0.25)
        return ref.silu_and_mul(n), r, a
    h = cpu.linear_packed(x, cpu.pack(w), isa=isa) + cpu.int8_linear(x, qw8, scales, isa=isa) \
        + cpu.q8_0_linear(x, blocks, isa=isa)
    n, r = cpu.add_rms_norm(h, h * 0.5, norm_w, 1e-5, isa=isa)
    a = cpu.decode_attention_with_kvcache(*attn, 0.25, isa=isa)
    return cpu.silu_and_mul(n, isa=isa), r, a


@pytest.mark.parametrize("isa", HERE)
def test_ops_compile_fullgraph_and_equal_their_twins(isa, parallax_cpu):
    """fullgraph=True: no graph break anywhere (schemas + fake rules); AOTAutograd's
    functionalisation turns the cache writes into copies back into the caller's caches."""
    assert cpu.kernels(isa) is not None, cpu.build_error(isa)
    w, qw8, scales, blocks, norm_w, attn = _inputs()
    twin_attn = tuple(t.clone() for t in attn)
    x = torch.randn(3, 96)
    fn = torch.compile(lambda *a: _step(*a, isa=isa), fullgraph=True, backend="aot_eager")
    got = fn(x, w, qw8, scales, blocks, norm_w, attn)
    want = _step(x, w, qw8, scales, blocks, norm_w, twin_attn, twin=True)
    for g, t in zip(got, want):
        torch.testing.assert_close(g, t, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(attn[3], twin_attn[3])     # k cache written like the twin's
    torch.testing.assert_close(attn[4], twin_attn[4])


def test_paged_attention_op_compiles_fullgraph(parallax_cpu):
    """The paged kernel (two cache writes per sequence, ragged query rows) under compile."""
    g = torch.Generator().manual_seed(3)
    hq, hk, d, bs, nblocks = 4, 2, 32, 16, 6
    q, k, v = (torch.randn(5, h, d, generator=g) for h in (hq, hk, hk))
    kc, vc = (torch.randn(nblocks, hk, bs, d, generator=g) for _ in range(2))
    theta = torch.rand(5, d // 2, generator=g)
    meta = (torch.tensor([3, 4, 5, 65, 66], dtype=torch.int64),                    # slots
            torch.tensor([[0, 1, 5], [2, 3, 4]], dtype=torch.int32),               # tables
            torch.tensor([6, 35], dtype=torch.int32),                              # lens
            torch.tensor([0, 3, 5], dtype=torch.int32))                            # q starts
    args = [q, k, v, kc, vc, theta.cos(), theta.sin(), *meta]
    twin = [t.clone() for t in args]
    fn = torch.compile(lambda *a: cpu.paged_attention_with_kvcache(*a, 0.2), fullgraph=True,
                       backend="aot_eager")
    torch.testing.assert_close(fn(*args), ref.paged_attention_with_kvcache(*twin, 0.2),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kc, twin[3])
    torch.testing.assert_close(vc, twin[4])


def test_ops_compile_with_inductor(parallax_cpu):
    """The default backend too (inductor calls the ops as extern kernels around its own
    generated code)."""
    w, _, _, _, norm_w, _ = _inputs(1)
    packed = cpu.pack(w)

    def f(x):
        n, _ = cpu.add_rms_norm(cpu.linear_packed(x, packed) * 2, None, norm_w, 1e-5)
        return cpu.silu_and_mul(n) + 1

    x = torch.randn(4, 96)
    want = ref.silu_and_mul(ref.rms_norm(ref.linear_packed(x, packed) * 2, norm_w, 1e-5)) + 1
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), want, rtol=1e-4, atol=1e-4)


def test_bad_input_is_refused_by_the_op_with_a_named_error(parallax_cpu):
    with pytest.raises(RuntimeError, match="packed must be contiguous"):
        parallax_cpu.gemm_packed_f32(torch.randn(2, 8), torch.randn(8, 8), None, HERE[0])
    with pytest.raises(RuntimeError, match="no kernel library loaded as 'nope'"):
        parallax_cpu.silu_and_mul_f32(torch.randn(2, 8), "nope")


def test_built_shim_is_reused_without_compiling(parallax_cpu, monkeypatch):
    """Each machine compiles the shim once: with it in the cache, build_torch_ops returns
    the path without calling cpp_extension (so test processes and ranks do not rebuild)."""
    import torch.utils.cpp_extension as ext

    def no_build(*a, **k):
        raise AssertionError("cpp_extension.load called although the shim is cached")

    monkeypatch.setattr(ext, "load", no_build)
    assert cpu.build_torch_ops().endswith(".so")


def test_shim_build_failure_falls_back_to_torch_with_one_warning(monkeypatch, caplog):
    def fail():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpu, "_TORCH_OPS", [])
    monkeypatch.setattr(cpu, "_libs", {})
    monkeypatch.setattr(cpu, "_build_errors", {})
    monkeypatch.setattr(cpu, "build_torch_ops", fail)
    with caplog.at_level(logging.WARNING, logger="parallax.ops.cpu"):
        assert cpu.kernels() is None and cpu.kernels("generic") is None
        x, w = torch.randn(3, 64), torch.rand(64)
        torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5))
    assert len([r for r in caplog.records if "torch ops unavailable" in r.getMessage()]) == 1
    assert "Ninja is required" in cpu.build_error()

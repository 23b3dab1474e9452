"""The fused CPU decoder layer (models/fused.py; csrc/cpu/layer_f32.c's two ops).

Op level: each half equals the same kernels called one by one (bit for bit: same kernels,
same order) and its torch twin (reference.fused_attention_half / fused_mlp_half) to fp32
rounding, on every CPU variant, for packed fp32 and GGUF block weights; bad metadata is
refused with nothing written. Model level: a tiny Llama (head dim 16, so the paged kernel
takes it) with the fused path against the module path (PARALLAX_FUSED_LAYERS=0, the
reference), fp32 and GGUF, one process and tp=2: logits within 1e-5 of their scale, greedy
tokens equal. PARALLAX_CPU_MATMUL=kernel makes every matmul take the kernel, so the fused
path is what runs whatever the timing on a loaded machine would say.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from parallax.errors import KernelInputError
from parallax.models.attention import AttentionMetadata
from parallax.ops import cpu
from parallax.ops import reference as ref

HERE = cpu.supported_variants()
SEQS = [(5, 1, [0, 1]), (0, 3, [2]), (20, 2, [3, 4]), (31, 1, [5, 6])]   # decode + prefill
H, HQ, HK, D, F, BS, NB = 64, 4, 2, 16, 96, 16, 8
QTYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}


def _weight(kind: str, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """An (n, k) weight in ``kind``'s storage: packed panels ("f32") or GGUF blocks."""
    w = torch.randn(n, k, generator=g) * 0.2
    if kind == "f32":
        return cpu.pack(w)
    fmt = kind.partition("*")[0]
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(w.numpy(), QTYPES[fmt])))


def _attention_args(kind: str, residual: bool, bias: bool, window: int, seed: int = 0,
                    seqs=SEQS):
    g = torch.Generator().manual_seed(seed)
    meta = AttentionMetadata.build(seqs, BS)
    t, n_qkv = meta.num_tokens, (HQ + 2 * HK) * D
    theta = meta.positions[:, None].float() * torch.rand(D // 2, generator=g)
    return [torch.randn(t, H, generator=g), torch.randn(t, H, generator=g) if residual else None,
            torch.rand(H, generator=g) + 0.5, 1e-5, _weight(kind, n_qkv, H, g), kind,
            torch.randn(n_qkv, generator=g) if bias else None, _weight(kind, H, HQ * D, g), kind,
            torch.randn(NB, HK, BS, D, generator=g), torch.randn(NB, HK, BS, D, generator=g),
            theta.cos(), theta.sin(), meta.slot_mapping, meta.block_tables, meta.context_lens,
            meta.query_start_loc, HQ, HK, D ** -0.5, window, 0.0]


def _mlp_args(kind: str, seed: int = 0, rows: int | None = None):
    g = torch.Generator().manual_seed(seed)
    t = rows or sum(n for _, n, _ in SEQS)
    return (torch.randn(t, H, generator=g), torch.randn(t, H, generator=g),
            torch.rand(H, generator=g) + 0.5, 1e-5, _weight(kind, 2 * F, H, g), kind,
            _weight(kind, H, F, g), kind, F)


def _kernel_linear(kind, x, w, bias=None, isa=None):
    if kind == "f32":
        return cpu.linear_packed(x, w, bias, isa=isa)
    fmt, _, act = kind.partition("*")
    if act == "q8":
        return cpu.block_linear_q8(fmt, x, w, bias, isa=isa)
    return cpu._block_linear(fmt, x, w, bias, isa)


def _unfused_attention(isa, x, residual, nw, eps, w_qkv, qkv_kind, b_qkv, w_o, o_kind, kc, vc,
                       cos, sin, slots, tables, lens, qsl, hq, hk, scale, window, softcap):
    """The attention half by the kernels one at a time, as the module path calls them."""
    h, res = cpu.add_rms_norm(x, residual, nw, eps, isa=isa)
    res = x if residual is None else res
    t = x.shape[0]
    qkv = _kernel_linear(qkv_kind, h, w_qkv, b_qkv, isa)
    q, k, v = qkv.split([hq * D, hk * D, hk * D], dim=-1)
    a = cpu.paged_attention_with_kvcache(q.view(t, hq, D), k.view(t, hk, D), v.view(t, hk, D),
                                         kc, vc, cos, sin, slots, tables, lens, qsl, scale,
                                         window, softcap, isa=isa)
    return _kernel_linear(o_kind, a.reshape(t, hq * D), w_o, None, isa), res


def _clone_caches(args):
    args = list(args)
    args[9], args[10] = args[9].clone(), args[10].clone()
    return args


KINDS = ["f32", "q8_0", "q4_0", "q8_0*q8", "q4_0*q8"]


@pytest.mark.parametrize("isa", HERE)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("residual,bias,window", [(True, False, 0), (False, True, 0),
                                                  (True, True, 7)])
def test_attention_half_equals_its_kernels_and_twin(isa, kind, residual, bias, window):
    assert cpu.kernels(isa) is not None, cpu.build_error(isa)
    args = _attention_args(kind, residual, bias, window)
    fused_args, one_args, twin_args = (_clone_caches(args) for _ in range(3))
    out, res = cpu.attention_half(*fused_args, isa=isa)
    want, want_res = _unfused_attention(isa, *one_args)
    assert torch.equal(out, want) and torch.equal(res, want_res)
    assert torch.equal(fused_args[9], one_args[9]) and torch.equal(fused_args[10], one_args[10])
    if "*q8" in kind:   # 8-bit activations: an ulp in x can move a code; the twin of those
        return          # kernels is tested in test_quant_gguf.py
    tw_out, tw_res = ref.fused_attention_half(*twin_args)
    torch.testing.assert_close(out, tw_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res, tw_res, rtol=0, atol=0)
    torch.testing.assert_close(fused_args[9], twin_args[9], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_args[10], twin_args[10], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", HERE)
@pytest.mark.parametrize("kind", KINDS)
def test_mlp_half_equals_its_kernels_and_twin(isa, kind):
    x, residual, nw, eps, w_gu, gu_kind, w_down, down_kind, f = _mlp_args(kind)
    out, res = cpu.mlp_half(x, residual, nw, eps, w_gu, gu_kind, w_down, down_kind, f, isa=isa)
    h, want_res = cpu.add_rms_norm(x, residual, nw, eps, isa=isa)
    act = cpu.silu_and_mul(_kernel_linear(kind, h, w_gu, None, isa), isa=isa)
    assert torch.equal(out, _kernel_linear(kind, act, w_down, None, isa))
    assert torch.equal(res, want_res)
    if "*q8" not in kind:
        tw_out, tw_res = ref.fused_mlp_half(x, residual, nw, eps, w_gu, gu_kind, w_down,
                                            down_kind, f)
        torch.testing.assert_close(out, tw_out, rtol=1e-5, atol=1e-5)
        assert torch.equal(res, tw_res)


# A 40-token prefill chunk next to decodes: enough rows that the norms and the SiLU between
# the matmuls run over the threads by rows (layer_f32.c); the result must not change.
MANY = [(5, 1, [0, 1]), (0, 40, [2, 3, 4]), (31, 1, [5, 6])]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("residual", [True, False])
def test_halves_with_many_rows_equal_their_kernels_at_any_thread_count(threads, residual):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        args = _attention_args("f32", residual, False, 0, seqs=MANY)
        fused_args, one_args = _clone_caches(args), _clone_caches(args)
        out, res = cpu.attention_half(*fused_args)
        want, want_res = _unfused_attention(None, *one_args)
        assert torch.equal(out, want) and torch.equal(res, want_res)
        assert torch.equal(fused_args[9], one_args[9])
        x, r, nw, eps, w_gu, gu_kind, w_down, down_kind, f = _mlp_args("f32", rows=42)
        r = r if residual else None
        out, res = cpu.mlp_half(x, r, nw, eps, w_gu, gu_kind, w_down, down_kind, f)
        h, want_res = cpu.add_rms_norm(x, r, nw, eps)
        act = cpu.silu_and_mul(_kernel_linear("f32", h, w_gu))
        assert torch.equal(out, _kernel_linear("f32", act, w_down))
        assert torch.equal(res, x if r is None else want_res)
    finally:
        torch.set_num_threads(before)


def test_bad_metadata_is_refused_and_nothing_is_written():
    args = _attention_args("f32", True, False, 0)
    args[13] = args[13].clone()
    args[13][2] = NB * BS          # one slot past the cache
    before = (args[9].clone(), args[10].clone())
    with pytest.raises(KernelInputError, match="slot"):
        cpu.attention_half(*args)
    assert torch.equal(args[9], before[0]) and torch.equal(args[10], before[1])


def test_wrong_weight_kind_is_refused_with_the_shapes():
    args = _attention_args("f32", True, False, 0)
    args[5] = "q8_0"               # panels passed as Q8_0 blocks
    with pytest.raises(RuntimeError, match="w_qkv must be a CPU Byte tensor"):
        cpu.attention_half(*args)


def test_halves_have_fake_rules_for_torch_compile():
    args = _attention_args("f32", True, False, 0)
    torch.library.opcheck(torch.ops.parallax_cpu.attention_half_f32.default,
                          (*args, cpu.kernels()), test_utils=("test_schema", "test_faketensor"))
    x, residual, nw, eps, w_gu, gu_kind, w_down, down_kind, f = _mlp_args("f32")
    torch.library.opcheck(torch.ops.parallax_cpu.mlp_half_f32.default,
                          (x, residual, nw, eps, w_gu, gu_kind, w_down, down_kind, f,
                           cpu.kernels()), test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------- whole models
TINY = dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2,
            intermediate_size=128)                 # head dim 16; tp=2: 64-wide MLP shards
PROMPTS = [[5, 6, 7, 8, 9], [1, 2], list(range(30, 60))]
GREEDY = dict(max_new_tokens=24, ignore_eos=True)


def _checkpoint(tmp_path, weights: str) -> str:
    from conftest import make_checkpoint
    if weights == "fp32":
        return make_checkpoint(str(tmp_path / "hf"), "llama", **TINY)
    from test_quant_gguf import tiny_gguf
    return tiny_gguf(tmp_path, True, weights.partition("-")[0], **TINY)


def fused_layer_count(model) -> int:
    from parallax.models.fused import FusedLayer
    plans = model.__dict__.get("_fused_plans", {})
    return max((sum(isinstance(s, FusedLayer) for s in p) for p in plans.values() if p),
               default=0)


def _run(path, **kw):
    import parallax
    with parallax.LLM(path, **kw) as llm:
        logits = llm.logits(PROMPTS)
        tokens = [o.token_ids for o in llm.generate(PROMPTS, **GREEDY)]
        fused = fused_layer_count(llm._runner.model) if not kw else None
    return logits, tokens, fused


@pytest.mark.timeout(300)
@pytest.mark.parametrize("weights", ["fp32", "q8_0-f32", "q4_0-q8"])
@pytest.mark.parametrize("kw", [{}, dict(tp=2, threads_per_rank=1)], ids=["tp1", "tp2"])
def test_model_fused_equals_module_path(tmp_path, monkeypatch, weights, kw):
    """The whole model with the fused halves against the module path, same layout and
    weights: logits within 1e-5 of their scale (same kernels in the same order: equal in
    practice), greedy tokens equal for 24 tokens; one process: every layer was fused."""
    path = _checkpoint(tmp_path, weights)
    monkeypatch.setenv("PARALLAX_CPU_MATMUL", "kernel")
    if weights != "fp32":
        monkeypatch.setenv("PARALLAX_GGUF_ACTIVATIONS", weights.partition("-")[2])
    monkeypatch.setenv("PARALLAX_FUSED_LAYERS", "0")
    ref_logits, ref_tokens, ref_fused = _run(path, **kw)
    monkeypatch.setenv("PARALLAX_FUSED_LAYERS", "1")
    logits, tokens, fused = _run(path, **kw)
    if not kw:
        assert ref_fused == 0 and fused == 4, (ref_fused, fused)
    scale = float(ref_logits.nan_to_num().abs().max())
    torch.testing.assert_close(logits, ref_logits, atol=1e-5 * scale, rtol=0, equal_nan=True)
    assert tokens == ref_tokens


def fused_rank(ctx, path: str):
    """On one rank of a tp layout: prompt logits with the fused path and without, and how
    many layers the fused plan took."""
    import os

    from parallax.engine.runner import ModelRunner
    from parallax.models import fused
    os.environ["PARALLAX_CPU_MATMUL"] = "kernel"
    runner = ModelRunner(ctx, path, num_blocks=16)
    out = {}
    for flag in ("1", "0"):
        os.environ["PARALLAX_FUSED_LAYERS"] = flag
        fused.settle(runner.model)     # settings are read at load: re-read them
        out[flag] = runner.logits(PROMPTS)
    return out["1"], out["0"], fused_layer_count(runner.model)


@pytest.mark.timeout(300)
def test_tp2_ranks_fuse_every_layer_and_all_reduce_between_halves(tmp_path):
    from dist_utils import spawn_ranks
    path = _checkpoint(tmp_path, "fp32")
    (fused, unfused, n0), (none1, none2, n1) = spawn_ranks(2, fused_rank, path, timeout=240)
    assert n0 == n1 == 4 and none1 is None and none2 is None
    scale = float(unfused.nan_to_num().abs().max())
    torch.testing.assert_close(fused, unfused, atol=1e-5 * scale, rtol=0, equal_nan=True)


def test_other_layers_keep_the_module_path(tmp_path):
    """Qwen2 (q|k|v bias) is a plain Llama layer; a layer whose forward differs is not."""
    import parallax
    from conftest import make_checkpoint
    from parallax.models import fused
    path = make_checkpoint(str(tmp_path / "qwen2"), "qwen2", **TINY)
    with parallax.LLM(path) as llm:
        layers = llm._runner.model.layers
        assert all(fused.plain_llama_layer(layer) for layer in layers)
        layers[0].mlp.act = torch.nn.functional.gelu
        assert not fused.plain_llama_layer(layers[0])

"""Model families beyond the Llama family (Qwen3, Phi-3) against HF transformers on the same
tiny random weights (fp32 logits within 1e-4, 64 equal greedy tokens), their tp / pp layouts
against one process, and the variants parallax refuses."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import transformers

import parallax
from conftest import redraw_weights_
from parallax.errors import CheckpointError
from parallax.parallel.plan import rank_plan

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)

FAMILIES = {
    # head_dim 16 != hidden / heads (8): Qwen3 takes it from the config.
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=16)),
    "qwen3-tied-bias": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                        dict(head_dim=8, tie_word_embeddings=True, attention_bias=True)),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(pad_token_id=0)),
    # Window 16 < the 34-token prompt and 64 generated tokens; layers sliding, full, sliding;
    # soft-capping at HF's defaults (attention 50, logits 30) scaled down to bite on tiny logits.
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               dict(head_dim=16, query_pre_attn_scalar=12, sliding_window=16,
                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
               dict(head_dim=16, query_pre_attn_scalar=12, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    rope_parameters={
                        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    # 5 experts: uneven over 2 ranks at ep=2 (3 + 2).
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_local_experts=5, num_experts_per_tok=2)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(num_experts=5, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48, norm_topk_prob=False,
                       mlp_only_layers=[1])),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(num_experts=5, num_experts_per_tok=2, moe_intermediate_size=32,
                       norm_topk_prob=True, head_dim=16)),
}


def make_family_checkpoint(path: str, family: str, seed: int = 0, **overrides) -> str:
    """Save a tiny random HF model of ``family`` to ``path``; every weight re-drawn (norms
    around 1) so that no weight is a constant that could hide a loading bug."""
    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**{**TINY, **extra, **overrides})).eval()
    redraw_weights_(model)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One tiny checkpoint per family, built once for the module."""
    return {f: make_family_checkpoint(str(tmp_path_factory.mktemp(f)), f) for f in FAMILIES}


PROMPTS = [[5, 17, 300, 2, 99, 45, 7], [11, 3], list(range(40, 140, 3))]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_and_greedy_match_hf(checkpoints, family):
    path = checkpoints[family]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with parallax.LLM(path) as llm:
        assert llm.config.architecture == family.split("-")[0]
        ours = llm.logits(PROMPTS)
        for i, p in enumerate(PROMPTS):
            ref = hf(torch.tensor([p])).logits[0]
            torch.testing.assert_close(ours[i, :len(p)], ref, atol=1e-4, rtol=0)
        prompt = PROMPTS[0]
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False,
                          min_new_tokens=64)[0, len(prompt):].tolist()
        assert llm.generate([prompt], max_new_tokens=64, ignore_eos=True)[0].token_ids == ref


MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layouts_match_one_process(checkpoints, family):
    """tp=2 (each rank reads its rows of Phi-3's fused qkv_proj / gate_up_proj; MoE experts
    cut like a dense MLP), pp=2 (Gemma: tied, scaled embedding, held by both stages; prompt
    30 > window 16) and for MoE tp=2 x ep=2 (3 + 2 whole experts per rank) equal one process."""
    path = checkpoints[family]
    prompts = [[5, 6, 7, 8, 9], [1, 2], list(range(30, 60))]
    greedy = dict(max_new_tokens=24, ignore_eos=True)
    with parallax.LLM(path) as one:
        ref_tokens = [o.token_ids for o in one.generate(prompts, **greedy)]
        ref_logits = one.logits(prompts)
    layouts = [dict(tp=2), dict(pp=2)] + ([dict(tp=2, ep=2)] if family in MOE else [])
    for kw in layouts:
        with parallax.LLM(path, threads_per_rank=1, **kw) as llm:
            assert [o.token_ids for o in llm.generate(prompts, **greedy)] == ref_tokens, kw
            torch.testing.assert_close(llm.logits(prompts), ref_logits, atol=1e-4, rtol=0,
                                       equal_nan=True)
            if "ep" in kw:      # whole experts per rank, 3 + 2, as `parallax info` plans them
                plan = rank_plan(llm.config, 2, 1, None, "float32", ep=2)
                assert [r["experts"] for r in plan] == [range(0, 3), range(3, 5)]
                measured = {m["rank"]: m["weight_bytes"] for m in llm.memory()}
                assert {r["rank"]: r["weight_bytes"] for r in plan} == measured


def _edit_config(path: str, **changes) -> None:
    p = os.path.join(path, "config.json")
    cfg = json.load(open(p))
    cfg.update(changes)
    json.dump(cfg, open(p, "w"))


@pytest.mark.parametrize("changes, msg", [
    (dict(rope_scaling={"type": "su", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4}),
     "rope scaling type 'su' is not implemented"),
    (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 4,
                        "long_factor": [1.0] * 4}), "'longrope' is not implemented"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
])
def test_phi3_unsupported_variants_refused(tmp_path, changes, msg):
    path = make_family_checkpoint(str(tmp_path), "phi3")
    _edit_config(path, rope_parameters=None, **changes)
    with pytest.raises(CheckpointError, match=msg):
        parallax.LLM(path)


def write_gguf(path: str, hf_folder: str, arch: str) -> str:
    """An F32 GGUF of a HF qwen3 / phi3 checkpoint, named and laid out as llama.cpp's
    converter writes it (no q/k permutation for these; Phi-3's fused tensors kept fused)."""
    from parallax.loading.gguf import ARCH_GGUF_TO_HF, GGUF_TO_HF
    from test_gguf import write_from_hf
    write_from_hf(path, hf_folder, {}, arch=arch, names={**GGUF_TO_HF, **ARCH_GGUF_TO_HF[arch]},
                  permuted=False)
    return path


@pytest.mark.parametrize("family", ["qwen3", "qwen3-tied-bias", "phi3"])
def test_gguf_logits_match_hf(checkpoints, family, tmp_path):
    path = checkpoints[family]
    arch = family.split("-")[0]
    gguf_path = write_gguf(str(tmp_path / f"{family}.gguf"), path, arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with parallax.LLM(gguf_path) as llm:
        assert llm.config.architecture == arch
        ours = llm.logits(PROMPTS)
    for i, p in enumerate(PROMPTS):
        torch.testing.assert_close(ours[i, :len(p)], hf(torch.tensor([p])).logits[0],
                                   atol=1e-4, rtol=0)


def test_gguf_partial_rotary_refused(checkpoints, tmp_path, monkeypatch):
    import gguf
    real = gguf.GGUFWriter.add_rope_dimension_count
    monkeypatch.setattr(gguf.GGUFWriter, "add_rope_dimension_count",
                        lambda self, n: real(self, n // 2))
    gguf_path = write_gguf(str(tmp_path / "phi3.gguf"), checkpoints["phi3"], "phi3")
    with pytest.raises(CheckpointError, match="rotary over part of each head"):
        parallax.LLM(gguf_path)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_num_parameters_equals_hf(checkpoints, family):
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[family])
    cfg = parallax.ModelConfig.from_json(os.path.join(checkpoints[family], "config.json"))
    assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("family, changes", [
    ("gemma2", dict(sliding_window=10_000)),
    ("gemma3", dict(sliding_window=10_000)),
    ("gemma2", dict(attn_logit_softcapping=None)),
    ("gemma2", dict(final_logit_softcapping=None)),
], ids=["gemma2-window", "gemma3-window", "gemma2-attn-cap", "gemma2-final-cap"])
def test_gemma_window_and_softcaps_are_applied(checkpoints, family, changes, tmp_path):
    """The same weights without the window (or a cap) give other logits (past the window
    only, for the window): so the HF match above exercised each of them."""
    import shutil
    path = shutil.copytree(checkpoints[family], str(tmp_path / family))
    _edit_config(path, **changes)
    prompt = PROMPTS[2]                                   # 34 tokens, window 16
    with parallax.LLM(checkpoints[family]) as a, parallax.LLM(path) as b:
        ours, other = a.logits([prompt])[0], b.logits([prompt])[0]
    window = json.load(open(os.path.join(checkpoints[family], "config.json")))["sliding_window"]
    if "sliding_window" in changes:
        torch.testing.assert_close(ours[:window], other[:window], atol=1e-5, rtol=0)
        assert (ours[window:] - other[window:]).abs().max() > 1e-2
    else:
        assert (ours - other).abs().max() > 1e-2


def test_gemma3_legacy_rope_keys():
    """Older Gemma 3 configs: rope_theta (global, with rope_scaling) and rope_local_base_freq."""
    cfg = parallax.ModelConfig.from_hf_dict(dict(
        architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", **TINY, head_dim=16,
        rope_theta=1e6, rope_local_base_freq=1e4, sliding_window=16,
        rope_scaling={"rope_type": "linear", "factor": 8.0}))
    assert cfg.rope_theta == 1e6 and cfg.rope_local_theta == 1e4
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert cfg.layer_types == ["sliding_attention"] * 3      # period 6 > 3 layers
    assert cfg.max_position_embeddings == 256                # not clamped to the window


@pytest.mark.parametrize("changes, msg", [
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(layer_types=["sliding_attention", "chunked_attention", "full_attention"]),
     "layer_types"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                           "sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
     "sliding-window layers is not implemented"),
])
def test_gemma3_unsupported_variants_refused(checkpoints, tmp_path, changes, msg):
    import shutil
    path = shutil.copytree(checkpoints["gemma3"], str(tmp_path / "g3"))
    _edit_config(path, **changes)
    with pytest.raises(CheckpointError, match=msg):
        parallax.LLM(path)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_info_plan_equals_allocated_bytes(checkpoints, family):
    with parallax.LLM(checkpoints[family]) as llm:
        measured = llm.memory()[0]["weight_bytes"]
        assert rank_plan(llm.config, 1, 1, None, "float32")[0]["weight_bytes"] == measured


def test_expert_partition_covers_every_expert_once():
    from parallax.parallel.sharding import expert_partition
    for tp, ep in [(1, 1), (2, 1), (2, 2), (4, 2), (3, 3), (4, 4)]:
        held: dict[int, list[tuple[int, int]]] = {}
        for r in range(tp):
            part = expert_partition(5, 32, tp, r, ep)
            for e in part.experts:
                held.setdefault(e, []).append((part.f_start, part.f_len))
        assert sorted(held) == list(range(5)), (tp, ep)
        for cols in held.values():          # each expert's columns covered exactly once
            assert sorted(cols)[0][0] == 0 and sum(n for _, n in cols) == 32, (tp, ep)


@pytest.mark.parametrize("kw, msg", [
    (dict(tp=2, ep=3), "ep=3 must divide tp=2"),
    (dict(ep=0), "ep must be an integer >= 1"),
])
def test_bad_expert_layout_refused(checkpoints, kw, msg):
    from parallax.errors import LayoutError
    with pytest.raises(LayoutError, match=msg):
        parallax.LLM(checkpoints["mixtral"], **kw)


def test_ep_on_a_dense_model_refused(checkpoints):
    from parallax.errors import LayoutError
    with pytest.raises(LayoutError, match="needs a mixture-of-experts model"):
        parallax.LLM(checkpoints["qwen3"], tp=2, ep=2)


def test_gguf_mixture_of_experts_refused(checkpoints, tmp_path, monkeypatch):
    """llama.cpp writes Mixtral as general.architecture "llama" with an expert count."""
    import gguf
    real = gguf.GGUFWriter.add_block_count

    def with_experts(self, n):
        real(self, n)
        self.add_expert_count(4)
    monkeypatch.setattr(gguf.GGUFWriter, "add_block_count", with_experts)
    path = write_gguf(str(tmp_path / "moe.gguf"), checkpoints["qwen3"], "qwen3")
    with pytest.raises(CheckpointError, match="mixture of experts"):
        parallax.LLM(path)


@pytest.mark.parametrize("window, softcap", [(5, None), (None, 3.0), (5, 3.0)])
def test_paged_attention_window_and_softcap_equal_dense(window, softcap):
    """The reference paged attention with a window / soft-cap equals dense attention with
    the same mask and capped scores, for a chunk of new tokens after a cached prefix."""
    from parallax.ops.reference import paged_attention
    torch.manual_seed(0)
    hq, hk, d, bs, length, new = 4, 2, 8, 4, 13, 3
    k_all, v_all = torch.randn(length, hk, d), torch.randn(length, hk, d)
    q = torch.randn(new, hq, d)
    blocks = [2, 0, 3, 1]                                   # scattered cache blocks
    k_cache, v_cache = torch.zeros(4, hk, bs, d), torch.zeros(4, hk, bs, d)
    for p in range(length):
        k_cache[blocks[p // bs], :, p % bs] = k_all[p]
        v_cache[blocks[p // bs], :, p % bs] = v_all[p]
    out = paged_attention(q, k_cache, v_cache, torch.tensor([blocks], dtype=torch.int32),
                          torch.tensor([length], dtype=torch.int32),
                          torch.tensor([0, new], dtype=torch.int32), 0.3, window, softcap)
    for i in range(new):
        p = length - new + i
        lo = 0 if window is None else max(0, p - window + 1)
        for h in range(hq):
            s = (k_all[lo:p + 1, h // 2] @ q[i, h]) * 0.3
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            ref = torch.softmax(s, 0) @ v_all[lo:p + 1, h // 2]
            torch.testing.assert_close(out[i, h], ref, atol=1e-5, rtol=0)


def test_gemma_windowed_soft_capped_layers_take_the_c_kernel(checkpoints, monkeypatch):
    """fp32 on the CPU, Gemma 2's sliding (window 16) and global layers, both soft-capped,
    run the C paged attention kernel, not the torch reference."""
    from parallax.ops import cpu as cpu_ops
    from parallax.ops import reference
    if cpu_ops.kernels() is None:
        pytest.fail("the CPU kernels did not build (gcc missing?)")
    seen = []
    real = cpu_ops.paged_attention_with_kvcache

    def spy(*args, **kwargs):
        seen.append(args[12:14])                  # (window, softcap)
        return real(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("the reference ran")
    monkeypatch.setattr(cpu_ops, "paged_attention_with_kvcache", spy)
    monkeypatch.setattr(reference, "paged_attention_with_kvcache", refuse)
    with parallax.LLM(checkpoints["gemma2"]) as llm:
        llm.logits([PROMPTS[2]])
    assert set(seen) == {(16, 2.0), (None, 2.0)}

"""GGUF files of Gemma 2 / 3 and of the mixture-of-experts families (Mixtral as llama.cpp's
"llama" with experts, qwen2moe with a shared expert and a dense layer, qwen3moe), written
from tiny random HF checkpoints as llama.cpp's converter lays them out (stacked expert
tensors, Gemma norms stored as 1 + w, Mixtral q/k rows permuted), give HF's logits on the
same weights (fp32, atol 1e-4)."""

from __future__ import annotations

import json
import os

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import parallax
from parallax.loading.gguf import ARCH_GGUF_TO_HF, GGUF_TO_HF
from test_gguf import permute
from test_models_families import PROMPTS, make_family_checkpoint

# family -> (llama.cpp architecture, HF overrides). Gemma: query_pre_attn_scalar = head_dim,
# the scale llama.cpp uses for every Gemma but the 27B models (the file does not store it).
CASES = {
    "gemma2": ("gemma2", dict(query_pre_attn_scalar=16)),
    "gemma3": ("gemma3", dict(query_pre_attn_scalar=16)),
    "mixtral": ("llama", {}),
    "qwen2_moe": ("qwen2moe", {}),
    "qwen3_moe": ("qwen3moe", {}),
}
_EXPERT = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down",
           "w1": "gate", "w3": "up", "w2": "down"}


def _gguf_names(family: str, layers: int) -> dict[str, str]:
    """HF stem -> GGUF stem, the expert index left as "{E}"."""
    out = {}
    for g, h in {**GGUF_TO_HF, **ARCH_GGUF_TO_HF.get(family, {})}.items():
        for i in range(layers):
            out[h.format(N=i, E="{E}")] = g.format(N=i)
    return out


def write_gguf(path: str, hf_folder: str, family: str, qtype=gguf.GGMLQuantizationType.F32) -> str:
    """The GGUF llama.cpp's converter makes of ``hf_folder``; matrices (experts included)
    stored as ``qtype``, vectors as F32."""
    arch = CASES[family][0]
    cfg = json.load(open(os.path.join(hf_folder, "config.json")))
    sd = load_file(os.path.join(hf_folder, "model.safetensors"))
    n, heads, kv = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    names = _gguf_names(family, n)
    tensors: dict[str, np.ndarray] = {}
    stacks: dict[str, dict[int, np.ndarray]] = {}
    for name, x in sd.items():
        stem, kind = name.rsplit(".", 1)
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        if family in ("gemma2", "gemma3") and name.endswith("norm.weight"):
            x = x + 1                                  # llama.cpp's Gemma converters
        if family == "mixtral" and stem.endswith(("q_proj", "k_proj")):
            x = permute(x, heads if stem.endswith("q_proj") else kv)
        if ".experts." in stem:
            head, _, rest = stem.partition(".experts.")
            e, proj = rest.split(".")
            stacks.setdefault(names[f"{head}.experts.{{E}}.{proj}"], {})[int(e)] = x
            continue
        tensors[f"{names[stem]}.{kind}"] = x
    for g, slabs in stacks.items():                   # (E, rows, columns), experts in order
        tensors[f"{g}.weight"] = np.stack([slabs[e] for e in sorted(slabs)])

    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(n)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = cfg.get("rope_parameters") or {}
    if family == "gemma3":
        w.add_rope_freq_base(rope["full_attention"]["rope_theta"])
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["full_attention"]["factor"])
        w.add_key_value(gguf.Keys.Rope.FREQ_BASE_SWA.format(arch=arch),
                        rope["sliding_attention"]["rope_theta"], gguf.GGUFValueType.FLOAT32)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg["layer_types"]])
    else:
        w.add_rope_freq_base(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if family in ("gemma2", "gemma3"):
        w.add_sliding_window(cfg["sliding_window"])
        if cfg.get("attn_logit_softcapping"):
            w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        if cfg.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    else:
        w.add_expert_count(cfg.get("num_local_experts") or cfg["num_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        if family != "mixtral":
            w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if family == "qwen2_moe":
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    for name, x in tensors.items():
        x = np.ascontiguousarray(x, np.float32)
        if qtype != gguf.GGMLQuantizationType.F32 and x.ndim >= 2:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("family", sorted(CASES))
def test_gguf_logits_match_hf(family, tmp_path):
    hf_path = make_family_checkpoint(str(tmp_path / "hf"), family, **CASES[family][1])
    path = write_gguf(str(tmp_path / f"{family}.gguf"), hf_path, family)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch.float32).eval()
    with parallax.LLM(path) as llm:
        assert llm.config.architecture == family
        if family == "qwen2_moe":
            assert llm.config.dense_layers == [1] and not llm.config.norm_topk_prob
        ours = llm.logits(PROMPTS)
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):       # the 34-token prompt crosses Gemma's window 16
            torch.testing.assert_close(ours[i, :len(p)], hf(torch.tensor([p])).logits[0],
                                       atol=1e-4, rtol=0)


def test_gguf_gemma_default_layer_pattern():
    """Without attention.sliding_window_pattern, llama.cpp's fixed periods: Gemma 2 slides
    on even layers, Gemma 3 on five of every six; the 27B models scale by hidden / heads."""
    def meta(arch, layers):
        return {"general.architecture": arch, f"{arch}.block_count": layers,
                f"{arch}.embedding_length": 64, f"{arch}.feed_forward_length": 96,
                f"{arch}.attention.head_count": 8, f"{arch}.attention.key_length": 16,
                f"{arch}.attention.sliding_window": 16, f"{arch}.vocab_size": 512}
    g2 = parallax.ModelConfig.from_gguf_metadata(meta("gemma2", 4))
    assert g2.layer_types == ["sliding_attention", "full_attention"] * 2
    assert g2.query_pre_attn_scalar == 16 and g2.max_position_embeddings == 2048
    g3 = parallax.ModelConfig.from_gguf_metadata(meta("gemma3", 7))
    assert g3.layer_types == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert g3.rope_local_theta == 10000.0
    assert parallax.ModelConfig.from_gguf_metadata(meta("gemma3", 62)).query_pre_attn_scalar == 8


def test_gguf_q8_0_experts_match_hf_on_the_same_rounded_weights(tmp_path):
    """A Q8_0 Mixtral file: each expert's blocks are read as a view of the stacked tensor and
    kept quantized (the C Q8_0 kernels); HF on the Q8_0-rounded weights is the oracle."""
    from safetensors.numpy import save_file
    q8 = gguf.GGMLQuantizationType.Q8_0
    hf_path = make_family_checkpoint(str(tmp_path / "hf"), "mixtral")
    path = write_gguf(str(tmp_path / "q8.gguf"), hf_path, "mixtral", qtype=q8)
    sd = load_file(os.path.join(hf_path, "model.safetensors"))
    rounded = {k: (gguf.quants.dequantize(gguf.quants.quantize(v, q8), q8).astype(np.float32)
                   if v.ndim == 2 else v) for k, v in sd.items()}
    save_file(rounded, os.path.join(hf_path, "model.safetensors"), metadata={"format": "pt"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch.float32).eval()
    with parallax.LLM(path) as llm:
        formats = {name: m.quant_method.name for name, m in llm._runner.model.named_modules()
                   if ".experts." in name and getattr(m, "quant_method", None) is not None}
        ours = llm.logits(PROMPTS)
    assert formats and set(formats.values()) == {"q8_0"}, formats
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            torch.testing.assert_close(ours[i, :len(p)], hf(torch.tensor([p])).logits[0],
                                       atol=1e-4, rtol=0)

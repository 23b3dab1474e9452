"""HF config fields that change the math are honoured (logits equal HF transformers' on the
same tiny checkpoint, fp32, atol 1e-4) or refused with a CheckpointError in the calling
process, and defaults for absent keys equal HF's for each model type."""

from __future__ import annotations

import json
import os
import shutil

import psutil
import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import parallax
from conftest import TINY, make_checkpoint
from parallax import CheckpointError, PromptError
from parallax.config import SLIDING_FAMILIES, ModelConfig

PROMPTS = [[5, 17, 300, 2, 99, 45, 7], [11, 3], list(range(40, 120, 6))]   # <= 16 tokens


def assert_matches_hf(path: str, **llm_kwargs) -> parallax.LLM:
    """parallax's logits on PROMPTS equal HF's on the same checkpoint; returns the config."""
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with parallax.LLM(path, **llm_kwargs) as llm:
        ours = llm.logits(PROMPTS)
        config = llm.config
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            ref = hf(torch.tensor([p])).logits[0]
            torch.testing.assert_close(ours[i, :len(p)], ref, atol=1e-4, rtol=0)
    return config


def tensor_names(path: str) -> set[str]:
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def edit_config(src: str, dst, **changes) -> str:
    shutil.copytree(src, dst)
    cfg_path = os.path.join(dst, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return str(dst)


# ---------------------------------------------------------------------- hidden_act
def test_activation_table_matches_config():
    from parallax.config import SUPPORTED_ACTIVATIONS
    from parallax.models.llama import GATE_ACTIVATIONS
    assert set(SUPPORTED_ACTIVATIONS) == {"silu"} | set(GATE_ACTIVATIONS)


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "swish"])
def test_hidden_act_matches_hf(tmp_path, act):
    cfg = assert_matches_hf(make_checkpoint(str(tmp_path), "llama", hidden_act=act))
    assert cfg.hidden_act == ("silu" if act == "swish" else act)


def test_unsupported_hidden_act_refused(tmp_path):
    path = make_checkpoint(str(tmp_path), "llama", hidden_act="quick_gelu")
    with pytest.raises(CheckpointError, match="hidden_act='quick_gelu' is not implemented"):
        parallax.LLM(path)


# ---------------------------------------------------------------------- biases
def test_llama_mlp_bias_matches_hf(tmp_path):
    path = make_checkpoint(str(tmp_path), "llama", mlp_bias=True)
    assert {"model.layers.0.mlp.gate_proj.bias", "model.layers.0.mlp.down_proj.bias"} <= tensor_names(path)
    assert assert_matches_hf(path).mlp_bias


def test_llama_attention_bias_includes_o_proj(tmp_path):
    path = make_checkpoint(str(tmp_path), "llama", attention_bias=True)
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.o_proj.bias"} <= tensor_names(path)
    cfg = assert_matches_hf(path)
    assert cfg.attention_bias and cfg.o_proj_bias


@pytest.mark.slow
def test_row_parallel_biases_added_once_at_tp2(tmp_path):
    """o_proj and down_proj are row-parallel: their bias is added once, after the all-reduce."""
    path = make_checkpoint(str(tmp_path), "llama", attention_bias=True, mlp_bias=True)
    assert_matches_hf(path, tp=2, timeout_s=120)


def test_qwen2_biases_are_hf_hard_coded(tmp_path):
    """HF's Qwen2 has q/k/v bias and no o_proj/MLP bias whatever config.json says."""
    path = make_checkpoint(str(tmp_path), "qwen2", attention_bias=False, mlp_bias=True)
    names = tensor_names(path)
    assert "model.layers.0.self_attn.q_proj.bias" in names
    assert "model.layers.0.self_attn.o_proj.bias" not in names and "model.layers.0.mlp.up_proj.bias" not in names
    cfg = assert_matches_hf(path)
    assert cfg.attention_bias and not cfg.o_proj_bias and not cfg.mlp_bias


def test_mistral_has_no_biases_whatever_the_config_says(tmp_path):
    path = make_checkpoint(str(tmp_path), "mistral", attention_bias=True, mlp_bias=True)
    assert not any(n.endswith(".bias") for n in tensor_names(path))
    cfg = assert_matches_hf(path)
    assert not (cfg.attention_bias or cfg.o_proj_bias or cfg.mlp_bias)


# ---------------------------------------------------------------------- head_dim, tying
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_head_dim_differing_from_hidden_over_heads(tmp_path, arch):
    cfg = assert_matches_hf(make_checkpoint(str(tmp_path), arch, head_dim=16))
    assert cfg.head_dim == 16 != TINY["hidden_size"] // TINY["num_attention_heads"]


@pytest.mark.parametrize("tied", [True, False])
def test_tie_word_embeddings(tmp_path, tied):
    path = make_checkpoint(str(tmp_path), "llama", tie_word_embeddings=tied)
    assert ("lm_head.weight" in tensor_names(path)) != tied
    assert assert_matches_hf(path).tie_word_embeddings == tied


# ---------------------------------------------------------------------- sliding window
def test_mistral_sliding_window_runs_windowed(tmp_path):
    """Every Mistral layer slides: no context clamp (tests/test_sliding_window.py runs it
    past the window against HF)."""
    path = make_checkpoint(str(tmp_path), "mistral", sliding_window=16)
    cfg = assert_matches_hf(path)
    assert cfg.sliding_window == 16 and cfg.cache_window == 16
    assert cfg.max_position_embeddings == TINY["max_position_embeddings"]
    assert [cfg.layer_window(i) for i in range(cfg.num_layers)] == [16] * cfg.num_layers


@pytest.mark.parametrize("max_window_layers, clamped", [(2, True), (4, False)])
def test_qwen2_sliding_window_only_where_a_layer_uses_it(tmp_path, max_window_layers, clamped):
    """Qwen2's sliding layers are not run windowed: a window some layer uses clamps the
    context to it (within it, sliding attention equals full attention)."""
    path = make_checkpoint(str(tmp_path), "qwen2", use_sliding_window=True, sliding_window=16,
                           max_window_layers=max_window_layers)
    cfg = assert_matches_hf(path)
    assert cfg.max_position_embeddings == (16 if clamped else TINY["max_position_embeddings"])
    assert cfg.cache_window is None
    if clamped:
        with parallax.LLM(path) as llm:
            with pytest.raises(PromptError, match="context of 16 tokens"):
                llm.generate([[1] * 12], max_new_tokens=5)


def test_no_window_keeps_the_context(tiny_llama, tmp_path):
    path = edit_config(tiny_llama, tmp_path / "m", architectures=["MistralForCausalLM"],
                       model_type="mistral", sliding_window=None)
    assert ModelConfig.from_json(os.path.join(path, "config.json")).max_position_embeddings == 256


# ---------------------------------------------------------------------- rope types
@pytest.mark.parametrize("scaling", [
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"type": "su", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4},
    {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4},
])
def test_unimplemented_rope_types_refused(tiny_llama, tmp_path, scaling):
    path = edit_config(tiny_llama, tmp_path / "m", rope_scaling=scaling, rope_parameters=None)
    with pytest.raises(CheckpointError, match="is not implemented"):
        parallax.LLM(path)


def test_llama3_rope_lacking_keys_refused(tiny_llama, tmp_path):
    path = edit_config(tiny_llama, tmp_path / "m", rope_parameters=None,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(CheckpointError, match="low_freq_factor"):
        parallax.LLM(path)


def test_refused_config_raises_before_any_worker(tiny_llama, tmp_path, monkeypatch):
    """tp=2 with a refused config: the error comes from the calling process, no child starts."""
    from parallax.parallel import launch

    def no_workers(*args, **kwargs):
        raise AssertionError("a WorkerPool was started for a config that must be refused")

    monkeypatch.setattr(launch, "WorkerPool", no_workers)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    path = edit_config(tiny_llama, tmp_path / "m", rope_parameters=None,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(CheckpointError, match="'yarn' is not implemented"):
        parallax.LLM(path, tp=2)
    path = edit_config(tiny_llama, tmp_path / "act", hidden_act="quick_gelu")
    with pytest.raises(CheckpointError, match="hidden_act"):
        parallax.LLM(path, tp=2, pp=2)
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


# ---------------------------------------------------------------------- defaults
# 32 query heads: HF's default KV heads (llama: = query heads, mistral 8, qwen2 32) divide it.
MINIMAL = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=32,
               intermediate_size=96, vocab_size=100)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_defaults_equal_hf(model_type):
    """A config.json with only the required keys means what HF's config class makes of it."""
    ours = ModelConfig.from_hf_dict({"model_type": model_type, **MINIMAL})
    hf = transformers.AutoConfig.for_model(model_type, **MINIMAL)
    assert ours.num_kv_heads == hf.num_key_value_heads
    assert ours.head_dim == (getattr(hf, "head_dim", None) or 256 // 32)
    assert ours.rms_norm_eps == hf.rms_norm_eps
    theta = hf.rope_parameters["rope_theta"] if hasattr(hf, "rope_parameters") else hf.rope_theta
    assert ours.rope_theta == theta and ours.rope_scaling is None
    assert ours.tie_word_embeddings == hf.tie_word_embeddings
    assert ours.hidden_act == hf.hidden_act
    window = getattr(hf, "sliding_window", None)
    assert ours.sliding_window == window
    clamp = window if window and model_type not in SLIDING_FAMILIES else 1 << 62
    assert ours.max_position_embeddings == min(hf.max_position_embeddings, clamp)
    llama = model_type == "llama"
    assert ours.mlp_bias == (llama and hf.mlp_bias)
    assert ours.o_proj_bias == (llama and hf.attention_bias)
    assert ours.attention_bias == (model_type == "qwen2" or (llama and hf.attention_bias))

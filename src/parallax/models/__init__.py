"""Model definitions, keyed by architecture family name (ModelConfig.architecture)."""

from .llama import LlamaForCausalLM

MODEL_REGISTRY = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
}

__all__ = ["MODEL_REGISTRY", "LlamaForCausalLM"]

"""Model definitions, keyed by architecture family name (ModelConfig.architecture).

config.py maps a checkpoint's HF architecture name (``architectures[0]``, or GGUF
``general.architecture``) to the family; docs/models.md lists them and how to add one.
"""

from .gemma import GemmaForCausalLM
from .llama import LlamaForCausalLM
from .phi3 import Phi3ForCausalLM
from .qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "phi3": Phi3ForCausalLM,
    "gemma2": GemmaForCausalLM,
    "gemma3": GemmaForCausalLM,
}

__all__ = ["MODEL_REGISTRY", "GemmaForCausalLM", "LlamaForCausalLM", "Phi3ForCausalLM", "Qwen3ForCausalLM"]

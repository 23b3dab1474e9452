"""Model definitions, keyed by architecture family name (ModelConfig.architecture).

config.py maps a checkpoint's HF architecture name (``architectures[0]``, or GGUF
``general.architecture``) to the family; docs/models.md lists them and how to add one.
"""

from .gemma import GemmaForCausalLM
from .llama import LlamaForCausalLM
from .moe import MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
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
    "mixtral": MixtralForCausalLM,
    "qwen2_moe": Qwen2MoeForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
}

__all__ = ["MODEL_REGISTRY", "GemmaForCausalLM", "LlamaForCausalLM", "MixtralForCausalLM", "Phi3ForCausalLM",
           "Qwen2MoeForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"]

"""parallax: tensor- and pipeline-parallel LLM inference on PyTorch.

    import parallax
    with parallax.LLM("smollm2-135m", tp=2) as llm:
        print(llm.generate(["What is the capital of France?"])[0].text)
"""

from .api import LLM, Completion, Delta, RequestHandle, Usage
from .config import ModelConfig
from .errors import (CheckpointError, LayoutError, ParallaxError, PromptError, SamplingError,
                     WorkerError)
from .sampling import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "Completion", "Delta", "RequestHandle", "Usage", "ModelConfig", "SamplingParams", "ParallaxError",
           "CheckpointError", "LayoutError", "PromptError", "SamplingError", "WorkerError"]

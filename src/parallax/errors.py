"""Exceptions parallax raises, each meant to name the problem and the fix."""


class ParallaxError(Exception):
    """Base class of every error parallax raises on purpose.

    Catch this to handle any problem a user can cause (a bad path, layout, prompt or
    sampling value, a dead worker); the message says what is wrong and what to do instead.
    """


class CheckpointError(ParallaxError, ValueError):
    """A checkpoint is missing, corrupt, truncated or of an unsupported architecture.

    Raised by ``LLM(model)`` (and ``parallax info``) while reading the config or headers,
    before any weight is loaded.
    """


class LayoutError(ParallaxError, ValueError):
    """The requested tp/pp layout cannot hold this model.

    E.g. tp larger than the model's attention heads, pp larger than its layers, or a
    ``layer_split`` that does not sum to its layers; the message lists the valid choices.
    """


class SamplingError(ParallaxError, ValueError):
    """Invalid sampling parameters (temperature, top_k, top_p, repetition_penalty, seed,
    max_new_tokens, stop), raised before anything runs."""


class PromptError(ParallaxError, ValueError):
    """A prompt that cannot be run (empty, too long for the context, bad token ids)."""


class WorkerError(ParallaxError, RuntimeError):
    """A worker process died, raised, or stopped answering (within ``timeout_s``)."""


class KernelInputError(ParallaxError, ValueError):
    """A kernel was given inputs it must refuse (e.g. a context length outside the KV cache)."""


class EngineDeadError(WorkerError):
    """The engine stopped (a worker died, a step raised, the LLM was closed); build a new
    LLM. Raised from a request's iteration and ``result()``, and by calls on a closed LLM."""

"""Exceptions parallax raises, each meant to name the problem and the fix."""


class ParallaxError(Exception):
    """Base class of every error parallax raises on purpose."""


class CheckpointError(ParallaxError, ValueError):
    """A checkpoint is missing, corrupt, truncated or of an unsupported architecture."""


class LayoutError(ParallaxError, ValueError):
    """The requested tp/pp layout cannot hold this model."""


class SamplingError(ParallaxError, ValueError):
    """Invalid sampling parameters."""


class PromptError(ParallaxError, ValueError):
    """A prompt that cannot be run (empty, too long for the context, bad token ids)."""


class WorkerError(ParallaxError, RuntimeError):
    """A worker process died, raised, or stopped answering."""


class KernelInputError(ParallaxError, ValueError):
    """A kernel was given inputs it must refuse (e.g. a context length outside the KV cache)."""

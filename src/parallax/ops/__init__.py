"""The hot-path ops, dispatched in one place: the CUDA extension when it is built and the
tensors live on a GPU, else the torch references (ops/reference.py) with the same signature.
"""

from .reference import (add_rms_norm, decode_attention, int8_linear, linear, prefill_attention,
                        quantize_int8, rms_norm, rotary_embedding)

__all__ = ["add_rms_norm", "decode_attention", "int8_linear", "linear", "prefill_attention",
           "quantize_int8", "rms_norm", "rotary_embedding", "active_backend"]


def active_backend() -> str:
    """Which implementation the ops use now: "reference" (or "cuda" once built)."""
    return "reference"

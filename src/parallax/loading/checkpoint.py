"""The interface every checkpoint reader offers: names, shapes, and sliced reads.

A rank asks only for its slice (``read(name, dim, start, length)``), so a reader that can
slice on disk (safetensors ``get_slice``, GGUF rows) never materialises the full tensor.
Names and shapes are always Hugging Face's (``model.layers.0.self_attn.q_proj.weight``,
weights as (out_features, in_features)), whatever the file format.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..config import ModelConfig


class Checkpoint(Protocol):
    config: ModelConfig

    def names(self) -> list[str]:
        """All tensor names, in HF naming."""

    def shape(self, name: str) -> tuple[int, ...]:
        """HF shape of a tensor, without reading it."""

    def read(self, name: str, dim: int | None = None, start: int = 0,
             length: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor, or only ``[start, start+length)`` along ``dim``, as ``dtype`` on the CPU.

        Raises CheckpointError when the name is missing or the data is corrupt.
        """

    def close(self) -> None:
        ...

"""How a layer stores and multiplies its weight: one strategy object per layer (vLLM's
``quant_method``), chosen by the loader from the checkpoint before any weight is read.

- ``create_weights(layer)`` swaps the layer's meta ``weight`` for this format's storage
  (same ``chunks``), so the loader reads exactly that;
- ``process_weights_after_loading(layer)`` re-lays the loaded tensor if the format needs it;
- ``apply(layer, x, bias)`` is y = x W^T + b; ``embedding(layer, ids)`` reads rows of W.

``UNQUANTIZED`` (float weights, packed or not) is every layer's default. ``Q8_0Method``
(and ``Q4_0Method`` / ``Q4_1Method``, 18- / 20-byte blocks of 4-bit weights, and the
K-quants ``Q4_KMethod`` / ``Q6_KMethod``, super-blocks of 256, the same way)
keeps a GGUF Q8_0 tensor as its raw blocks (a uint8 (N, K/32*34) buffer: fp16 scale + 32 int8 per
32 weights), sliced by whole rows (column-parallel, vocabulary) or whole blocks along K
(row-parallel). The int8 path of ``quantize="int8"`` still uses ``_Linear.qweight``/
``scales`` buffers (to move behind this interface later).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops


class QuantMethod:
    """Float weights: (N, K), or the CPU kernel's panels (N/32, K, 32) once packed."""

    name = "float"
    ggml_type: str | None = None        # the GGUF block type read raw, None: read as float

    def create_weights(self, layer: nn.Module) -> None:
        pass

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        pass

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        w = layer.weight
        if w.dim() == 3:
            return ops.linear_packed(x, w, bias)
        return ops.linear(x, w, bias)

    def kernel_kind(self, layer: nn.Module, rows: int) -> str | None:
        """The weight kind (ops/cpu.py ``choose``'s name) whose CPU kernel runs ``apply``
        for ``rows`` rows, or None where torch does (it measured faster, or no kernel
        takes this weight): the fused decoder layer (models/fused.py) asks this."""
        w = layer.weight
        if w.dim() == 3 and ops.cpu.fits(w) and ops.cpu.matmul_path(rows, w) == "kernel":
            return "f32"
        return None

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        w = layer.weight
        lookup = ops.embedding_packed if w.dim() == 3 else nn.functional.embedding
        return lookup(ids, w)


class Q8_0Method(QuantMethod):
    """GGUF Q8_0 blocks kept as they are in the file; matmuls go through
    ops.<name>_linear (csrc/cpu/q8_act.c: x rounded to 8-bit blocks, integer dot products),
    lookups dequantise only the rows asked for (ops.<name>_embedding). The other block
    formats below differ only in their names and block sizes."""

    name = "q8_0"
    ggml_type = "Q8_0"
    block, block_bytes = 32, 34       # weights and bytes per block (K-quants: super-block)

    def create_weights(self, layer: nn.Module) -> None:
        old = layer.weight
        n, k = old.shape
        # A buffer, not a parameter: the engine takes the model's dtype from its parameters,
        # and state_dict() (so memory()) still counts it.
        blocks = torch.empty(n, k // self.block * self.block_bytes, dtype=torch.uint8,
                             device=old.device)
        blocks.chunks, blocks.ggml_type = old.chunks, self.ggml_type
        set_weight(layer, blocks)

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        return getattr(ops, f"{self.name}_linear")(x, layer.weight, bias)

    def kernel_kind(self, layer: nn.Module, rows: int) -> str | None:
        w = layer.weight
        if w.is_cuda or ops.cpu.kernels() is None:
            return None
        return ops.cpu.block_kernel(self.name, w, ops.reference.gguf_k(self.name, w), rows)

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return getattr(ops, f"{self.name}_embedding")(ids, layer.weight)


def set_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Make ``weight`` (a tensor in a GGUF block format) the layer's ``weight`` buffer, in
    place of its float parameter."""
    if "weight" in layer._parameters:
        del layer._parameters["weight"]
    layer.register_buffer("weight", weight)


class Q4_0Method(Q8_0Method):
    """GGUF Q4_0 blocks (fp16 scale + 16 bytes of 4-bit weights per 32), as Q8_0Method."""

    name, ggml_type, block_bytes = "q4_0", "Q4_0", 18


class Q4_1Method(Q8_0Method):
    """GGUF Q4_1 blocks (fp16 scale, fp16 minimum, 16 bytes of 4-bit weights per 32)."""

    name, ggml_type, block_bytes = "q4_1", "Q4_1", 20


class Q4_KMethod(Q8_0Method):
    """GGUF Q4_K super-blocks (256 weights in 144 bytes: fp16 d and dmin, 6-bit sub-block
    scales and mins, 4-bit weights); K shards must be whole super-blocks."""

    name, ggml_type, block, block_bytes = "q4_k", "Q4_K", 256, 144


class Q6_KMethod(Q8_0Method):
    """GGUF Q6_K super-blocks (256 weights in 210 bytes: 6-bit weights, int8 scales per 16,
    fp16 d)."""

    name, ggml_type, block, block_bytes = "q6_k", "Q6_K", 256, 210


UNQUANTIZED = QuantMethod()
# GGUF block type -> the method that keeps it quantized.
GGUF_METHODS: dict[str, QuantMethod] = {"Q8_0": Q8_0Method(), "Q4_0": Q4_0Method(),
                                        "Q4_1": Q4_1Method(), "Q4_K": Q4_KMethod(),
                                        "Q6_K": Q6_KMethod()}

"""GGUFCheckpoint: the Checkpoint protocol over a llama.cpp ``.gguf`` file.

Design choices:
- The file is memory-mapped (``gguf.GGUFReader``); nothing is read until ``read()`` asks.
- Names and shapes are Hugging Face's. GGUF stores a 2-D weight as ggml dims
  ``[in, out]``, i.e. row-major ``(out, in)``: one GGUF row is one HF output row, so
  ``read(name, dim=0, ...)`` dequantizes only those rows' bytes. A column slice (``dim=1``)
  dequantizes the blocks that cover the columns, then narrows.
- llama.cpp's converter permutes q_proj/k_proj rows of llama-family models (rotary in
  interleaved pairs instead of halves), per head. ``read`` undoes it per head, so a row
  slice of whole heads is exact; a slice through the middle of a head is refused.
  Qwen2 files are not permuted.
- Problems with the file (missing, not GGUF, truncated, unsupported tensor type or
  architecture) are found at open and raised as CheckpointError.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import torch

import gguf
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..config import ModelConfig
from ..errors import CheckpointError

_Q = GGMLQuantizationType
SUPPORTED_TYPES = (_Q.F32, _Q.F16, _Q.BF16, _Q.Q8_0, _Q.Q4_0, _Q.Q4_1, _Q.Q4_K, _Q.Q6_K)
# Types whose reader array holds elements, not bytes.
_ELEMENT_TYPES = (_Q.F32, _Q.F16)

# GGUF tensor stem -> HF stem ("{N}" is the layer index); ".weight"/".bias" carry over.
GGUF_TO_HF = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{N}.attn_norm": "model.layers.{N}.input_layernorm",
    "blk.{N}.attn_q": "model.layers.{N}.self_attn.q_proj",
    "blk.{N}.attn_k": "model.layers.{N}.self_attn.k_proj",
    "blk.{N}.attn_v": "model.layers.{N}.self_attn.v_proj",
    "blk.{N}.attn_output": "model.layers.{N}.self_attn.o_proj",
    "blk.{N}.ffn_norm": "model.layers.{N}.post_attention_layernorm",
    "blk.{N}.ffn_gate": "model.layers.{N}.mlp.gate_proj",
    "blk.{N}.ffn_up": "model.layers.{N}.mlp.up_proj",
    "blk.{N}.ffn_down": "model.layers.{N}.mlp.down_proj",
}
# Architectures whose converter permuted q/k rows (llama.cpp `LlamaModel.permute`).
_PERMUTED_ARCHS = ("llama", "mistral")
_GGUF_NAME = re.compile(r"^(?:blk\.(\d+)\.)?(.+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor, or None when parallax has no use for it."""
    m = _GGUF_NAME.match(gguf_name)
    if m is None:
        return None
    layer, stem, kind = m.groups()
    key = stem if layer is None else f"blk.{{N}}.{stem}"
    hf = GGUF_TO_HF.get(key)
    if hf is None:
        return None
    return f"{hf.format(N=layer)}.{kind}"


class _Reader(gguf.GGUFReader):
    """GGUFReader that checks the file holds all tensor bytes before making views of them.

    It also keeps the mapped file as a plain ndarray view: slicing a np.memmap runs a
    Python ``__array_finalize__`` per slice, and the metadata of a 49k-token vocabulary
    takes ~750k slices (2.3 s -> 0.5 s to open SmolLM2).
    """

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._data = value.view(np.ndarray)   # still backed by the memory map

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        need, last = 0, ""
        for field in fields:
            _, name_data, _, dims, raw_dtype, offset = field.parts
            name = bytes(name_data).decode("utf-8", "replace")
            try:
                qtype = GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError:
                raise CheckpointError(
                    f"tensor {name!r} has unknown ggml type id {int(raw_dtype[0])}; the file is "
                    f"corrupt or newer than the installed gguf package") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            end = start_offs + int(offset[0]) + int(np.prod(dims)) * type_size // block
            if end > need:
                need, last = end, name
        if need > len(self.data):
            raise CheckpointError(
                f"truncated GGUF file: its tensors need {need} bytes (up to the end of {last!r}) "
                f"but the file has {len(self.data)}; re-download or re-convert it")
        super()._build_tensors(start_offs, fields)


def _open_reader(path: str) -> gguf.GGUFReader:
    if not os.path.isfile(path):
        raise CheckpointError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(
            f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        return _Reader(path)
    except CheckpointError:
        raise
    except (ValueError, IndexError, KeyError, OverflowError, TypeError) as e:
        raise CheckpointError(
            f"{path}: GGUF header is corrupt or truncated ({type(e).__name__}: {e})") from None


def _unpermute_rows(w: np.ndarray, head_dim: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation; ``w`` holds whole heads along dim 0.

    The converter did ``w.reshape(n_head, 2, head_dim // 2, *rest).swapaxes(1, 2)``.
    """
    rest = w.shape[1:]
    n_head = w.shape[0] // head_dim
    return w.reshape(n_head, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpoint:
    """A ``.gguf`` file as a Checkpoint: HF names, HF shapes, float reads of any slice."""

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        self._reader = _open_reader(self.path)
        self.metadata: dict[str, Any] = {k: f.contents() for k, f in self._reader.fields.items()}
        gguf_names = {t.name for t in self._reader.tensors}
        self.metadata["parallax.tied_embeddings"] = "output.weight" not in gguf_names
        self.config: ModelConfig = ModelConfig.from_gguf_metadata(self.metadata)

        self._tensors: dict[str, Any] = {}      # HF name -> gguf ReaderTensor
        self.skipped: list[str] = []            # GGUF tensors with no HF counterpart
        for t in self._reader.tensors:
            name = hf_name(t.name)
            if name is None:
                self.skipped.append(t.name)
                continue
            if t.tensor_type not in SUPPORTED_TYPES:
                raise CheckpointError(
                    f"tensor {t.name!r} uses ggml type {t.tensor_type.name}, which parallax cannot "
                    f"dequantize; supported: {', '.join(q.name for q in SUPPORTED_TYPES)}")
            self._tensors[name] = t

    # ------------------------------------------------------------------ protocol
    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensor(name).shape.tolist()))

    def read(self, name: str, dim: int | None = None, start: int = 0,
             length: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        t = self._tensor(name)
        shape = self.shape(name)
        permuted = self._is_permuted(name)
        if dim is None:
            start, length = 0, None
        else:
            if not -len(shape) <= dim < len(shape):
                raise CheckpointError(f"{name} has shape {shape}; cannot slice dim {dim}")
            dim %= len(shape)
            if length is None:
                length = shape[dim] - start
            if start < 0 or length < 0 or start + length > shape[dim]:
                raise CheckpointError(
                    f"slice [{start}, {start + length}) of dim {dim} is outside {name} {shape}")

        data = t.data
        if dim == 0:
            if permuted:
                hd = self.config.head_dim
                if start % hd or length % hd:
                    raise CheckpointError(
                        f"{name} rows are stored permuted per head in GGUF, so a row slice must "
                        f"cover whole heads (start and length multiples of head_dim={hd}); "
                        f"got start={start}, length={length}")
            data = data[start:start + length]
        elif dim is not None:
            if dim != len(shape) - 1:
                raise CheckpointError(f"{name} {shape}: only dim 0 or the last dim can be sliced")
            data, start = self._column_blocks(t, data, start, length)

        try:
            arr = gguf.quants.dequantize(data, t.tensor_type)
        except (ValueError, NotImplementedError) as e:
            raise CheckpointError(f"cannot dequantize {name} ({t.tensor_type.name}): {e}") from None
        if permuted:
            arr = _unpermute_rows(arr, self.config.head_dim)
        if dim is not None and dim != 0:      # the last dim: drop the rest of the edge blocks
            arr = arr[..., start:start + length]
        if not (arr.flags.writeable and arr.flags.c_contiguous) or arr.dtype != np.float32:
            arr = np.array(arr, dtype=np.float32, order="C")      # own, writable memory
        return torch.from_numpy(arr).to(dtype)

    def close(self) -> None:
        self._tensors.clear()
        self._reader = None

    def __enter__(self) -> "GGUFCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers
    def _tensor(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path} has no tensor {name!r}") from None

    def _is_permuted(self, name: str) -> bool:
        return (self.config.architecture in _PERMUTED_ARCHS
                and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name))

    @staticmethod
    def _column_blocks(t, data: np.ndarray, start: int, length: int) -> tuple[np.ndarray, int]:
        """Only the quant blocks covering columns ``[start, start+length)``, and the new start."""
        if t.tensor_type in _ELEMENT_TYPES:
            return data[..., start:start + length], 0
        block, type_size = GGML_QUANT_SIZES[t.tensor_type]
        b0, b1 = start // block, -(-(start + length) // block)
        return data[..., b0 * type_size:b1 * type_size], start - b0 * block

"""GGUFCheckpoint: the Checkpoint protocol over a llama.cpp ``.gguf`` file.

Design choices:
- The file is memory-mapped and parsed by our own strict reader (``gguf_reader.py``);
  nothing is read until ``read()`` asks. Dequantization is ``gguf.quants`` (public API).
- Memory follows the file: ``read_quantized`` hands out a block tensor as a view of the
  map where the slice allows (so the weights are the file's pages, held once), and every
  read that copies (float reads, fused or reordered rows) drops the file's pages it copied
  from, so no weight is resident twice.
- Names and shapes are Hugging Face's. GGUF stores a 2-D weight as ggml dims
  ``[in, out]``, i.e. row-major ``(out, in)``: one GGUF row is one HF output row, so
  ``read(name, dim=0, ...)`` dequantizes only those rows' bytes. A column slice (``dim=1``)
  dequantizes the blocks that cover the columns, then narrows.
- llama.cpp's converter permutes q_proj/k_proj rows of llama-family models (rotary in
  interleaved pairs instead of halves), per head. ``read`` undoes it per head, so a row
  slice of whole heads is exact; a slice through the middle of a head is refused.
  Qwen2 files are not permuted.
- Mixture-of-experts files stack each layer's experts in one 3-D tensor (``ffn_gate_exps``
  (E, F, d) and the like); each expert's (F, d) slab is presented as the HF per-expert
  tensor (``...experts.{E}.gate_proj``), a view of the file's bytes like any other tensor.
  Layers of a qwen2moe file without a router (``ffn_gate_inp``) are dense
  (``parallax.dense_layers``).
- llama.cpp's Gemma converters store every RMSNorm weight as 1 + w (llama.cpp's norm
  multiplies by the weight as stored); ``read`` gives back HF's w.
- Llama 3.x stores its rope scaling as ``rope_freqs.weight`` (head_dim/2 divisors of the
  rope frequencies, as llama.cpp applies them): it goes into the config
  (``rope_freq_factors``), not into the tensor names.
- A GGUF tensor with no HF counterpart keeps its GGUF name in ``names()``, so the loader's
  key check (models/loader.py) refuses it instead of ignoring it.
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
from .gguf_reader import GGUFFile, GGUFTensor

_Q = GGMLQuantizationType
SUPPORTED_TYPES = (_Q.F32, _Q.F16, _Q.BF16, _Q.Q8_0, _Q.Q4_0, _Q.Q4_1, _Q.Q4_K, _Q.Q6_K)
ROPE_FREQS = "rope_freqs.weight"

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
# Mixture-of-experts tensors; "{E}" is the expert index (one slab of a stacked tensor).
_QWEN_MOE = {
    "blk.{N}.ffn_gate_inp": "model.layers.{N}.mlp.gate",
    "blk.{N}.ffn_gate_exps": "model.layers.{N}.mlp.experts.{E}.gate_proj",
    "blk.{N}.ffn_up_exps": "model.layers.{N}.mlp.experts.{E}.up_proj",
    "blk.{N}.ffn_down_exps": "model.layers.{N}.mlp.experts.{E}.down_proj",
}
_QK_NORMS = {"blk.{N}.attn_q_norm": "model.layers.{N}.self_attn.q_norm",
             "blk.{N}.attn_k_norm": "model.layers.{N}.self_attn.k_norm"}
_GEMMA_NORMS = {"blk.{N}.post_attention_norm": "model.layers.{N}.post_attention_layernorm",
                "blk.{N}.ffn_norm": "model.layers.{N}.pre_feedforward_layernorm",
                "blk.{N}.post_ffw_norm": "model.layers.{N}.post_feedforward_layernorm"}
# Per-family (ModelConfig.architecture) additions and overrides of GGUF_TO_HF.
ARCH_GGUF_TO_HF = {
    "qwen3": _QK_NORMS,
    "gemma2": _GEMMA_NORMS,
    "gemma3": {**_GEMMA_NORMS, **_QK_NORMS},
    "mixtral": {"blk.{N}.ffn_gate_inp": "model.layers.{N}.block_sparse_moe.gate",
                "blk.{N}.ffn_gate_exps": "model.layers.{N}.block_sparse_moe.experts.{E}.w1",
                "blk.{N}.ffn_up_exps": "model.layers.{N}.block_sparse_moe.experts.{E}.w3",
                "blk.{N}.ffn_down_exps": "model.layers.{N}.block_sparse_moe.experts.{E}.w2"},
    "qwen2_moe": {**_QWEN_MOE,
                  "blk.{N}.ffn_gate_inp_shexp": "model.layers.{N}.mlp.shared_expert_gate",
                  "blk.{N}.ffn_gate_shexp": "model.layers.{N}.mlp.shared_expert.gate_proj",
                  "blk.{N}.ffn_up_shexp": "model.layers.{N}.mlp.shared_expert.up_proj",
                  "blk.{N}.ffn_down_shexp": "model.layers.{N}.mlp.shared_expert.down_proj"},
    "qwen3_moe": {**_QWEN_MOE, **_QK_NORMS},
    # llama.cpp keeps Phi-3's fused tensors fused: q|k|v rows, and gate|up rows in ffn_up.
    "phi3": {"blk.{N}.attn_qkv": "model.layers.{N}.self_attn.qkv_proj",
             "blk.{N}.ffn_up": "model.layers.{N}.mlp.gate_up_proj"},
}
# Architectures whose converter permuted q/k rows (llama.cpp `LlamaModel.permute`).
_PERMUTED_ARCHS = ("llama", "mistral", "mixtral")
# Families whose GGUF norm weights are stored as 1 + w (llama.cpp's Gemma converters).
_NORM_PLUS_ONE = ("gemma2", "gemma3")
_GGUF_NAME = re.compile(r"^(?:blk\.(\d+)\.)?(.+)\.(weight|bias)$")


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The HF name of a GGUF tensor of an ``arch`` family's model (with "{E}" for the expert
    of a stacked expert tensor), or None when parallax has no use for it."""
    m = _GGUF_NAME.match(gguf_name)
    if m is None:
        return None
    layer, stem, kind = m.groups()
    key = stem if layer is None else f"blk.{{N}}.{stem}"
    hf = ARCH_GGUF_TO_HF.get(arch, {}).get(key) or GGUF_TO_HF.get(key)
    if hf is None:
        return None
    return f"{hf.format(N=layer, E='{E}')}.{kind}"


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
        self._file = GGUFFile(self.path)
        tensors = self._file.tensors
        self.metadata: dict[str, Any] = dict(self._file.metadata)
        self.metadata["parallax.tied_embeddings"] = "output.weight" not in tensors
        # llama.cpp loads the biases of a llama-family layer when they are there: so do we.
        for key, stem in (("qkv", "attn_q"), ("o_proj", "attn_output"), ("mlp", "ffn_up")):
            self.metadata[f"parallax.{key}_bias"] = f"blk.0.{stem}.bias" in tensors
        if "token_embd.weight" in tensors:
            self.metadata["parallax.embedding_rows"] = tensors["token_embd.weight"].shape[0]
        routed = [int(n.split(".")[1]) for n in tensors if n.endswith(".ffn_gate_inp.weight")]
        if routed:
            n_layers = max(int(n.split(".")[1]) for n in tensors if n.startswith("blk.")) + 1
            self.metadata["parallax.dense_layers"] = sorted(set(range(n_layers)) - set(routed))
        factors = None
        if ROPE_FREQS in tensors:
            factors = self._read_tensor(tensors[ROPE_FREQS], ROPE_FREQS).reshape(-1).tolist()
        self.config: ModelConfig = ModelConfig.from_gguf_metadata(self.metadata, factors)

        self._tensors: dict[str, GGUFTensor] = {}   # HF name -> tensor
        self.unmapped: list[str] = []               # GGUF tensors with no HF counterpart
        for t in tensors.values():
            if t.name == ROPE_FREQS:
                continue
            name = hf_name(t.name, self.config.architecture)
            if name is None:
                self.unmapped.append(t.name)
                continue
            if t.tensor_type not in SUPPORTED_TYPES:
                raise CheckpointError(
                    f"tensor {t.name!r} uses ggml type {t.tensor_type.name}, which parallax cannot "
                    f"dequantize; supported: {', '.join(q.name for q in SUPPORTED_TYPES)}")
            if "{E}" not in name:
                self._tensors[name] = t
                continue
            if len(t.shape) != 3:
                raise CheckpointError(f"{t.name} {t.shape}: stacked experts must be 3-D "
                                      "(experts, rows, columns)")
            for e in range(t.shape[0]):   # expert e: a (rows, columns) view of the file
                self._tensors[name.replace("{E}", str(e))] = GGUFTensor(
                    f"{t.name}[{e}]", t.tensor_type, t.dims[:2], t.data[e])

    # ------------------------------------------------------------------ protocol
    def names(self) -> list[str]:
        """HF names of the mapped tensors, then the GGUF names of the unmapped ones."""
        return list(self._tensors) + self.unmapped

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensor(name).shape

    def read(self, name: str, dim: int | None = None, start: int = 0,
             length: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        t = self._tensor(name)
        dim, start, length = self._check_slice(name, t.shape, dim, start, length)
        data = self._slice_rows(name, t, dim, start, length)
        if dim is not None and dim != 0 and len(t.shape) > 1 or dim == 0 and len(t.shape) == 1:
            data, start = self._column_blocks(t, data, start, length)

        arr = self._dequantize(data, t, name)
        if self._is_permuted(name):
            arr = self._unpermute(name, arr)
        if self.config.architecture in _NORM_PLUS_ONE and name.endswith("norm.weight"):
            arr = arr - np.float32(1)
        if dim is not None and (dim != 0 or len(t.shape) == 1):   # drop the edge blocks' rest
            arr = arr[..., start:start + length]
        out = self._to_torch(arr, dtype, data)
        self._file.release(data)        # the float copy replaces the file's bytes in RSS
        return out

    def ggml_type(self, name: str) -> str:
        """The ggml type name of tensor ``name`` ("F32", "Q8_0", "Q4_1", ...)."""
        return self._tensor(name).tensor_type.name

    def read_quantized(self, name: str, dim: int | None = None, start: int = 0,
                       length: int | None = None, copy: bool = False) -> torch.Tensor:
        """The raw blocks of a 2-D tensor's slice, as in the file: uint8 (rows, bytes per
        row), rows in HF order (q/k un-permuted). A slice along the last dim must start and
        end on block boundaries (CheckpointError otherwise).

        Zero-copy where it can be: a whole tensor or a row range that needs no reordering
        is a view of the file's map (it keeps the map alive; its pages are the page
        cache's, resident once touched). A column slice, permuted q/k rows, or
        ``copy=True`` (the caller copies it on, e.g. into a fused tensor) give own memory,
        and the file's pages behind them leave this process's RSS."""
        t = self._tensor(name)
        if len(t.shape) != 2:
            raise CheckpointError(f"{name} {t.shape}: only 2-D tensors are read as raw blocks")
        dim, start, length = self._check_slice(name, t.shape, dim, start, length)
        data = self._slice_rows(name, t, dim, start, length)
        if dim == 1:
            block, type_size = GGML_QUANT_SIZES[t.tensor_type]
            if start % block or length % block:
                raise CheckpointError(
                    f"{name}: columns [{start}, {start + length}) cut a {t.tensor_type.name} "
                    f"block of {block}; a quantized slice must start and end on block "
                    f"boundaries (pick a tp size that splits K into multiples of {block})")
            data = data[:, start // block * type_size:(start + length) // block * type_size]
        if self._is_permuted(name):
            arr = np.ascontiguousarray(self._unpermute(name, data))
        elif copy or not data.flags.c_contiguous:
            arr = np.array(data, dtype=np.uint8, order="C")
        else:
            return torch.from_numpy(data)                        # a view of the map
        if np.may_share_memory(arr, data):   # one head of head_dim rows: no reordering
            arr = arr.copy()
        self._file.release(data)
        return torch.from_numpy(arr)

    def close(self) -> None:
        self._tensors.clear()
        self._file.close()

    def __enter__(self) -> "GGUFCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers
    def _tensor(self, name: str) -> GGUFTensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path} has no tensor {name!r} that parallax can read") from None

    def _read_tensor(self, t: GGUFTensor, name: str) -> torch.Tensor:
        if t.tensor_type not in SUPPORTED_TYPES:
            raise CheckpointError(f"tensor {name!r} uses unsupported ggml type {t.tensor_type.name}")
        return self._to_torch(self._dequantize(t.data, t, name), torch.float32, t.data)

    @staticmethod
    def _dequantize(data: np.ndarray, t: GGUFTensor, name: str) -> np.ndarray:
        try:
            return gguf.quants.dequantize(data, t.tensor_type)
        except (ValueError, NotImplementedError) as e:
            raise CheckpointError(f"cannot dequantize {name} ({t.tensor_type.name}): {e}") from None

    @staticmethod
    def _to_torch(arr: np.ndarray, dtype: torch.dtype, src: np.ndarray) -> torch.Tensor:
        """``arr`` as a torch tensor of ``dtype`` in its own memory (never a view of
        ``src``, the file's bytes it came from: F32 data dequantises to a view of them)."""
        if (not arr.flags.c_contiguous or arr.dtype != np.float32
                or np.may_share_memory(arr, src)):
            arr = np.array(arr, dtype=np.float32, order="C")
        return torch.from_numpy(arr).to(dtype)

    def _is_permuted(self, name: str) -> bool:
        return (self.config.architecture in _PERMUTED_ARCHS
                and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name))

    @staticmethod
    def _check_slice(name: str, shape: tuple[int, ...], dim: int | None, start: int,
                     length: int | None) -> tuple[int | None, int, int | None]:
        """(dim made non-negative, start, length) of a valid slice; (None, 0, None): all."""
        if dim is None:
            return None, 0, None
        if not -len(shape) <= dim < len(shape):
            raise CheckpointError(f"{name} has shape {shape}; cannot slice dim {dim}")
        dim %= len(shape)
        if length is None:
            length = shape[dim] - start
        if start < 0 or length < 0 or start + length > shape[dim]:
            raise CheckpointError(
                f"slice [{start}, {start + length}) of dim {dim} is outside {name} {shape}")
        if dim not in (0, len(shape) - 1):
            raise CheckpointError(f"{name} {shape}: only dim 0 or the last dim can be sliced")
        return dim, start, length

    def _slice_rows(self, name: str, t: GGUFTensor, dim: int | None, start: int,
                    length: int | None) -> np.ndarray:
        """The tensor's bytes (uint8 (..., bytes per row)), only rows [start, start+length)
        for a row slice of a 2-D+ tensor (whole heads where the rows are permuted)."""
        data = t.data
        if dim == 0 and len(t.shape) > 1:
            if self._is_permuted(name):
                hd = self.config.head_dim
                if start % hd or length % hd:
                    raise CheckpointError(
                        f"{name} rows are stored permuted per head in GGUF, so a row slice "
                        f"must cover whole heads (start and length multiples of head_dim={hd}); "
                        f"got start={start}, length={length}")
            data = data[start:start + length]
        return data

    def _unpermute(self, name: str, arr: np.ndarray) -> np.ndarray:
        hd = self.config.head_dim
        if arr.shape[0] % hd:
            raise CheckpointError(f"{name} has {arr.shape[0]} rows, not whole heads of "
                                  f"head_dim={hd}")
        return _unpermute_rows(arr, hd)

    @staticmethod
    def _column_blocks(t: GGUFTensor, data: np.ndarray, start: int,
                       length: int) -> tuple[np.ndarray, int]:
        """Only the bytes of the blocks covering columns ``[start, start+length)``, and the
        new start within them."""
        block, type_size = GGML_QUANT_SIZES[t.tensor_type]
        b0, b1 = start // block, -(-(start + length) // block)
        return data[..., b0 * type_size:b1 * type_size], start - b0 * block

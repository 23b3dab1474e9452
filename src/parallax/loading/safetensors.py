"""Reads HF safetensors checkpoints (one file or sharded with an index) slice by slice.

``safe_open(...).get_slice`` reads only the requested rows/columns from disk, so a rank
materialises only its own shard of each tensor.
"""

from __future__ import annotations

import json
import logging
import os
import struct

import torch
from safetensors import safe_open

from ..config import ModelConfig
from ..errors import CheckpointError

logger = logging.getLogger(__name__)

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _check_file(path: str) -> dict[str, tuple[int, ...]]:
    """Validate a .safetensors header against the file before anything is mapped: every
    entry well-formed, every tensor's bytes inside the file and matching its dtype and
    shape, so corruption and truncation are reported by name. Returns name -> shape."""
    size = os.path.getsize(path)

    def corrupt(what: str) -> CheckpointError:
        return CheckpointError(f"{path} is corrupt ({what}); re-download or re-save it")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated ({size} bytes); re-download or re-save it")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path} is corrupt or truncated: header claims {n} bytes, "
                                  f"file has {size}; re-download or re-save it")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):   # bad JSON, bad UTF-8, absurd nesting
            raise corrupt("the safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise corrupt("the safetensors header is not a JSON object")
    shapes: dict[str, tuple[int, ...]] = {}
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
                raise corrupt("__metadata__ must map strings to strings")
            continue
        if not isinstance(meta, dict):
            raise corrupt(f"entry {name!r} is not an object")
        dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
            raise corrupt(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise corrupt(f"tensor {name!r} has a malformed shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets))
                or offsets[0] > offsets[1]):
            raise corrupt(f"tensor {name!r} has malformed data_offsets {offsets!r}")
        nbytes = _DTYPE_BYTES[dtype]
        for d in shape:
            nbytes *= d
        if offsets[1] - offsets[0] != nbytes:
            raise corrupt(f"tensor {name!r}: {dtype} {shape} needs {nbytes} bytes but its "
                          f"data_offsets span {offsets[1] - offsets[0]}")
        shapes[name] = tuple(shape)
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: tensors need {8 + n + end} bytes but the file "
                              f"has {size}; re-download or re-save it")
    _open(path)     # the library's own checks (overlaps, alignment), here in the caller
    return shapes


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _open(path: str):
    try:
        return safe_open(path, framework="pt")
    except Exception as e:     # SafetensorError (not exported by every version), OSError
        raise CheckpointError(f"{path} cannot be opened as safetensors ({e}); re-download or "
                              f"re-save it") from None


def _read_index(index: str, folder: str) -> dict[str, str]:
    """weight_map of a sharded checkpoint's index; every shard must be a file in ``folder``."""
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise CheckpointError(f"{index} is not a valid safetensors index (JSON with a "
                              f"weight_map); re-download it") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
    for fname in set(weight_map.values()):
        # Only plain names: an index must not point parallax at files outside the folder.
        if os.path.basename(fname) != fname or fname in ("", ".", "..") or "\\" in fname:
            raise CheckpointError(f"{index} names shard {fname!r}, which is not a file name inside "
                                  f"{folder}; parallax reads shards only from the checkpoint folder")
    return weight_map


class SafetensorsCheckpoint:
    """A HF checkpoint folder: config.json + model.safetensors or sharded *.safetensors."""

    def __init__(self, folder: str):
        self.folder = folder
        self.config = ModelConfig.from_json(os.path.join(folder, "config.json"))
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index):
            weight_map = _read_index(index, folder)
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors files in {folder}; parallax reads safetensors "
                                      f"(convert .bin checkpoints with transformers' save_pretrained)")
            weight_map = {}
        self._file_of: dict[str, str] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        for fname in files:
            path = os.path.join(folder, fname)
            if not os.path.exists(path):
                raise CheckpointError(f"{index} names {fname}, which is missing from {folder}")
            for name, shape in _check_file(path).items():
                if name in self._file_of:
                    raise CheckpointError(f"tensor {name!r} is in both {self._file_of[name]} and {path}")
                self._file_of[name] = path
                self._shape[name] = shape
        missing = set(weight_map) - set(self._file_of)
        if missing:
            raise CheckpointError(f"tensors listed in the index are missing: {sorted(missing)[:5]}")
        self._handles: dict[str, object] = {}

    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shape:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint at {self.folder}")
        return self._shape[name]

    def read(self, name: str, dim: int | None = None, start: int = 0, length: int | None = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        shape = self.shape(name)
        path = self._file_of[name]
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = _open(path)
        if dim is not None:
            if not 0 <= dim < len(shape):
                raise CheckpointError(f"{name} has shape {shape}; cannot slice dim {dim}")
            length = shape[dim] - start if length is None else length
            if start < 0 or length < 0 or start + length > shape[dim]:
                raise CheckpointError(f"slice [{start}, {start + length}) of dim {dim} is outside "
                                      f"{name} with shape {shape}")
        try:
            if dim is None:
                t = handle.get_tensor(name)
            else:
                index = tuple([slice(None)] * dim + [slice(start, start + length)])
                t = handle.get_slice(name)[index]
            return t.to(dtype)
        except Exception as e:    # SafetensorError, or a dtype torch cannot convert
            raise CheckpointError(f"cannot read {name} from {path} ({e})") from None

    def close(self) -> None:
        self._handles.clear()

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


def _check_file(path: str) -> dict:
    """Validate a .safetensors header and size up front, so truncation is reported by name."""
    size = os.path.getsize(path)
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
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} has a corrupt safetensors header; re-download it") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: tensors need {8 + n + end} bytes but the file "
                              f"has {size}; re-download or re-save it")
    return header


class SafetensorsCheckpoint:
    """A HF checkpoint folder: config.json + model.safetensors or sharded *.safetensors."""

    def __init__(self, folder: str):
        self.folder = folder
        self.config = ModelConfig.from_json(os.path.join(folder, "config.json"))
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
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
            for name, meta in _check_file(path).items():
                if name != "__metadata__":
                    self._file_of[name] = path
                    self._shape[name] = tuple(meta["shape"])
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
            handle = self._handles[path] = safe_open(path, framework="pt")
        if dim is None:
            t = handle.get_tensor(name)
        else:
            length = shape[dim] - start if length is None else length
            if start < 0 or start + length > shape[dim]:
                raise CheckpointError(f"slice [{start}, {start + length}) of dim {dim} is outside "
                                      f"{name} with shape {shape}")
            index = tuple([slice(None)] * dim + [slice(start, start + length)])
            t = handle.get_slice(name)[index]
        return t.to(dtype)

    def close(self) -> None:
        self._handles.clear()

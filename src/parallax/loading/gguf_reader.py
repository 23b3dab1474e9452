"""A small, strict reader of the GGUF container (v2 and v3, little-endian), over a memory map.

It parses the header, the key/value metadata and the tensor infos, and hands out each
tensor's bytes as a numpy view of the map; dequantization is ``gguf.quants`` (public API).

The map is private and copy-on-write (``mmap.ACCESS_COPY``): the file is opened read-only
and never changes, yet a view is a writable buffer, so torch tensors can wrap it without
copying (a tensor over a read-only map would fault on the first write, and torch warns on
non-writable buffers). Until a page is written it is the page cache's page, shared with
every process that maps the file. Pages counted in RSS are the ones touched; a caller that
copies bytes out drops their pages with ``release`` (``madvise(MADV_DONTNEED)``), so the
copy is not held twice.
We own this instead of subclassing ``gguf.GGUFReader`` because its checks live in private
methods and it trusts the file: a corrupt count or length there becomes a huge allocation,
an IndexError or a view past the end. Here every count, length, offset and type is checked
against the bytes that are actually there before anything is allocated, so a bad file is
always a CheckpointError.

Layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):
``magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv | kv * n_kv | tensor_info * n_tensors
| padding to ``general.alignment`` (32) | tensor data``; a string is ``u64 length + bytes``;
a tensor info is ``name | u32 n_dims | u64 dims[n_dims] | u32 ggml type | u64 offset``,
dims in ggml order (fastest first: a row-major (out, in) matrix has dims [in, out]).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import CheckpointError

# GGUF metadata value types (gguf.GGUFValueType) -> struct format of one element.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4                   # GGML_MAX_DIMS
_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's info; ``data`` is a uint8 view of the file's map (..., bytes per row)."""
    name: str
    tensor_type: GGMLQuantizationType
    dims: tuple[int, ...]       # ggml order: dims[0] is the contiguous (row) length
    data: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        """Row-major shape (HF order): reversed ggml dims."""
        return tuple(reversed(self.dims))


def _span(view: np.ndarray) -> int:
    """Bytes from a view's first element to one past its last (non-negative strides)."""
    return view.itemsize + sum((n - 1) * st for n, st in zip(view.shape, view.strides))


class GGUFFile:
    """The parsed file: ``metadata`` (key -> Python value; arrays as lists) and ``tensors``
    (name -> GGUFTensor), in file order."""

    def __init__(self, path: str) -> None:
        self.path = path
        if not os.path.isfile(path):
            raise CheckpointError(f"GGUF file not found: {path}")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise CheckpointError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
        with open(path, "rb") as f:     # the map outlives the descriptor
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        # A plain ndarray over the map (views of it keep the map alive after close()).
        self._data = np.frombuffer(self._map, dtype=np.uint8)
        self._buf = memoryview(self._data)
        self._pos = 4
        self.size = size
        version = self._unpack("<I")
        if version not in (2, 3):
            raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 and 3 are; "
                                  f"re-convert with a current llama.cpp)")
        n_tensors, n_kv = self._unpack("<Q"), self._unpack("<Q")
        # Each kv needs >= 8 + 4 bytes, each tensor info >= 8 + 4 + 4 + 8.
        self._need(n_kv * 12 + n_tensors * 24, "the metadata and tensor counts")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            if key in self.metadata:
                raise self._corrupt(f"metadata key {key!r} appears twice")
            self.metadata[key] = self._value(self._unpack("<I"), key)
        infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
            raise self._corrupt(f"general.alignment={alignment!r} is not a power of two")
        start = -(-self._pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensor] = {}
        for name, qtype, dims, offset in infos:
            if name in self.tensors:
                raise self._corrupt(f"tensor {name!r} appears twice")
            self.tensors[name] = self._tensor(name, qtype, dims, offset, start, alignment)

    # ------------------------------------------------------------------ parsing
    def _corrupt(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: corrupt GGUF file ({what}); re-download or re-convert it")

    def _need(self, n: int, what: str) -> None:
        if n > self.size - self._pos:
            raise CheckpointError(
                f"{self.path} is truncated or corrupt: {what} need {n} bytes at offset {self._pos} "
                f"but the file has {self.size}; re-download or re-convert it")

    def _unpack(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        self._need(n, f"a {fmt[1:]} field")
        (value,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += n
        return value

    def _string(self) -> str:
        n = self._unpack("<Q")
        self._need(n, "a string")
        raw = bytes(self._buf[self._pos:self._pos + n])
        self._pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._corrupt(f"a string at offset {self._pos - n} is not UTF-8") from None

    def _value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALAR:
            return self._unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self._string()
        if vtype != _ARRAY:
            raise self._corrupt(f"metadata {key!r} has unknown value type {vtype}")
        etype, n = self._unpack("<I"), self._unpack("<Q")
        if etype in _NUMPY:
            width = np.dtype(_NUMPY[etype]).itemsize
            self._need(n * width, f"array {key!r}")
            arr = np.frombuffer(self._buf, dtype=_NUMPY[etype], count=n, offset=self._pos)
            self._pos += n * width
            return arr.tolist()
        if etype == _STRING:
            self._need(n * 8, f"array {key!r}")
            return [self._string() for _ in range(n)]
        # Nested arrays: no llama-family key uses them; refuse rather than recurse unbounded.
        raise self._corrupt(f"metadata {key!r} is an array of unsupported type {etype}")

    def _tensor_info(self) -> tuple[str, GGMLQuantizationType, tuple[int, ...], int]:
        name = self._string()
        n_dims = self._unpack("<I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise self._corrupt(f"tensor {name!r} has {n_dims} dims (1..{_MAX_DIMS} allowed)")
        dims = tuple(self._unpack("<Q") for _ in range(n_dims))
        raw = self._unpack("<I")
        try:
            qtype = GGMLQuantizationType(raw)
        except ValueError:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has unknown ggml type id {raw}; the file is corrupt "
                f"or newer than the installed gguf package") from None
        return name, qtype, dims, self._unpack("<Q")

    def _tensor(self, name: str, qtype: GGMLQuantizationType, dims: tuple[int, ...],
                offset: int, start: int, alignment: int) -> GGUFTensor:
        block, type_size = GGML_QUANT_SIZES[qtype]
        if dims[0] % block:
            raise self._corrupt(f"tensor {name!r}: row length {dims[0]} is not a multiple of the "
                                f"{qtype.name} block size {block}")
        if offset % alignment:
            raise self._corrupt(f"tensor {name!r}: data offset {offset} is not aligned to {alignment}")
        rows = 1
        for d in dims[1:]:
            rows *= d
        row_bytes = dims[0] // block * type_size
        begin, nbytes = start + offset, rows * row_bytes
        if begin + nbytes > self.size:
            raise CheckpointError(
                f"{self.path} is truncated: tensor {name!r} needs bytes up to {begin + nbytes} but the "
                f"file has {self.size}; re-download or re-convert it")
        data = self._data[begin:begin + nbytes].reshape(*reversed(dims[1:]), row_bytes)
        return GGUFTensor(name, qtype, dims, data)

    def release(self, view: np.ndarray) -> None:
        """Drop from this process's resident memory the pages lying wholly inside ``view``'s
        bytes (a view of this file, e.g. ``GGUFTensor.data`` sliced), after its bytes were
        copied elsewhere. Nothing is lost: an untouched page of the map comes back from the
        file when read again. Pages it shares with neighbouring bytes stay."""
        if self._data is None or not hasattr(mmap, "MADV_DONTNEED") or view.size == 0:
            return
        base = self._data.ctypes.data
        lo = view.ctypes.data - base
        hi = lo + _span(view)
        if not (0 <= lo and hi <= self.size):
            raise ValueError("release() takes a view of this file's map")
        page = mmap.PAGESIZE
        lo, hi = -(-lo // page) * page, hi // page * page
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        """Forget the tensors; the map itself closes when the last view of it goes."""
        self.tensors = {}
        self._buf = self._data = self._map = None

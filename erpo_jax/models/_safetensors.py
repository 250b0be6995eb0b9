"""Minimal safetensors reader/writer on NumPy memory maps.

The ``safetensors`` package's NumPy backend has no bfloat16, which is the
dtype of nearly every real checkpoint. The format is simple (an 8-byte
little-endian header length, a JSON header of ``{name: {dtype, shape,
data_offsets}}``, then raw little-endian bytes), so we read it with
``np.memmap`` and ``ml_dtypes``: tensors are views into the file, and a
sharded parameter reads only its shard's bytes. Files we write are read by
``safetensors``/``transformers`` unchanged.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

__all__ = ["SafetensorsFile", "write_safetensors"]

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """Lazy view of one ``.safetensors`` file.

    ``shape(name)`` reads only the header; ``tensor(name)`` is a read-only
    memory-mapped array (no copy until sliced and cast).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"safetensors file {self.path!r} does not exist")
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.metadata = header.pop("__metadata__", None) or {}
        self._header = header
        self._offset = 8 + n
        self._mmap: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self._header)

    def __contains__(self, name: str) -> bool:
        return name in self._header

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def dtype_name(self, name: str) -> str:
        """The safetensors dtype code of ``name`` (``"BF16"``, ``"F32"``, ``"F8_E4M3"``, ...)."""
        return str(self._header[name]["dtype"])

    def tensor(self, name: str) -> np.ndarray:
        info = self._header[name]
        if info["dtype"] not in _DTYPES:
            raise ValueError(
                f"tensor {name!r} in {self.path!r} has dtype {info['dtype']}; "
                f"supported: {sorted(_DTYPES)}"
            )
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._offset)
        begin, end = info["data_offsets"]
        return self._mmap[begin:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes NumPy arrays (``ml_dtypes.bfloat16`` included) as one safetensors file."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        if array.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}; cannot write it")
        header[name] = {
            "dtype": _NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        arrays.append(array)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data must start 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in arrays:
            f.write(array.tobytes())

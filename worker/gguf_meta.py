"""A GGUF file's metadata and where its tensor data starts, read with the standard library.

The gateway plans from these (a gateway-only install has no llama.cpp and no `gguf`
package), and a split head counts layers with them. Layout (GGUF v2/v3, little endian):
`"GGUF" | version u32 | n_tensors u64 | n_kv u64 | n_kv x (key, type u32, value) |
n_tensors x (name, n_dims u32, dims u64[n_dims], type u32, offset u64) | padding to
general.alignment (32) | tensor data`. Strings are `len u64 | bytes`. The tensor data
section runs to the end of the file, so the weights' size is `file size - data offset`.
Large arrays (the vocabulary) are skipped and kept as their length.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_KEEP_ARRAY = 4096  # numeric arrays up to this length are kept (per-layer values)


class GGUFError(ValueError):
    pass


@dataclass(frozen=True)
class ArrayLen:
    """An array that was skipped: its element type and length."""

    type: int
    count: int

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class GGUFMeta:
    metadata: dict[str, Any]
    n_tensors: int
    data_offset: int
    file_size: int

    @property
    def tensor_bytes(self) -> int:
        return self.file_size - self.data_offset

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", "llama"))

    def arch_get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.arch}.{key}", default)


class _Reader:
    def __init__(self, f: BinaryIO) -> None:
        self.f = f

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        raw = self.f.read(size)
        if len(raw) != size:
            raise GGUFError("truncated GGUF header")
        return struct.unpack(fmt, raw)[0]

    def string(self) -> str:
        n = self.take("<Q")
        raw = self.f.read(n)
        if len(raw) != n:
            raise GGUFError("truncated GGUF string")
        return raw.decode("utf-8", "replace")

    def skip_string(self) -> None:
        self.f.seek(self.take("<Q"), os.SEEK_CUR)

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype in _SCALARS and count <= _KEEP_ARRAY:
                return [self.take(_SCALARS[etype]) for _ in range(count)]
            if etype in _SCALARS:
                self.f.seek(struct.calcsize(_SCALARS[etype]) * count, os.SEEK_CUR)
            elif etype == _STRING:
                for _ in range(count):
                    self.skip_string()
            else:
                for _ in range(count):
                    self.value(etype)
            return ArrayLen(etype, count)
        raise GGUFError(f"unknown GGUF value type {vtype}")


def read(path: str | os.PathLike[str]) -> GGUFMeta:
    size = os.stat(path).st_size
    with open(path, "rb", buffering=1 << 20) as f:
        r = _Reader(f)
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file")
        version = r.take("<I")
        if version < 2:
            raise GGUFError(f"GGUF version {version} is not supported")
        n_tensors, n_kv = r.take("<Q"), r.take("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            meta[key] = r.value(r.take("<I"))
        for _ in range(n_tensors):
            r.skip_string()
            n_dims = r.take("<I")
            f.seek(8 * n_dims + 4 + 8, os.SEEK_CUR)
        align = int(meta.get("general.alignment", 32)) or 32
        pos = f.tell()
    offset = (pos + align - 1) // align * align
    return GGUFMeta(meta, n_tensors, offset, size)

"""A fast reader of a GGUF file's header: its metadata keys and its tensor directory.

``gguf.GGUFReader`` turns every metadata item into numpy arrays (a 262k-token vocabulary takes
tens of seconds on a loaded CPU); checking that a file is complete and loadable needs only the
architecture, the tensor types and where each tensor's bytes end, which this walks in well under
a second. Layout (GGUF v2/v3, little-endian): magic ``GGUF``, version u32, tensor count u64,
metadata count u64, the metadata (key string, value type u32, value), the tensor infos (name,
n_dims u32, dims u64[n], type u32, offset u64), then the tensor data, aligned.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from prompts.errors import RankoneError

# metadata value types → struct format of one scalar; 8 = string, 9 = array
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class TensorEntry:
    name: str
    type_id: int  # a ggml type (gguf.GGMLQuantizationType)
    shape: tuple[int, ...]
    offset: int  # from the start of the data section


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, object]  # scalars and strings; arrays are left out (only their length)
    tensors: list[TensorEntry]
    data_start: int  # absolute byte offset of the data section

    @property
    def architecture(self) -> str:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else ""


class _Cursor:
    def __init__(self, buffer: mmap.mmap | bytes) -> None:
        self.buffer, self.pos = buffer, 0

    def take(self, fmt: str) -> object:
        (value,) = struct.unpack_from("<" + fmt, self.buffer, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        length = int(self.take("Q"))  # type: ignore[call-overload]
        if self.pos + length > len(self.buffer):
            raise struct.error("string past the end of the file")
        raw = bytes(self.buffer[self.pos : self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, type_id: int) -> object:
        if type_id in _SCALARS:
            return self.take(_SCALARS[type_id])
        if type_id == _STRING:
            return self.string()
        if type_id == _ARRAY:
            item_type, count = int(self.take("I")), int(self.take("Q"))  # type: ignore[call-overload]
            self.skip_array(item_type, count)
            return count
        raise ValueError(f"unknown metadata value type {type_id}")

    def skip_array(self, item_type: int, count: int) -> None:
        if item_type in _SCALARS:
            self.pos += struct.calcsize("<" + _SCALARS[item_type]) * count
            if self.pos > len(self.buffer):
                raise struct.error("array past the end of the file")
            return
        for _ in range(count):
            self.value(item_type)


def read_header(path: Path) -> GGUFHeader:
    """The header of the GGUF file ``path``; ``RankoneError`` if it cannot be walked."""
    size = path.stat().st_size
    if size < 24:
        raise RankoneError(f"{str(path)!r} is truncated: {size} bytes, shorter than a GGUF header")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        cursor = _Cursor(buffer)
        try:
            return _walk(cursor)
        except (struct.error, IndexError) as e:
            raise RankoneError(
                f"{str(path)!r} is truncated: its header ends past the file's {size} bytes ({e})"
            ) from None
        except (ValueError, OverflowError, MemoryError) as e:
            raise RankoneError(f"{str(path)!r} is a corrupt GGUF file: {e}") from None


def _walk(cursor: _Cursor) -> GGUFHeader:
    if cursor.take("4s") != b"GGUF":
        raise ValueError("bad magic")
    version = int(cursor.take("I"))  # type: ignore[call-overload]
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (only versions 2 and 3 are read)")
    n_tensors, n_kv = int(cursor.take("Q")), int(cursor.take("Q"))  # type: ignore[call-overload]
    metadata: dict[str, object] = {}
    for _ in range(n_kv):
        key = cursor.string()
        metadata[key] = cursor.value(int(cursor.take("I")))  # type: ignore[call-overload]
    tensors = []
    for _ in range(n_tensors):
        name = cursor.string()
        n_dims = int(cursor.take("I"))  # type: ignore[call-overload]
        if n_dims > 8:
            raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
        shape = tuple(int(cursor.take("Q")) for _ in range(n_dims))  # type: ignore[call-overload]
        type_id, offset = int(cursor.take("I")), int(cursor.take("Q"))  # type: ignore[call-overload]
        tensors.append(TensorEntry(name, type_id, shape, offset))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    align = alignment if isinstance(alignment, int) and alignment > 0 else DEFAULT_ALIGNMENT
    data_start = -(-cursor.pos // align) * align
    return GGUFHeader(version, metadata, tensors, data_start)

"""GGUF file layout: the header (metadata key/values and tensor table) parsed with ``struct`` over an ``mmap``.

Parsed this way rather than with ``gguf.GGUFReader``, which builds one numpy view per metadata element and needs
~4 s for a 49k-token vocabulary (longer than loading the model). The ``gguf`` package still supplies the type
tables. Every offset and size is bounds-checked against the file: a truncated file is a ``CorruptModelError``.
"""
from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from prosa.errors import CorruptModelError, UnsupportedModelError

from .ggml_types import QUANT_SIZES as GGML_QUANT_SIZES, GGMLType as Q

MAGIC = b"GGUF"
# Metadata value types (GGUF spec): fixed-size ones by struct format; 8 = string, 9 = array.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _TensorInfo(NamedTuple):
    name: str  # GGUF name
    shape: tuple[int, ...]  # torch order (GGUF lists dims fastest-moving first)
    ggml_type: int
    start: int  # absolute byte offset in the file
    nbytes: int


# ---------------------------------------------------------------------------------------------------------- reading
def _corrupt(path: Path, why: str) -> CorruptModelError:
    return CorruptModelError(f"{path} is truncated or corrupt: {why}. Re-download it.")


def _parse(path: Path, mm: mmap.mmap) -> tuple[dict[str, Any], list[_TensorInfo]]:
    """Metadata and tensor table of a little-endian GGUF v2/v3 file, bounds-checked against the file size."""
    size = len(mm)

    def unpack(fmt: str, pos: int) -> tuple[Any, int]:
        return struct.unpack_from(fmt, mm, pos)[0], pos + struct.calcsize(fmt)

    def string(pos: int) -> tuple[str, int]:
        n, pos = unpack("<Q", pos)
        if pos + n > size:
            raise _corrupt(path, f"a string of {n} bytes at offset {pos} runs past the end of the file")
        return mm[pos:pos + n].decode("utf-8"), pos + n

    def value(kind: int, pos: int) -> tuple[Any, int]:
        if kind in _SCALAR:
            return unpack(_SCALAR[kind], pos)
        if kind == 8:
            return string(pos)
        if kind != 9:
            raise _corrupt(path, f"unknown metadata value type {kind}")
        (item, count), pos = struct.unpack_from("<IQ", mm, pos), pos + 12
        if item in _SCALAR:  # numeric arrays (scores, token types) in one read
            dtype = np.dtype(_SCALAR[item].replace("?", "b1"))
            if pos + count * dtype.itemsize > size:
                raise _corrupt(path, "a metadata array runs past the end of the file")
            return np.frombuffer(mm, dtype, count, pos).tolist(), pos + count * dtype.itemsize
        if item == 8:
            return strings(count, pos)
        items = []
        for _ in range(count):  # nested arrays
            v, pos = value(item, pos)
            items.append(v)
        return items, pos

    def strings(count: int, pos: int) -> tuple[list[str], int]:
        # The vocabulary and merges (~50k strings each): one loop with no call per item but the unpack and the
        # decode; 3x faster than a value() call per string, and read at every load.
        items, length = [], struct.Struct("<Q").unpack_from
        for _ in range(count):
            n = length(mm, pos)[0]
            pos += 8
            if pos + n > size:
                raise _corrupt(path, f"a string of {n} bytes at offset {pos} runs past the end of the file")
            items.append(str(mm[pos:pos + n], "utf-8"))
            pos += n
        return items, pos

    version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
    if version not in (2, 3):
        if version == 1 or struct.unpack(">I", struct.pack("<I", version))[0] in (2, 3):
            kind = "GGUF v1" if version == 1 else "a big-endian GGUF"
            raise UnsupportedModelError(f"{path} is {kind}; prosa reads little-endian GGUF v2/v3. "
                                        "Convert it again with a current llama.cpp.")
        raise _corrupt(path, f"unknown GGUF version {version}")
    pos, metadata = 24, {}
    for _ in range(n_kv):
        key, pos = string(pos)
        kind, pos = unpack("<I", pos)
        metadata[key], pos = value(kind, pos)

    table = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        ndim, pos = unpack("<I", pos)
        if ndim > 4:
            raise _corrupt(path, f"tensor {name!r} claims {ndim} dimensions")
        dims = struct.unpack_from(f"<{ndim}Q", mm, pos)
        ggml_type, offset = struct.unpack_from("<IQ", mm, pos + 8 * ndim)
        pos += 8 * ndim + 12
        table.append((name, tuple(reversed(dims)), ggml_type, offset))
    align = metadata.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise _corrupt(path, f"general.alignment={align!r} is not a power of two")
    data_start = -(-pos // align) * align

    tensors = []
    for name, shape, ggml_type, offset in table:
        if ggml_type not in GGML_QUANT_SIZES:
            raise _corrupt(path, f"tensor {name!r} has unknown type id {ggml_type}")
        block, block_bytes = GGML_QUANT_SIZES[Q(ggml_type)]
        if shape and shape[-1] % block:
            raise _corrupt(path, f"tensor {name!r} rows of {shape[-1]} are not whole {Q(ggml_type).name} blocks")
        nbytes = math.prod(shape) // block * block_bytes
        if data_start + offset + nbytes > size:
            raise _corrupt(path, f"tensor {name!r} ends at byte {data_start + offset + nbytes:,} but the file "
                                 f"has {size:,} bytes")
        tensors.append(_TensorInfo(name, shape, ggml_type, data_start + offset, nbytes))
    return metadata, tensors

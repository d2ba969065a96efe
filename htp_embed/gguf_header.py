"""The layer shape of a ``.gguf`` model read from its header alone, for the dtype probe.

The probe runs before the model loads (its precision decides how to load it), and without the
shape it timed Gemma 3's layers for every GGUF file. gguf's ``GGUFReader``, which transformers
loads the file with, builds every metadata field first: SmolLM2's 49,152 tokenizer strings took
6 s. The two numbers wanted sit near the front of the header; everything else is skipped unread.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

#: GGUF value types of fixed size: their struct format (little-endian, as GGUF files are).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
#: A longer key means a damaged file (real ones are tens of bytes); a longer string is skipped.
_MAX_TEXT = 1 << 16


def gguf_layer_shape(path: str | Path) -> tuple[int, int] | None:
    """``(hidden_size, intermediate_size)``: the file's ``<architecture>.embedding_length`` and
    ``.feed_forward_length``; None when it is not a GGUF file (v2 or later), cannot be read, or
    lacks either as one integer (per-layer sizes, say)."""
    try:
        with open(path, "rb") as handle:
            fields = _leading_fields(handle)
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return None
    arch = fields.get("general.architecture")
    hidden, intermediate = (fields.get(f"{arch}.{name}") for name in ("embedding_length", "feed_forward_length"))
    if isinstance(arch, str) and all(type(size) is int and size > 0 for size in (hidden, intermediate)):
        return hidden, intermediate  # type: ignore[return-value]
    return None


def _leading_fields(handle: BinaryIO) -> dict[str, object]:
    """The header's scalar and string values by key, read until the architecture and its two
    sizes are known (arrays, such as the tokenizer's, are stepped over)."""
    magic, version, _tensors, count = struct.unpack("<4sIQQ", _read(handle, 24))
    if magic != b"GGUF" or version < 2:  # version 1 wrote 32-bit lengths; no current tool does
        raise ValueError("not a GGUF file of version 2 or later")
    fields: dict[str, object] = {}
    for _ in range(count):
        key = _key(handle)
        (kind,) = struct.unpack("<I", _read(handle, 4))
        if kind == _STRING:
            (size,) = struct.unpack("<Q", _read(handle, 8))
            if size <= _MAX_TEXT:
                fields[key] = _read(handle, size).decode("utf-8", errors="replace")
            else:  # a long chat template, say: not wanted
                handle.seek(size, 1)
        elif kind in _SCALARS:
            (fields[key],) = struct.unpack(_SCALARS[kind], _read(handle, struct.calcsize(_SCALARS[kind])))
        elif kind == _ARRAY:
            _skip_array(handle)
        else:
            raise ValueError(f"unknown GGUF value type {kind}")
        arch = fields.get("general.architecture")
        if f"{arch}.embedding_length" in fields and f"{arch}.feed_forward_length" in fields:
            break
    return fields


def _skip_array(handle: BinaryIO) -> None:
    item, length = struct.unpack("<IQ", _read(handle, 12))
    if item in _SCALARS:
        handle.seek(length * struct.calcsize(_SCALARS[item]), 1)
    elif item == _STRING:
        for _ in range(length):
            (size,) = struct.unpack("<Q", _read(handle, 8))
            handle.seek(size, 1)
    elif item == _ARRAY:
        for _ in range(length):
            _skip_array(handle)
    else:
        raise ValueError(f"unknown GGUF array type {item}")


def _key(handle: BinaryIO) -> str:
    (size,) = struct.unpack("<Q", _read(handle, 8))
    if size > _MAX_TEXT:
        raise ValueError(f"a GGUF key of {size} bytes")
    return _read(handle, size).decode("utf-8")


def _read(handle: BinaryIO, size: int) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise ValueError("the GGUF header ends early")
    return data

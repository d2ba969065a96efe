"""Give freed heap memory back to the operating system after a large build.

A merge that writes an IVF segment allocates the segment's inverted lists (as large as its
vectors: 2.4 GiB at 1M 640-d rows) through the C++ heap and frees them once the file is
written. glibc keeps freed heap pages mapped for reuse, so a long-lived process that merged
once (a scheduled ingest, a service) would go on holding that memory: measured on 200k rows,
527 MiB still resident after the index was freed, 5 MiB after ``malloc_trim(0)``, which
returns whole free pages wherever they lie in the heap. Elsewhere (musl, macOS, Windows)
there is no such call and nothing to do here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the heap's free pages to the system where the C library can (glibc); returns
    whether it could. Costs a walk of the heap: call it after freeing something large."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True

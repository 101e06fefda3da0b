"""The few C library calls the server makes itself, outside libevent: errno inside a
callback from C, and handing free heap memory back to the system."""

from __future__ import annotations

import ctypes
from typing import Any


def c_errno() -> int:
    """errno as C left it on this thread, read in a callback from C (ctypes.get_errno()
    is ctypes' own copy, kept only around calls made with use_errno)."""
    global _errno_location
    if _errno_location is None:
        libc = ctypes.CDLL(None)
        found = getattr(libc, "__errno_location", None) or getattr(libc, "__error", None)
        if found is None:
            return 0
        found.restype = ctypes.POINTER(ctypes.c_int)
        found.argtypes = []
        _errno_location = found
    return int(_errno_location().contents.value)


_errno_location: Any = None


def return_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; nothing
    elsewhere).  It walks the free lists: for after a bulk release only."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
            _malloc_trim.argtypes = [ctypes.c_size_t]
            _malloc_trim.restype = ctypes.c_int
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None

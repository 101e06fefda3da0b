"""The few C library calls the server makes itself, outside libevent: errno inside a
callback from C, and the C heap's free memory: how much, and handing it back."""

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


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def free_heap_bytes() -> int:
    """Bytes the C heap holds free (glibc 2.33's ``mallinfo2``; 0 elsewhere)."""
    global _mallinfo2
    if _mallinfo2 is None:
        try:
            _mallinfo2 = ctypes.CDLL(None).mallinfo2
            _mallinfo2.argtypes = []
            _mallinfo2.restype = _MallInfo2
        except (OSError, AttributeError):
            _mallinfo2 = False
    return int(_mallinfo2().fordblks) if _mallinfo2 else 0


_mallinfo2: Any = None

"""The few C library calls the server makes itself, outside libevent: errno inside a
callback from C, a look at whether a socket's peer left, and the C heap's free memory:
how much, and handing it back."""

from __future__ import annotations

import ctypes
import errno
import socket
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


def peer_left(fd: int) -> bool:
    """Whether the peer of socket ``fd`` closed it (an end of file or a reset) with
    nothing unread before that: a look (``MSG_PEEK``) that takes nothing, and does not
    wait.  (Python's socket objects cannot borrow a descriptor without system calls of
    their own to learn its kind.)"""
    global _recv
    if _recv is None:
        _recv = ctypes.CDLL(None, use_errno=True).recv
        _recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _recv.restype = ctypes.c_ssize_t
    got = _recv(fd, _peeked, 1, _PEEK)
    if got == 0:
        return True
    return got < 0 and ctypes.get_errno() in _GONE


_recv: Any = None
_peeked = ctypes.create_string_buffer(1)  # (what the look saw: not used)
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
_GONE = (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT)

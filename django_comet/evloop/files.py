"""``wsgi.file_wrapper`` (PEP 3333, "Optional Platform-Specific File Handling").

An app (Django's ``FileResponse`` among them) that returns a file through the wrapper
lets the server send a regular file's bytes by descriptor: libevent hands them to the
kernel (sendfile), no Python runs per block, and the worker thread is free at once
instead of waiting on a slow reader for the whole download.  Anything else (a pipe, a
socket, a ``BytesIO``, a file shorter than its Content-Length) is iterated in blocks, as
any WSGI server would.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from typing import Any


class FileWrapper:
    """The iterable ``wsgi.file_wrapper(filelike, block_size)`` returns."""

    __slots__ = ("blksize", "filelike")

    def __init__(self, filelike: Any, blksize: int = 8192):
        self.filelike = filelike
        self.blksize = blksize

    def __iter__(self) -> Iterator[bytes]:
        read, blksize = self.filelike.read, self.blksize
        while data := read(blksize):
            yield data

    def close(self) -> None:
        close = getattr(self.filelike, "close", None)
        if close is not None:
            close()

    def file_range(self, length: int | None) -> tuple[int, int, int] | None:
        """(a new descriptor of the file, offset, byte count) for the server to send, or
        None when the bytes must be read instead.  The caller owns the descriptor.

        The range starts at the file's current position (PEP 3333) and runs for
        ``length`` bytes (the response's Content-Length), or to the end of the file.
        """
        try:
            fd = self.filelike.fileno()
            offset = self.filelike.tell()  # the buffered position, not the descriptor's
            info = os.fstat(fd)
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
            return None
        if not stat.S_ISREG(info.st_mode):
            return None
        available = info.st_size - offset
        count = available if length is None else length
        if count <= 0 or count > available:
            return None  # nothing to send, or short of its Content-Length: let iteration tell
        try:
            return os.dup(fd), offset, count
        except OSError:  # out of descriptors: reading it still works
            return None

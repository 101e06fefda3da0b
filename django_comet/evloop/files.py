"""``wsgi.file_wrapper`` (PEP 3333, "Optional Platform-Specific File Handling").

An app (Django's ``FileResponse`` among them) that returns a file through the wrapper
lets the server send a regular file's bytes by descriptor: libevent hands them to the
kernel (sendfile), no Python runs per block, and the worker thread is free at once
instead of waiting on a slow reader for the whole download.  Anything else (a pipe, a
socket, a ``BytesIO``, a compressed file, a file shorter than its Content-Length) is
iterated in blocks, as any WSGI server would.
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
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

    def file_range(self, length: int | None) -> tuple[Descriptor, int, int] | None:
        """(a new descriptor of the file, offset, byte count) for the server to send, or
        None when the bytes must be read instead.

        The range starts at the file's current position (PEP 3333) and runs for
        ``length`` bytes (the response's Content-Length), or to the end of the file.
        """
        real = _plain_file(self.filelike)
        if real is None:
            return None
        try:
            fd = real.fileno()
            offset = real.tell()  # the buffered position, not the descriptor's
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return None
            available = info.st_size - offset
            count = available if length is None else length
            if count <= 0 or count > available:
                return None  # nothing to send, or short of its Content-Length: iteration tells
            # A file's size may say more than it holds (sysfs gives 4096 for a few bytes):
            # its range's last byte must be there, or a made-up length would go out.
            if not os.pread(fd, 1, offset + count - 1):
                return None
            return Descriptor(os.dup(fd)), offset, count
        except Exception:  # (io.UnsupportedOperation, out of descriptors, a file object's
            return None  # own error): reading it still works, or tells what is wrong


class Descriptor:
    """A file descriptor on its way to libevent, closed if it is dropped before it gets
    there (a reply still queued for the loop thread when the loop is closed)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int):
        self.fd = fd

    def release(self) -> int:
        """Hand the descriptor over: closing it is no longer ours to do."""
        fd, self.fd = self.fd, -1
        return fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.release())

    __del__ = close


def _plain_file(filelike: Any) -> io.FileIO | io.BufferedReader | io.BufferedRandom | None:
    """The open file whose bytes reading ``filelike`` gives, or None.  Only a plain file
    qualifies: a gzip, bz2 or lzma file also has a descriptor and a position, but of its
    compressed bytes, and a subclass of a file type may change what ``read`` gives.
    Proxies that read their ``file`` as is are looked through: Django's ``File`` (what
    ``FieldFile.open()`` gives) and tempfile's wrappers."""
    for _ in range(3):
        # Exact types: a subclass may override read() (decrypting, decompressing), and
        # what goes out must be what reading gives.
        if type(filelike) is io.FileIO:
            return filelike
        if type(filelike) in (io.BufferedReader, io.BufferedRandom):
            return filelike if type(filelike.raw) is io.FileIO else None
        if isinstance(filelike, tempfile._TemporaryFileWrapper):
            filelike = filelike.file
            continue
        if not hasattr(filelike, "multiple_chunks"):
            return None
        inner = getattr(filelike, "file", None)
        try:
            # Django's File reads its file as is (its read is the file's); a subclass
            # that overrides read transforms the bytes.
            if inner is None or filelike.read != inner.read:
                return None
        except Exception:
            return None
        filelike = inner
    return None

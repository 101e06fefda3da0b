"""Held responses go out without a content-coding.

A held response's body is its first part, then what each stage, event or heartbeat adds,
appended as it comes.  A compressing middleware (Django's ``GZipMiddleware``) only sees
the first part: it sends it as a complete gzip stream, and every later part would follow
it uncompressed, which no client can decode.  So the server takes the coding back: it
decodes the first part and drops ``Content-Encoding``.  gzip and deflate are decoded with
zlib; a coding it cannot decode (br, zstd) is refused with a clear error.
"""

from __future__ import annotations

import zlib

from .start_response import AppError, StartResponse

# zlib's wbits for each coding (RFC 9110 8.4.1): gzip framing, or zlib framing.
_WBITS = {b"gzip": 31, b"x-gzip": 31, b"deflate": 15}


def without_content_coding(start: StartResponse, chunks: list[bytes]) -> list[bytes]:
    """The first part of a held response as the app meant it, with ``Content-Encoding``
    gone from ``start``; ``chunks`` as they are when there was none."""
    codings = [value for name, value in start.encoded if name.lower() == b"content-encoding"]
    if not codings:
        return chunks
    body = b"".join(chunks)
    # Codings are listed in the order they were applied: undo the last first.
    for coding in reversed(b",".join(codings).split(b",")):
        coding = coding.strip().lower()
        if coding in (b"", b"identity"):
            continue
        wbits = _WBITS.get(coding)
        if wbits is None:
            raise AppError(
                f"a held response (stages, long-poll or stream) cannot be sent with "
                f"Content-Encoding: {coding.decode('latin-1')}, because its later parts are "
                f"appended as they come; exclude its view from compression"
            )
        body = _decompress(body, wbits, coding)
    start.encoded = [(n, v) for n, v in start.encoded if n.lower() != b"content-encoding"]
    start.lines = None  # (no longer the same headers)
    return [body] if body else []


def _decompress(data: bytes, wbits: int, coding: bytes) -> bytes:
    out = []
    try:
        while data:  # gzip allows several members one after another
            decoder = zlib.decompressobj(wbits)
            out.append(decoder.decompress(data))
            out.append(decoder.flush())
            if not decoder.eof:
                raise zlib.error("truncated")
            data = decoder.unused_data
    except zlib.error as exc:
        if coding == b"deflate" and wbits > 0:  # some send raw deflate as "deflate"
            return _decompress(data, -15, coding)
        raise AppError(
            f"the first part of a held response is not valid {coding.decode('latin-1')} ({exc})"
        ) from None
    return b"".join(out)

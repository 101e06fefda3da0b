"""Reading one parsed request out of libevent's ``struct evhttp_request``.

The struct is public in ``event2/http_struct.h`` and stable across libevent 2.1, so its
fields are read directly: one ctypes structure view instead of a dozen calls per request.
"""

from __future__ import annotations

import ctypes
import sys
from ctypes import (
    POINTER,
    Structure,
    c_byte,
    c_char_p,
    c_int,
    c_int64,
    c_size_t,
    c_uint,
    c_uint16,
    c_void_p,
)

from . import libevent_ctypes as ev
from .request_checks import BadRequest, Limits, check_request


class RequestStruct(Structure):
    """struct evhttp_request, up to the fields we read (event2/http_struct.h)."""

    _fields_ = [
        ("tqe_next", c_void_p),
        ("tqe_prev", c_void_p),
        ("evcon", c_void_p),  # NULL once the connection is gone
        ("flags", c_int),
        ("input_headers", POINTER(ev.evkeyvalq)),
        ("output_headers", c_void_p),
        ("remote_host", c_char_p),
        ("remote_port", c_uint16),
        ("host_cache", c_char_p),
        ("kind", c_int),
        ("type", c_int),
        ("headers_size", c_size_t),
        ("body_size", c_size_t),
        ("uri", c_char_p),
        ("uri_elems", c_void_p),
        ("major", c_byte),
        ("minor", c_byte),
        ("response_code", c_int),
        ("response_code_line", c_char_p),
        ("input_buffer", c_void_p),
        ("ntoread", c_int64),
        ("bits", c_uint),  # chunked:1, userdone:1
    ]


# RequestStruct.bits: the "chunked" bit-field, the first declared (the lowest bit where
# the ABI is little-endian, the highest where it is big-endian).
REQUEST_CHUNKED = 1 if sys.byteorder == "little" else 1 << 31


_PROTOCOLS = {(1, 1): "HTTP/1.1", (1, 0): "HTTP/1.0"}


def read_headers(queue: ev.evkeyvalq) -> list[tuple[bytes, bytes]]:
    headers = []
    node = queue.tqh_first
    while node:
        entry = node.contents
        headers.append((entry.key, entry.value))
        node = entry.tqe_next
    return headers


def evhttp_closes(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether evhttp itself closes after the response: its first Connection header,
    as evhttp stored it (leading spaces stripped, a tab kept), is exactly "close"."""
    for name, value in headers:
        if name.lower() == b"connection":
            return value.lower() == b"close"
    return False


def read_request(
    r: RequestStruct, lib: ctypes.CDLL, limits: Limits
) -> tuple[str, str, str, list[tuple[bytes, bytes]], bytes, tuple[str, int]]:
    """(method, target, protocol, headers, body, (remote host, port)), or BadRequest.

    evhttp calls the request callback with ``uri`` NULL when it failed to read the
    request (bad syntax, or over a size limit); the sizes it recorded say which.
    """
    uri = r.uri
    if uri is None:
        raise _read_failure(r)
    method = ev.EVHTTP_METHODS.get(r.type)
    if method is None:
        raise BadRequest("Unknown method", 501)
    headers = read_headers(r.input_headers.contents)
    version = (r.major, r.minor)
    if check_request(method, uri, version, headers, limits) and not r.bits & REQUEST_CHUNKED:
        # evhttp compares its own way (a tab before "chunked", a folded line): it read no
        # body, and would take the body's bytes for the next request.
        raise BadRequest("Transfer-Encoding not read as chunked")
    body = b""
    if r.body_size:  # evhttp counts body bytes as it reads them: most requests skip C here
        buf = r.input_buffer
        length = lib.evbuffer_get_length(buf)
        body = copy_out(lib.evbuffer_pullup(buf, -1), length)
        # libevent's copy is not needed again: a request waiting for a thread then
        # holds its body once, not twice.
        lib.evbuffer_drain(buf, length)
    protocol = _PROTOCOLS.get(version) or f"HTTP/{version[0]}.{version[1]}"
    remote = ((r.remote_host or b"").decode("ascii", "replace"), r.remote_port)
    return method, uri.decode("latin-1"), protocol, headers, body, remote


def _read_failure(r: RequestStruct) -> BadRequest:
    if r.body_size and r.ntoread > 0:
        return BadRequest("Request Entity Too Large", 413)
    return BadRequest("Bad Request", 400)


STRING_AT_LIMIT = 2**31


def copy_out(address: int, length: int) -> bytes:
    """``length`` bytes at ``address``.  ``ctypes.string_at`` takes its length as a C
    int: past 2 GiB it failed, and past 4 GiB it wrapped (a body of 4 GiB and 5 bytes
    reached the app as 5 bytes)."""
    if length < STRING_AT_LIMIT:
        return ctypes.string_at(address, length)
    return (ctypes.c_char * length).from_address(address).raw

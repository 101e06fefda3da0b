"""What RFC 9112 says to refuse and evhttp lets through: checked on each request before
an environ is built, each refusal with its own status (``BadRequest``).

Pure: nothing here touches a socket or libevent, so all of it is tested in memory.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from .config import ServerConfig

# RFC 9110 5.6.2 token characters; a field name must be a token.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# Not in a request-target (RFC 9112 3.2, RFC 3986): a space, a tab (evhttp splits the
# request line at its first and last space only), any other control character, and any
# byte over 0x7f (a URI is ASCII: browsers percent-encode the rest; taken raw, Django
# decodes it as UTF-8 where a proxy may have read it otherwise).
_NOT_IN_TARGET = re.compile(rb"[\x00-\x20\x7f-\xff]")
# Not in a field value (RFC 9110 5.5): a control character other than a tab.  CR and LF
# must be refused; the others may be kept, but an app that echoes such a value (a
# request id into a response header) would then fail in start_response, which refuses
# them, and the client's mistake would be logged as the app's error.
_NOT_IN_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Host = uri-host [ ":" port ] (RFC 9112 3.2, RFC 3986 3.2.2): an IP literal in brackets,
# or a reg-name (an IPv4 address is one) of unreserved, percent-encoded and sub-delims.
_HOST = re.compile(
    rb"[ \t]*(?:\[[0-9A-Za-z:.\-_~!$&'()*+,;=%]+\]|[0-9A-Za-z\-._~!$&'()*+,;=%]*)"
    rb"(?::[0-9]*)?[ \t]*\Z"
)


class BadRequest(Exception):
    """The request is malformed; ``status`` is the answer it deserves."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.status = status


class Limits(NamedTuple):
    """Sizes checked in Python, so that each gets its own status (evhttp answers 400 to
    anything over its single, larger, buffer limit)."""

    target: int  # bytes in the request-target -> 414
    header_bytes: int  # all header lines together -> 431
    header_count: int  # header lines -> 431

    @classmethod
    def of(cls, config: ServerConfig) -> Limits:
        return cls(config.max_request_line, config.max_header_size, config.max_header_count)


DEFAULT_LIMITS = Limits.of(ServerConfig())


_LOWER_NAMES: dict[bytes, bytes] = {}  # request header names seen valid -> lower case
_GOOD_HOSTS: set[bytes] = set()  # Host values seen valid (clients send the same few)


# Methods whose body evhttp never reads (evhttp_method_may_have_body in libevent 2.1).
_BODY_UNREAD = frozenset({"HEAD", "TRACE"})

_ABSOLUTE_FORM = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)")


def _check_absolute_form(target: bytes) -> None:
    """An absolute-form target's authority names the host (RFC 9112 3.2.2): it must be
    one, and an http(s) URI with an empty host is invalid (RFC 9110 4.2.1)."""
    match = _ABSOLUTE_FORM.match(target)
    if match is None:  # (a front proxy would see no path, or another one, in it)
        raise BadRequest("Invalid request target")
    host = match[2].rpartition(b"@")[2]  # never a userinfo
    if not _HOST.match(host):
        raise BadRequest("Invalid host in the request target")
    if not host.partition(b":")[0] and match[1].lower() in (b"http", b"https"):
        raise BadRequest("An http URI with an empty host (RFC 9110 4.2.1)")


def check_request(
    method: str,
    target: bytes,
    version: tuple[int, int],
    headers: list[tuple[bytes, bytes]],
    limits: Limits = DEFAULT_LIMITS,
) -> bool:
    """Refuse what RFC 9112 says to refuse and evhttp lets through (BadRequest); whether
    the body is chunked (the caller checks that evhttp read it so)."""
    if version not in ((1, 1), (1, 0)):
        raise BadRequest("HTTP Version Not Supported", 505)
    if len(target) > limits.target:
        raise BadRequest("URI Too Long", 414)
    if _NOT_IN_TARGET.search(target):
        raise BadRequest(
            "Invalid request target (a space, a control character or a byte that is not"
            " ASCII: percent-encode it)"
        )
    if len(headers) > limits.header_count:
        raise BadRequest("Request Header Fields Too Large (too many)", 431)
    if target == b"*" and method != "OPTIONS":
        raise BadRequest("Asterisk target is only for OPTIONS")
    if method == "CONNECT":  # (Server._on_request has evhttp frame this answer and close)
        raise BadRequest("CONNECT is not implemented: this server is not a proxy", 501)
    hosts = 0
    size = 0
    length: bytes | None = None
    codings: list[bytes] = []  # of every Transfer-Encoding line, in order
    for name, value in headers:
        size += len(name) + len(value) + 4
        lname = _LOWER_NAMES.get(name)
        if lname is None:
            if not _TOKEN.match(name):
                raise BadRequest("Invalid header name")
            lname = name.lower()
            if len(_LOWER_NAMES) < 1000:
                _LOWER_NAMES[name] = lname
        if _NOT_IN_VALUE.search(value):
            raise BadRequest("Invalid header value (a control character)")
        if lname == b"host":
            hosts += 1
            if value not in _GOOD_HOSTS:
                if not _HOST.match(value):
                    raise BadRequest("Invalid Host header (RFC 9112 3.2)")
                if len(_GOOD_HOSTS) >= 1000:
                    _GOOD_HOSTS.clear()
                _GOOD_HOSTS.add(value)
        elif lname == b"content-length":
            value = value.strip(b" \t")
            if not value.isdigit() or (length is not None and value != length):
                raise BadRequest("Invalid Content-Length")
            length = value
        elif lname == b"transfer-encoding":
            codings.extend(c.strip(b" \t").lower() for c in value.split(b","))
    if size > limits.header_bytes:
        raise BadRequest("Request Header Fields Too Large", 431)
    if hosts > 1 or (hosts == 0 and version == (1, 1)):
        raise BadRequest("Missing or repeated Host header (RFC 9112 3.2)")
    if target[:1] != b"/" and target != b"*":
        _check_absolute_form(target)
    # (Not int(): a length of over 4,300 digits is beyond what Python converts.)
    if method in _BODY_UNREAD and (codings or (length is not None and length.strip(b"0"))):
        # A body is framed by its headers whatever the method (RFC 9112 6), but evhttp
        # reads none for these: it would take the body's bytes for the next request.
        raise BadRequest(f"A {method} request cannot carry a body here")
    if codings:
        if length is not None:  # which one frames the body is a front proxy's guess
            raise BadRequest("Both Content-Length and Transfer-Encoding (RFC 9112 6.1)")
        if version == (1, 0):
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request (RFC 9112 6.1)")
        # evhttp dechunks a body only when the header is exactly "chunked"; with any other
        # value it would read no body and take the body's bytes for the next request.
        if codings[-1] != b"chunked" or codings.count(b"chunked") > 1:
            raise BadRequest("Transfer-Encoding must end in chunked, once (RFC 9112 6.3)")
        if len(codings) > 1:
            raise BadRequest("Only the chunked transfer coding is implemented", 501)
        return True
    return False

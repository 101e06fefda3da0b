"""The ``start_response`` callable (PEP 3333): the app's status and headers validated
and encoded once, ready for libevent, and the legacy ``write()``.

Pure: nothing here touches a socket or libevent, so all of it is tested in memory.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

Headers = list[tuple[str, str]]

# RFC 9110 5.6.2: a field name is a token.
_TOKEN_STR = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# RFC 9110: a code of 100-599; a reason phrase, and a field value, of visible
# characters, spaces and tabs (no other control character).
_STATUS = re.compile(r"[1-5][0-9]{2} [^\x00-\x08\x0a-\x1f\x7f]*\Z")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


# Hop-by-hop headers belong to the server's framing (PEP 3333 "Other HTTP Features").
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)


logger = logging.getLogger("django_comet.server")
_dropped_said: set[str] = set()  # hop-by-hop header names dropped and logged


def _say_dropped(lname: str, value: str) -> None:
    """Once per header name: an app's Transfer-Encoding (a body it chunked itself, a
    proxy view passing an upstream's on) would otherwise vanish without a word."""
    if lname not in _dropped_said:  # (bounded: names in HOP_BY_HOP only)
        _dropped_said.add(lname)
        logger.warning(
            "The application's %r header (%r) was dropped: hop-by-hop headers are the "
            "server's to send (PEP 3333; logged once)",
            lname,
            value,
        )


# Responses that never carry a body (RFC 9110 6.4.1), whatever the app iterates.
NO_BODY_STATUSES = frozenset({204, 205, 304})  # 205: RFC 9110 15.3.6, no content


def carries_body(method: str, code: int) -> bool:
    """Whether the response's body goes on the wire: never for HEAD, 204 or 304 (nor 1xx,
    which start_response refuses as a final status).  evhttp applies the same rule
    (``evhttp_response_needs_body``) and leaves whatever it would not send in the
    buffer it was handed, so the server must not hand such bytes over at all."""
    return method != "HEAD" and code >= 200 and code not in NO_BODY_STATUSES


def asks_to_close(connection: str) -> bool:
    """Whether a Connection header's value, a list of options (RFC 9110 7.6.1), holds
    "close"."""
    lowered = connection.lower()
    return "close" in lowered and "close" in (o.strip(" \t") for o in lowered.split(","))


class AppError(Exception):
    """The application broke the WSGI contract (bad status, bad header, no start_response)."""


_GOOD_NAMES: dict[str, bytes] = {}  # header names already validated -> latin-1 bytes
# Status lines already validated -> (code, reason, the HTTP/1.1 status line).
_STATUSES: dict[str, tuple[int, bytes, bytes]] = {}
# Headers already validated, as the app gave them (a (name, value) tuple) -> what they
# come to: (kind, (name, value) encoded, "name: value" CRLF), or for a Content-Length
# (kind, its number, b"").  Apps send the same few headers again and again; the few
# whose values vary (cookies, ETags) come and go (cleared when full).
_HEADERS: dict[tuple[str, str], tuple[int, Any, bytes]] = {}
_PLAIN, _DATE, _LENGTH = 0, 1, 2
_MAX_HEADERS = 1000


class StartResponse:
    """The ``start_response`` callable of one request, and what the app told it.

    It may be called on a worker thread; the server reads what it recorded after the app
    returned or yielded its first chunk, as PEP 3333 allows.  Headers are validated and
    encoded here, once: ``encoded`` holds them ready for libevent, without
    Content-Length (kept in ``length``) and without hop-by-hop headers (framing is the
    server's; an app's "Connection: close" is kept in ``close``).  ``lines`` holds the
    same headers as lines of a response head, ``line`` the HTTP/1.1 status line, and
    ``dated`` tells whether the app gave a Date.

    ``send``, given by the server, takes what the app passes to write(): it goes out
    while the app goes on (PEP 3333).  Without it (a deferred stage), write() keeps the
    bytes in ``written``, before the iterable's output.
    """

    __slots__ = (
        "close",
        "code",
        "dated",
        "encoded",
        "headers_sent",
        "length",
        "line",
        "lines",
        "over",
        "reason",
        "send",
        "status",
        "written",
    )

    def __init__(self, send: Callable[[StartResponse, bytes], None] | None = None) -> None:
        self.send = send
        self.status: str | None = None
        self.code = 0
        self.reason = b""
        self.line = b""
        self.encoded: list[tuple[bytes, bytes]] = []
        self.lines: list[bytes] | None = None
        self.dated = False
        self.length: int | None = None
        self.close = False
        self.headers_sent = False
        self.over = False  # write() found the response over: it raises from then on
        self.written: list[bytes] = []

    def __call__(
        self, status: str, headers: Headers, exc_info: Any = None
    ) -> Callable[[bytes], None]:
        if exc_info:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None  # break the traceback cycle (PEP 3333)
            # Nothing went out yet: the error page replaces the response whole, body
            # included (what was yielded so far is still buffered here).
            self.written.clear()
        elif self.status is not None:
            raise AppError("start_response() called twice without exc_info")
        parsed = _STATUSES.get(status) if isinstance(status, str) else None
        if parsed is None:
            if not isinstance(status, str) or not _STATUS.match(status):
                raise AppError(f"invalid status line from the application: {status!r}")
            if status[0] == "1":
                raise AppError(
                    f"1xx is not a final status (PEP 3333 leaves 1xx to servers): {status!r}"
                )
            code, reason = int(status[:3]), _latin1(status[4:], "status")
            parsed = (code, reason, b"HTTP/1.1 %d %s\r\n" % (code, reason))
            if len(_STATUSES) < 200:
                _STATUSES[status] = parsed
        encoded = []
        lines = []
        length = None
        close = False
        dated = False
        for header in headers:
            try:
                known = _HEADERS.get(header)  # type: ignore[call-overload]
            except TypeError:  # unhashable: refused below
                known = None
            if known is not None:
                kind, pair, line = known
                if kind == _LENGTH:
                    if length is not None and pair != length:
                        raise AppError(f"invalid Content-Length from the application: {pair}")
                    length = pair
                else:
                    encoded.append(pair)
                    lines.append(line)
                    dated = dated or kind == _DATE
                continue
            if not (isinstance(header, tuple) and len(header) == 2):
                raise AppError(f"invalid header from the application: {header!r}")
            name, value = header
            bname = _GOOD_NAMES.get(name)
            if bname is None:
                if not (isinstance(name, str) and _TOKEN_STR.match(name)):
                    raise AppError(f"invalid header name from the application: {name!r}")
                bname = name.encode("latin-1")
                if len(_GOOD_NAMES) < 500:
                    _GOOD_NAMES[name] = bname
            if not isinstance(value, str) or _BAD_VALUE.search(value):
                raise AppError(f"invalid header value from the application: {name}: {value!r}")
            lname = name.lower()
            if lname == "content-length":
                digits = value.strip()
                if not (digits.isascii() and digits.isdigit()) or (
                    length is not None and int(digits) != length
                ):
                    raise AppError(f"invalid Content-Length from the application: {value!r}")
                length = int(digits)
                known = (_LENGTH, length, b"")
            elif lname in HOP_BY_HOP:
                if lname == "connection":
                    close = close or asks_to_close(value)
                else:
                    _say_dropped(lname, value)
                continue  # (not kept: rare, and one that closes must be seen each time)
            else:
                pair = (bname, _latin1(value, name))
                line = b"%s: %s\r\n" % pair
                encoded.append(pair)
                lines.append(line)
                kind = _DATE if lname == "date" else _PLAIN
                dated = dated or kind == _DATE
                known = (kind, pair, line)
            if type(header) is tuple and type(name) is str and type(value) is str:
                if len(_HEADERS) >= _MAX_HEADERS:
                    _HEADERS.clear()
                _HEADERS[header] = known
        self.status = status
        self.code, self.reason, self.line = parsed
        self.encoded = encoded
        self.lines = lines
        self.dated = dated
        self.length = length
        self.close = close
        return self.write

    def write(self, data: bytes) -> None:
        """The legacy write() callable."""
        if self.status is None:
            raise AppError("write() called before start_response()")
        if not isinstance(data, bytes):
            raise AppError(f"write() needs bytes, got {type(data).__name__}")
        if self.send is not None:
            self.send(self, data)
        elif data:
            self.written.append(data)


def _latin1(value: str, what: str) -> bytes:
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        raise AppError(f"{what} is not latin-1 (PEP 3333): {value!r}") from None

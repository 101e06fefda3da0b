"""The pure WSGI parts: request pieces -> PEP 3333 environ, and start_response.

Nothing here touches a socket or libevent, so all of it is tested in memory.
"""

from __future__ import annotations

import io
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple
from urllib.parse import unquote_to_bytes

Headers = list[tuple[str, str]]

# RFC 9110 5.6.2 token characters; a field name must be a token.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_TOKEN_STR = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# A field value may not contain CR, LF or NUL (RFC 9110 5.5); HTAB and obs-text are fine.
_BAD_VALUE_CHARS = re.compile(r"[\r\n\0]")
_STATUS = re.compile(r"[1-9][0-9]{2} [^\r\n\0]*\Z")

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


class BadRequest(Exception):
    """The request is malformed; ``status`` is the answer it deserves."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.status = status


class AppError(Exception):
    """The application broke the WSGI contract (bad status, bad header, no start_response)."""


def split_target(target: str) -> tuple[str, str]:
    """request-target -> (raw path, query): origin form, absolute form or '*'."""
    if target.startswith("/"):
        path, _, query = target.partition("?")
    elif target == "*":
        return "*", ""
    elif "://" in target[:10]:  # absolute-form (RFC 9112 3.2.2): keep path and query only
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        query_at = rest.find("?")
        if slash == -1 or (query_at != -1 and query_at < slash):
            path, query = "/", rest.partition("?")[2]
        else:
            path, _, query = rest[slash:].partition("?")
    else:
        raise BadRequest("Invalid request target")
    if "#" in query:
        query = query.partition("#")[0]
    elif "#" in path:
        path = path.partition("#")[0]
    return path, query


def build_environ(
    method: str,
    target: str,
    protocol: str,
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes,
    *,
    remote: tuple[str, int],
    server: tuple[str, int],
    script_name: str = "",
    url_scheme: str = "http",
    multithread: bool = True,
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the PEP 3333 environ for one parsed request.

    ``target`` and header bytes are latin-1 native strings per PEP 3333.  Repeated
    headers are joined with ", " (Cookie with "; "); names containing "_" are dropped so
    that "X-Forwarded_For" cannot pose as "X-Forwarded-For" (as Django's runserver does).
    CONTENT_LENGTH is the length of the de-chunked body, because Django reads exactly
    CONTENT_LENGTH bytes and ignores wsgi.input_terminated.
    """
    raw_path, query = split_target(target)
    path = unquote_to_bytes(raw_path.encode("latin-1")).decode("latin-1")
    if script_name and (path == script_name or path.startswith(script_name + "/")):
        path = path[len(script_name) :]
    environ: dict[str, Any] = dict(base) if base else {}
    environ.update(
        {
            "REQUEST_METHOD": method,
            "SCRIPT_NAME": script_name,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "RAW_URI": target,
            "REQUEST_URI": target,
            "SERVER_PROTOCOL": protocol,
            "SERVER_NAME": server[0],
            "SERVER_PORT": str(server[1]),
            "REMOTE_ADDR": remote[0],
            "REMOTE_PORT": str(remote[1]),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": url_scheme,
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": multithread,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
        }
    )
    for raw_name, raw_value in headers:
        if b"_" in raw_name:
            continue
        name = raw_name.decode("latin-1").upper().replace("-", "_")
        value = raw_value.decode("latin-1").strip(" \t")
        if name == "CONTENT_TYPE" or name == "CONTENT_LENGTH":
            key = name
        else:
            key = "HTTP_" + name
        if key in environ:
            environ[key] += ("; " if key == "HTTP_COOKIE" else ", ") + value
        else:
            environ[key] = value
    if body or "CONTENT_LENGTH" in environ or "HTTP_TRANSFER_ENCODING" in environ:
        environ["CONTENT_LENGTH"] = str(len(body))
    return environ


def apply_forwarded(environ: dict[str, Any], trusted: frozenset[str]) -> None:
    """The peer is a trusted proxy: take the client's address from X-Forwarded-For (the
    rightmost hop that is not itself a trusted proxy) and the scheme from
    X-Forwarded-Proto.  Never called for untrusted peers, whose headers are left as sent."""
    hops = [h.strip() for h in environ.get("HTTP_X_FORWARDED_FOR", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if hop not in trusted:
            environ["REMOTE_ADDR"] = hop
            environ["REMOTE_PORT"] = ""
            break
    proto = environ.get("HTTP_X_FORWARDED_PROTO", "").split(",")[0].strip().lower()
    if proto in ("http", "https"):
        environ["wsgi.url_scheme"] = proto


class StartResponse:
    """The ``start_response`` callable of one request, and what the app told it.

    It may be called on a worker thread; the server reads ``status``/``headers`` after
    the app returned or yielded its first chunk, as PEP 3333 allows.
    """

    __slots__ = ("code", "headers", "headers_sent", "reason", "status", "written")

    def __init__(self) -> None:
        self.status: str | None = None
        self.code = 0
        self.reason = ""
        self.headers: Headers = []
        self.headers_sent = False
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
        elif self.status is not None:
            raise AppError("start_response() called twice without exc_info")
        if not isinstance(status, str) or not _STATUS.match(status):
            raise AppError(f"invalid status line from the application: {status!r}")
        for header in headers:
            if not (isinstance(header, tuple) and len(header) == 2):
                raise AppError(f"invalid header from the application: {header!r}")
            name, value = header
            if not (isinstance(name, str) and _TOKEN_STR.match(name)):
                raise AppError(f"invalid header name from the application: {name!r}")
            if not isinstance(value, str) or _BAD_VALUE_CHARS.search(value):
                raise AppError(f"invalid header value from the application: {name}: {value!r}")
            if name.lower() == "content-length" and not value.strip().isdigit():
                raise AppError(f"invalid Content-Length from the application: {value!r}")
            try:
                value.encode("latin-1")
            except UnicodeEncodeError:
                raise AppError(
                    f"header value is not latin-1 (PEP 3333): {name}: {value!r}"
                ) from None
        self.status = status
        self.code = int(status[:3])
        self.reason = status[4:]
        self.headers = list(headers)
        return self.write

    def write(self, data: bytes) -> None:
        """The legacy write() callable: buffered before the iterable's output."""
        if self.status is None:
            raise AppError("write() called before start_response()")
        if not isinstance(data, bytes):
            raise AppError(f"write() needs bytes, got {type(data).__name__}")
        self.written.append(data)


class Limits(NamedTuple):
    """Sizes checked in Python, so that each gets its own status (evhttp answers 400 to
    anything over its single, larger, buffer limit)."""

    target: int = 8190  # bytes in the request-target -> 414 (Apache's line limit)
    header_bytes: int = 16 * 1024  # all header lines together -> 431
    header_count: int = 100  # header lines -> 431


DEFAULT_LIMITS = Limits()


def check_request(
    method: str,
    target: bytes,
    version: tuple[int, int],
    headers: list[tuple[bytes, bytes]],
    limits: Limits = DEFAULT_LIMITS,
) -> None:
    """Refuse what RFC 9112 says to refuse and evhttp lets through (BadRequest)."""
    if version not in ((1, 1), (1, 0)):
        raise BadRequest("HTTP Version Not Supported", 505)
    if len(target) > limits.target:
        raise BadRequest("URI Too Long", 414)
    if len(headers) > limits.header_count:
        raise BadRequest("Request Header Fields Too Large (too many)", 431)
    if sum(len(name) + len(value) + 4 for name, value in headers) > limits.header_bytes:
        raise BadRequest("Request Header Fields Too Large", 431)
    if target == b"*" and method != "OPTIONS":
        raise BadRequest("Asterisk target is only for OPTIONS")
    hosts = 0
    length: bytes | None = None
    chunked = False
    for name, value in headers:
        if not _TOKEN.match(name):
            raise BadRequest("Invalid header name")
        lname = name.lower()
        if lname == b"host":
            hosts += 1
        elif lname == b"content-length":
            value = value.strip(b" \t")
            if not value.isdigit() or (length is not None and value != length):
                raise BadRequest("Invalid Content-Length")
            length = value
        elif lname == b"transfer-encoding":
            chunked = True
    if hosts > 1 or (hosts == 0 and version == (1, 1)):
        raise BadRequest("Missing or repeated Host header (RFC 9112 3.2)")
    if chunked and version == (1, 0):
        raise BadRequest("Transfer-Encoding in an HTTP/1.0 request (RFC 9112 6.1)")

"""The pure WSGI parts: request pieces -> PEP 3333 environ, and start_response.

Nothing here touches a socket or libevent, so all of it is tested in memory.
"""

from __future__ import annotations

import io
import ipaddress
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple
from urllib.parse import unquote_to_bytes

Headers = list[tuple[str, str]]

# RFC 9110 5.6.2 token characters; a field name must be a token.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# Not in a request-target (RFC 9112 3.2, RFC 3986): a space, a tab (evhttp splits the
# request line at its first and last space only), any other control character.
_NOT_IN_TARGET = re.compile(rb"[\x00-\x20\x7f]")
# Host = uri-host [ ":" port ] (RFC 9112 3.2, RFC 3986 3.2.2): an IP literal in brackets,
# or a reg-name (an IPv4 address is one) of unreserved, percent-encoded and sub-delims.
_HOST = re.compile(
    rb"[ \t]*(?:\[[0-9A-Za-z:.\-_~!$&'()*+,;=%]+\]|[0-9A-Za-z\-._~!$&'()*+,;=%]*)"
    rb"(?::[0-9]*)?[ \t]*\Z"
)
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


class BadRequest(Exception):
    """The request is malformed; ``status`` is the answer it deserves."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.status = status


class AppError(Exception):
    """The application broke the WSGI contract (bad status, bad header, no start_response)."""


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")  # (RFC 3986 3.1)


def split_target(target: str) -> tuple[str, str]:
    """request-target -> (raw path, query): origin form, absolute form or '*'."""
    target = target.partition("#")[0]  # a fragment is the client's own, never sent
    if target.startswith("/"):
        path, _, query = target.partition("?")
    elif target == "*":
        return "*", ""
    elif _SCHEME.match(target):  # absolute-form (RFC 9112 3.2.2): keep path and query only
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        query_at = rest.find("?")
        if slash == -1 or (query_at != -1 and query_at < slash):
            path, query = "/", rest.partition("?")[2]
        else:
            path, _, query = rest[slash:].partition("?")
    else:
        raise BadRequest("Invalid request target")
    return path, query


class EnvironBuilder:
    """Builds the PEP 3333 environ of each request of one server.

    What is the same for every request is computed once; header names are mapped to
    environ keys through a small cache, since clients send the same few names again and
    again.  Repeated headers are joined with ", " (Cookie with "; "); names containing
    "_" are dropped so that "X-Forwarded_For" cannot pose as "X-Forwarded-For" (as
    Django's runserver does).  CONTENT_LENGTH is the length of the de-chunked body,
    because Django reads exactly CONTENT_LENGTH bytes and ignores wsgi.input_terminated.
    """

    def __init__(
        self,
        *,
        server: tuple[str, int],
        script_name: str = "",
        url_scheme: str = "http",
        multithread: bool = True,
        multiprocess: bool = False,
        extra: dict[str, Any] | None = None,
    ):
        self.script_name = script_name
        self.base: dict[str, Any] = {
            "SCRIPT_NAME": script_name,
            "SERVER_NAME": server[0],
            "SERVER_PORT": str(server[1]),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": url_scheme,
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": multithread,
            "wsgi.multiprocess": multiprocess,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
            **(extra or {}),
        }
        self._keys: dict[bytes, str | None] = {}

    def _key(self, raw_name: bytes) -> str | None:
        key = self._keys.get(raw_name, "")
        if key == "":
            if b"_" in raw_name:
                key = None
            else:
                name = raw_name.decode("latin-1").upper().replace("-", "_")
                key = name if name in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + name
            if len(self._keys) > 1000:
                self._keys.clear()  # a client inventing names must not grow it forever
            self._keys[raw_name] = key
        return key

    def build(
        self,
        method: str,
        target: str,
        protocol: str,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
        remote: tuple[str, int],
    ) -> dict[str, Any]:
        raw_path, query = split_target(target)
        if "%" in raw_path:
            path = unquote_to_bytes(raw_path.encode("latin-1")).decode("latin-1")
        else:
            path = raw_path
        script_name = self.script_name
        if script_name and (path == script_name or path.startswith(script_name + "/")):
            path = path[len(script_name) :]
        environ = self.base.copy()
        environ["REQUEST_METHOD"] = method
        environ["PATH_INFO"] = path
        environ["QUERY_STRING"] = query
        environ["RAW_URI"] = environ["REQUEST_URI"] = target
        environ["SERVER_PROTOCOL"] = protocol
        environ["REMOTE_ADDR"] = remote[0]
        environ["REMOTE_PORT"] = str(remote[1])
        environ["wsgi.input"] = io.BytesIO(body)
        keys = self._keys
        for raw_name, raw_value in headers:
            key = keys.get(raw_name, "")
            if key == "":
                key = self._key(raw_name)
            if key is None:
                continue
            value = raw_value.decode("latin-1").strip(" \t")
            if key in environ:
                environ[key] += ("; " if key == "HTTP_COOKIE" else ", ") + value
            else:
                environ[key] = value
        if body or "CONTENT_LENGTH" in environ or "HTTP_TRANSFER_ENCODING" in environ:
            environ["CONTENT_LENGTH"] = str(len(body))
        if target[0] != "/" and target != "*":
            # absolute-form: the target's authority, not the Host header, names the host
            # (RFC 9112 3.2.2); Django reads HTTP_HOST.
            # (The fragment first: the authority checked ends at a "#", as here.)
            rest = target.partition("#")[0].split("://", 1)[1]
            authority = rest.split("/", 1)[0].split("?", 1)[0]
            environ["HTTP_HOST"] = authority.rpartition("@")[2]  # never a userinfo
        return environ


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
) -> dict[str, Any]:
    """The environ of one request (a one-off EnvironBuilder)."""
    builder = EnvironBuilder(server=server, script_name=script_name, url_scheme=url_scheme)
    return builder.build(method, target, protocol, headers, body, remote)


def is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def apply_forwarded(environ: dict[str, Any], trusted: frozenset[str]) -> None:
    """The peer is a trusted proxy: take the client's address from X-Forwarded-For (the
    rightmost hop that is not itself a trusted proxy) and the scheme from
    X-Forwarded-Proto.  Never called for untrusted peers, whose headers are left as sent."""
    hops = [h.strip() for h in environ.get("HTTP_X_FORWARDED_FOR", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if hop not in trusted:
            if is_ip_address(hop):  # else ("unknown", junk): the peer's address stays
                environ["REMOTE_ADDR"] = hop
                environ["REMOTE_PORT"] = ""
            break
    # The last value, the one the nearest proxy set: values before it may have come with
    # the request (a proxy that appends would otherwise let any client claim https).  So
    # with several proxies, the nearest must pass on the scheme the client used.
    proto = environ.get("HTTP_X_FORWARDED_PROTO", "").split(",")[-1].strip().lower()
    if proto in ("http", "https"):
        environ["wsgi.url_scheme"] = proto


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
                close = close or (lname == "connection" and asks_to_close(value))
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


class Limits(NamedTuple):
    """Sizes checked in Python, so that each gets its own status (evhttp answers 400 to
    anything over its single, larger, buffer limit)."""

    target: int = 8190  # bytes in the request-target -> 414 (Apache's line limit)
    header_bytes: int = 16 * 1024  # all header lines together -> 431
    header_count: int = 100  # header lines -> 431


DEFAULT_LIMITS = Limits()


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
) -> None:
    """Refuse what RFC 9112 says to refuse and evhttp lets through (BadRequest)."""
    if version not in ((1, 1), (1, 0)):
        raise BadRequest("HTTP Version Not Supported", 505)
    if len(target) > limits.target:
        raise BadRequest("URI Too Long", 414)
    if _NOT_IN_TARGET.search(target):
        raise BadRequest("Invalid request target (a space or a control character)")
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
    if method in _BODY_UNREAD and (codings or (length is not None and int(length) > 0)):
        # A body is framed by its headers whatever the method (RFC 9112 6), but evhttp
        # reads none for these: it would take the body's bytes for the next request.
        raise BadRequest(f"A {method} request cannot carry a body here")
    if codings:
        if version == (1, 0):
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request (RFC 9112 6.1)")
        # evhttp dechunks a body only when the header is exactly "chunked"; with any other
        # value it would read no body and take the body's bytes for the next request.
        if codings[-1] != b"chunked" or codings.count(b"chunked") > 1:
            raise BadRequest("Transfer-Encoding must end in chunked, once (RFC 9112 6.3)")
        if len(codings) > 1:
            raise BadRequest("Only the chunked transfer coding is implemented", 501)

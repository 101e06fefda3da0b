"""Request pieces -> the PEP 3333 environ: the target split, headers mapped to environ
keys, and a trusted proxy's X-Forwarded-* applied.

Pure: nothing here touches a socket or libevent, so all of it is tested in memory.
"""

from __future__ import annotations

import io
import ipaddress
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote_to_bytes

from .logwriter import error_stream
from .proxies import TrustedProxies
from .request_checks import BadRequest

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
            "wsgi.errors": error_stream(),
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
            # The body is de-chunked: an app that saw the header would decode it again
            # (Bottle does), and a hop-by-hop header is the server's (PEP 3333).
            environ.pop("HTTP_TRANSFER_ENCODING", None)
        if target[0] != "/" and target != "*":
            # absolute-form: the target's authority, not the Host header, names the host
            # (RFC 9112 3.2.2); Django reads HTTP_HOST.
            # (The fragment first: the authority checked ends at a "#", as here.)
            rest = target.partition("#")[0].split("://", 1)[1]
            authority = rest.split("/", 1)[0].split("?", 1)[0]
            environ["HTTP_HOST"] = authority.rpartition("@")[2]  # never a userinfo
        return environ


def is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def apply_forwarded(environ: dict[str, Any], trusted: TrustedProxies) -> None:
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

"""A response written in one piece: its head (the app's headers, Date, Content-Length,
Connection) and its whole body, from the loop thread.

The head is shared with streamed responses (``responder.py``, which builds on this).
Every response's bytes pass through one shared evbuffer, which evhttp empties at each
hand-over; what it would not send (a HEAD's, a 304's) must never be put there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

from . import libevent_ctypes as ev
from .request import REQUEST_CHUNKED, RequestStruct
from .start_response import NO_BODY_STATUSES, StartResponse

if TYPE_CHECKING:
    from .config import ServerConfig
    from .exchange import Exchange

logger = logging.getLogger("django_comet.server")

# A whole body this small leaves with the call that hands it over (the kernel takes it).
SMALL_BODY = 64 * 1024
# A streamed item this small is framed in Python and copied into its connection's
# output buffer; a larger one is handed to evhttp, which moves its blocks without a copy.
SMALL_CHUNK = 16 * 1024
_ERROR_BODY = b"A server error occurred.  Please contact the administrator.\n"

_date: tuple[int, bytes] = (0, b"")  # the second it is for, and the Date value


def http_date() -> bytes:
    """The Date header's value for now (RFC 9110 5.6.7), formatted once a second."""
    global _date, _date_end
    now = int(time.time())
    if _date[0] != now:
        _date = (now, formatdate(now, usegmt=True).encode("ascii"))
        _date_end = b"Date: %s\r\n\r\n" % _date[1]
    return _date[1]


_date_end = b""  # the Date line, and the empty line that ends a head


def date_and_end() -> bytes:
    """The Date line for now and the end of the head (CRLF), in one piece."""
    if _date[0] != int(time.time()):
        http_date()
    return _date_end


class WholeReplies:
    """Mixed into ``Server`` (through ``Responder``); every method runs on the loop thread."""

    config: ServerConfig
    _lib: Any
    _buf: int
    _draining: bool
    # Methods of Server.
    _drop: Callable[[Exchange], None]
    _finish: Callable[..., None]
    _restore_read_timeout: Callable[[Exchange], None]

    def _add_headers(self, r: RequestStruct, start: StartResponse, length: int | None) -> None:
        """Copy the app's (already encoded) headers to evhttp's output headers."""
        out = r.output_headers
        add = self._lib.evhttp_add_header
        # evhttp dates HTTP/1.1 answers only (and leaves the app's Date alone there).
        if (
            r.minor == 0
            and r.major == 1
            and not any(name.lower() == b"date" for name, _ in start.encoded)
        ):
            add(out, b"Date", http_date())
        for name, value in start.encoded:
            add(out, name, value)
        if start.code == 205:  # no content, and said so, whatever the app gave (RFC 9110
            length = 0  # 15.3.6; evhttp knows no 205, and would read a length as a body's)
        if length is not None and start.code != 204:  # never in a 204 (RFC 9110 8.6)
            add(out, b"Content-Length", b"%d" % length)
        if start.close or self._draining:  # stopping: no next request on this connection
            self._say_close(r)

    def _say_close(self, r: RequestStruct) -> None:
        """Answer with ``Connection: close``, and only that: evhttp adds ``keep-alive``
        to an HTTP/1.0 answer when the request asked for it, whatever the answer says."""
        self._lib.evhttp_add_header(r.output_headers, b"Connection", b"close")
        if r.minor == 0:
            while self._lib.evhttp_remove_header(r.input_headers, b"Connection") == 0:
                pass

    def _reply_whole(self, ex: Exchange, start: StartResponse, chunks: list[bytes]) -> None:
        if ex.dead:
            return self._drop(ex)
        assert ex.req is not None
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        length = start.length
        code = start.code
        # carries_body(), for a GET and for this method (start_response refuses 1xx)
        any_body = code not in NO_BODY_STATUSES
        with_body = any_body and ex.method != "HEAD"
        if length is None:
            # A HEAD's is the length a GET would get: known if the app gave the body
            # (a 304's is the resource's, a 205 says 0: _add_headers).
            if any_body and (body or ex.method != "HEAD"):
                length = len(body)
        elif with_body and length != len(body):
            logger.error(
                "%s %s: Content-Length %d but the body has %d bytes; closing the connection",
                ex.method,
                ex.path,
                length,
                len(body),
            )
            body = body[:length]
            start.close = True
        r = RequestStruct.from_address(ex.req)
        if not r.evcon:  # the client left while the app ran: free the request, send nothing
            ex.dead = True
            return self._drop(ex)
        if not with_body:
            body = b""
        if ex.keep_alive and ex.conn and not (start.close or self._draining):
            return self._write_whole(ex, start, length, body)
        self._add_headers(r, start, length)
        if body:
            self._lib.evbuffer_add(self._buf, body, len(body))
        ex.code, ex.sent = start.code, len(body)
        if ex.bev is not None:
            self._restore_read_timeout(ex)
        req, ex.req = ex.req, None
        # Finished first, as in _end.  A small body leaves at once; a large one may take
        # a while to a slow reader.
        self._finish(ex, req if len(body) > SMALL_BODY else None)
        self._lib.evhttp_send_reply(req, start.code, start.reason, self._buf)
        self._stop_reading(ex)

    def _write_whole(
        self, ex: Exchange, start: StartResponse, length: int | None, body: bytes
    ) -> None:
        """A whole reply on a keep-alive HTTP/1.1 connection, head and body written in
        one piece straight into the connection's output buffer: what evhttp_send_reply
        would write (its Date last), without a call per header.  evhttp stopped reading
        when the request was complete, so writing is all there is to turn on; and
        evhttp_send_reply_end, seeing output queued, finishes the request once it has
        left (evhttp_send_done: the next request is read then)."""
        lib = self._lib
        code = start.code
        lines = start.lines
        if lines is not None:
            dated = start.dated
        else:  # (encoded was edited: content_coding.py)
            lines = [b"%s: %s\r\n" % pair for pair in start.encoded]
            dated = any(name.lower() == b"date" for name, _ in start.encoded)
        if code == 205:  # (as _add_headers)
            length = 0
        # evhttp's Date comes last, after the Content-Length
        end = b"\r\n" if dated else date_and_end()
        size = len(body)
        if length is not None and code != 204:
            lines = [*lines, b"Content-Length: %d\r\n" % length]
        # (bufferevent_write: evbuffer_add to the connection's output, in one call)
        if size <= SMALL_CHUNK:
            data = b"".join((start.line, *lines, end, body))
            lib.bufferevent_write(ex.conn, data, len(data))
        else:  # not copied once more here
            data = b"".join((start.line, *lines, end))
            lib.bufferevent_write(ex.conn, data, len(data))
            lib.bufferevent_write(ex.conn, body, size)
        ex.code, ex.sent = code, size
        if ex.bev is not None:
            self._restore_read_timeout(ex)
        req, ex.req = ex.req, None
        self._finish(ex, req if size > SMALL_BODY else None)
        lib.bufferevent_enable(ex.conn, ev.EV_WRITE)
        # evhttp_send_reply_end ends a chunked response with its last chunk, and takes
        # the request's own "chunked" (a chunked upload's) for the response's when
        # evhttp_send_reply_start was not called: five bytes after the body.
        assert req is not None
        RequestStruct.from_address(req).bits &= ~REQUEST_CHUNKED
        lib.evhttp_send_reply_end(req)

    def _reply_error(self, ex: Exchange) -> None:
        start = StartResponse()
        start("500 Internal Server Error", [("Content-Type", "text/plain; charset=utf-8")])
        self._reply_whole(ex, start, [_ERROR_BODY])

    def _stop_reading(self, ex: Exchange) -> None:
        """After each hand-over of a response that is not held: evhttp reads on while it
        writes, to notice a client leaving, and takes a client's half-close (shutdown
        of its sending side, as ``nc -N`` or a TCP proxy does) for leaving, cutting the
        response.  A client that is really gone still fails the writes (or the write
        timeout); evhttp reads again for the next request once the response is out.
        Held responses go on reading: they may write nothing for a long time."""
        if ex.conn:
            self._lib.bufferevent_disable(ex.conn, ev.EV_READ)

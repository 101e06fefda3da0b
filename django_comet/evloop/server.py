"""A WSGI server on libevent's evhttp.

evhttp (C) parses requests, keeps connections alive and frames responses.  Python runs
once per request (building the environ), once per response and once per chunk.  Views run
on a bounded thread pool; results come back to the loop thread through
``Loop.call_soon_threadsafe``.  Only the loop thread calls libevent.

An ``Exchange`` is one request and its response.  Its life:
``app`` (running the application) -> ``held`` (waiting on a deferral, headers sent) or
``streaming`` (a worker produces chunks) -> ``done``.  A client that disconnects marks it
``dead``: its timer is cancelled at once and its request freed; a worker that comes back
with output for a dead exchange drops it.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from . import libevent_ctypes as ev
from .config import ServerConfig
from .connections import ConnectionGuard, shutdown_socket
from .deferral import AnyDeferral
from .files import FileWrapper
from .holding import NO_ENVIRON, Holder
from .loop import Handle, Loop, timeval_of
from .producer import Producer
from .request import RequestStruct, read_request
from .workers import ThreadPool
from .wsgi import (
    BadRequest,
    EnvironBuilder,
    Limits,
    StartResponse,
    apply_forwarded,
    carries_body,
)

logger = logging.getLogger("django_comet.server")
access_logger = logging.getLogger("django_comet.access")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

_ERROR_BODY = b"A server error occurred.  Please contact the administrator.\n"


class Exchange:
    __slots__ = (
        "bev",
        "close_at_end",
        "code",
        "cursor",
        "dead",
        "deferred",
        "drained",
        "environ",
        "hold",
        "key",
        "limit",
        "method",
        "outbuf",
        "path",
        "pending",
        "protocol",
        "pump",
        "req",
        "sent",
        "started",
        "state",
        "timer",
    )

    def __init__(self, key: int, req: int, environ: dict[str, Any]):
        self.key = key
        self.req: int | None = req  # None once libevent freed it or we handed it back
        self.environ = environ
        self.method: str = environ["REQUEST_METHOD"]
        self.path: str = environ["RAW_URI"]
        self.protocol: str = environ["SERVER_PROTOCOL"]
        self.started = time.monotonic()
        self.code = 0
        self.sent = 0
        self.state = "app"
        self.dead = False
        self.timer: Handle | None = None
        self.bev: int | None = None  # set while held: its read timeout is lifted
        self.pending = 0  # streaming: bytes handed to the loop and not yet flushed
        self.drained: threading.Event | None = None
        self.pump: tuple[Iterator[bytes], Iterable[bytes]] | None = None  # --threads 0 streams
        self.deferred = False  # counted in Server.held until done
        self.hold: Any = None  # the ChannelWait or Stream it is subscribed for
        self.cursor = 0  # newest event id it was sent (streams) or waits past (long-polls)
        self.outbuf: int | None = None  # streams: the connection's output evbuffer
        self.close_at_end = False  # its headers were shed and had asked to close
        self.limit: int | None = None  # a streamed body's Content-Length: not a byte more


class Server(Producer):
    """Serve ``app`` on ``config.host:config.port`` (or on an already listening ``sock``)."""

    def __init__(
        self,
        app: WSGIApp,
        config: ServerConfig | None = None,
        *,
        loop: Loop | None = None,
        sock: socket.socket | None = None,
    ):
        self.app = app
        self.config = config or ServerConfig()
        self.loop = loop or Loop()
        self._lib = ev.lib()
        self.sock = sock or bind_socket(self.config.host, self.config.port, self.config.backlog)
        self.address = self.sock.getsockname()[:2]
        self._exchanges: dict[int, Exchange] = {}
        self._next_key = 1
        self.requests = 0  # exchanges finished since start
        self.held = 0  # exchanges held open right now by deferrals
        self._draining = False
        self._buf = self._lib.evbuffer_new()
        # Files go out by sendfile where libevent can: the shared buffer only ever hands
        # its contents on whole (evbuffer_add_buffer), which is what the flag promises.
        self._sends_files = ev.ev_off_t is not None
        if self._sends_files:
            self._lib.evbuffer_set_flags(self._buf, ev.EVBUFFER_FLAG_DRAINS_TO_FD)
        threads = self.config.threads
        self._pool = ThreadPool(threads) if threads > 0 else None
        # From a worker, hand a result to the loop thread; inline, just call it.
        self._to_loop: Callable[..., None] = (
            self.loop.call_soon_threadsafe if self._pool else _call_now
        )
        self._environ = EnvironBuilder(
            server=(self.config.host, self.address[1]),
            script_name=self.config.script_name,
            url_scheme=self.config.url_scheme,
            multithread=threads > 0,
            extra={"evloop.server": self, "wsgi.file_wrapper": FileWrapper},
        )
        # C callbacks, referenced for as long as the evhttp object lives.
        self._request_cb = ev.evhttp_request_cb(self._on_request)
        self._close_cb = ev.evhttp_connection_cb(self._on_close)
        self._drained_cb = ev.evhttp_connection_cb(self._on_drained)
        self._file_sent_cb = ev.evhttp_connection_cb(self._on_file_sent)
        self._limits = Limits(
            self.config.max_request_line, self.config.max_header_size, self.config.max_header_count
        )
        self._http = self._make_evhttp()
        self.holder = Holder(self)

    def _make_evhttp(self) -> int:
        lib, cfg = self._lib, self.config
        http = lib.evhttp_new(self.loop.base)
        if not http:
            raise OSError("evhttp_new() failed")
        lib.evhttp_set_gencb(http, self._request_cb, None)
        lib.evhttp_set_allowed_methods(http, ev.EVHTTP_ALL_METHODS)
        lib.evhttp_set_default_content_type(http, None)
        lib.evhttp_set_max_headers_size(http, 2 * (cfg.max_header_size + cfg.max_request_line))
        lib.evhttp_set_max_body_size(http, cfg.max_body_size)
        lib.evhttp_set_timeout_tv(http, ctypes.byref(timeval_of(cfg.timeout)))
        self.sock.setblocking(False)
        self._bound = lib.evhttp_accept_socket_with_handle(http, self.sock.fileno())
        if not self._bound:
            raise OSError("evhttp_accept_socket_with_handle() failed")
        self._listener = lib.evhttp_bound_socket_get_listener(self._bound)
        self._accept_error_cb = ev.evconnlistener_errorcb(self._on_accept_error)
        lib.evconnlistener_set_error_cb(self._listener, self._accept_error_cb)
        self.accept_pauses = 0
        self._pauses: set[str] = set()
        self.guard = ConnectionGuard(self, http)
        return int(http)

    # -- running -----------------------------------------------------------------------

    def serve_forever(self, *, handle_signals: bool = True) -> None:
        """Serve until SIGINT/SIGTERM (or ``shutdown()``); a second signal cuts the drain."""
        if handle_signals:
            import signal

            for signum in (signal.SIGINT, signal.SIGTERM):
                self.loop.add_signal_handler(signum, self.shutdown)
        # What exists now (the app, its framework, the server) lives as long as the
        # process: freeze it, so that no collection scans it again.
        gc.collect()
        gc.freeze()
        try:
            self.loop.run()
        finally:
            self.close()

    def shutdown(self) -> None:
        """Loop thread: stop accepting, end held responses, let in-flight ones finish
        within ``config.grace`` seconds, then stop the loop."""
        if self._draining:
            logger.warning("Second stop request: closing now.")
            self.loop.stop()
            return
        self._draining = True
        self._lib.evhttp_del_accept_socket(self._http, self._bound)  # closes the fd too
        self._bound = None
        self.sock.detach()
        self.holder.end_all()
        deadline = time.monotonic() + self.config.grace

        def check() -> None:
            if not self._exchanges or time.monotonic() >= deadline:
                if self._exchanges:
                    logger.warning("Grace period over: cutting %d responses.", len(self._exchanges))
                self.loop.stop()
            else:
                self.loop.call_later(0.05, check)

        check()

    def close(self) -> None:
        self.holder.close()
        if self._pool is not None:
            self._pool.shutdown(timeout=1)
        for ex in list(self._exchanges.values()):
            self._forget(ex)
        self.guard.close()
        if self._http:
            self._lib.evhttp_free(self._http)  # closes the listener and idle connections
            self._http = 0
            if self._bound is not None:
                self.sock.detach()  # libevent owned and closed the fd
        self.guard.release_all()
        self._lib.evbuffer_free(self._buf)

    def stats(self) -> dict[str, Any]:
        return {
            "held": self.held,
            "requests": self.requests,
            "in_flight": len(self._exchanges),
            # Timers and watchers of requests: less the wake-up pipe and the sweeper.
            "timers": self.loop.pending_handles - 1 - self.guard.handles,
            "threads": self._pool.size if self._pool else 0,
            "connections": self.guard.open,
            "header_timeouts": self.guard.timed_out,
            "accept_pauses": self.accept_pauses,
            **self.holder.stats(),
        }

    def _on_accept_error(self, listener: int, _arg: Any) -> None:
        """accept() failed (EMFILE: out of file descriptors, ENFILE, ENOBUFS): pause
        accepting for a moment instead of spinning on a listening socket that stays
        readable; connections already open go on being served."""
        err = ctypes.get_errno() or "?"
        self.accept_pauses += 1
        logger.warning("accept() failed (errno %s); pausing new connections for 0.5 s", err)
        self._accepting(False, "accept-error")
        self.loop.call_later(0.5, lambda: self._accepting(True, "accept-error"))

    def _accepting(self, on: bool, reason: str = "connections") -> None:
        """Pause or resume accepting; accepting resumes when no reason to pause is left."""
        if on:
            self._pauses.discard(reason)
        else:
            self._pauses.add(reason)
        if self._draining or self._bound is None:
            return
        if self._pauses:
            self._lib.evconnlistener_disable(self._listener)
        else:
            self._lib.evconnlistener_enable(self._listener)

    # -- request intake (loop thread) --------------------------------------------------

    def _on_request(self, req: int, _arg: Any) -> None:
        r = RequestStruct.from_address(req)
        try:
            method, target, protocol, headers, body, remote = read_request(
                r, self._lib, self._limits
            )
            environ = self._build_environ(method, target, protocol, headers, body, remote)
        except BadRequest as exc:
            self._lib.evhttp_send_error(req, exc.status, str(exc).encode("latin-1"))
            return
        except Exception:  # a bug of ours: the client still gets an answer
            logger.exception("Error reading a request")
            self._lib.evhttp_send_error(req, 500, None)
            return
        if self.guard.tracking:
            self.guard.request_arrived(r.evcon)
        key = self._next_key
        self._next_key += 1
        ex = Exchange(key, req, environ)
        self._exchanges[key] = ex
        if self._pool is not None:
            self._lift_read_timeout(ex)  # a slow view must not look like an idle client
            self._pool.submit(self._run_app, ex)
        else:
            self._run_app(ex)

    def _build_environ(
        self,
        method: str,
        target: str,
        protocol: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        remote: tuple[str, int],
    ) -> dict[str, Any]:
        environ = self._environ.build(method, target, protocol, headers, body, remote)
        trusted = self.config.trusted_proxies
        if trusted and remote[0] in trusted:
            apply_forwarded(environ, trusted)
        return environ

    # -- writing responses (loop thread) -----------------------------------------------

    def _add_headers(self, out: int, start: StartResponse, length: int | None) -> None:
        """Copy the app's (already encoded) headers to evhttp's output headers."""
        add = self._lib.evhttp_add_header
        for name, value in start.encoded:
            add(out, name, value)
        if length is not None:
            add(out, b"Content-Length", b"%d" % length)
        if start.close:
            add(out, b"Connection", b"close")

    def _reply_whole(self, ex: Exchange, start: StartResponse, chunks: list[bytes]) -> None:
        if ex.dead:
            return self._drop(ex)
        assert ex.req is not None
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        length = start.length
        with_body = carries_body(ex.method, start.code)
        if length is None:
            if carries_body("GET", start.code):  # a HEAD's is the length a GET would get
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
        self._add_headers(r.output_headers, start, length)
        if not with_body:
            body = b""
        if body:
            self._lib.evbuffer_add(self._buf, body, len(body))
        ex.code, ex.sent = start.code, len(body)
        if ex.bev is not None:
            self._restore_read_timeout(ex)
        req, ex.req = ex.req, None
        self._finish(ex)  # first, as in _end
        self._lib.evhttp_send_reply(req, start.code, start.reason, self._buf)

    def _reply_error(self, ex: Exchange) -> None:
        start = StartResponse()
        start("500 Internal Server Error", [("Content-Type", "text/plain; charset=utf-8")])
        self._reply_whole(ex, start, [_ERROR_BODY])

    def _reply_file(
        self, ex: Exchange, start: StartResponse, fd: int, offset: int, count: int
    ) -> None:
        """Send ``count`` bytes of file ``fd`` (ours to close) from ``offset``: libevent
        queues the range and the kernel copies it to the socket as the client reads.  The
        exchange lives until the last byte left, so a vanished client, the access log
        and a graceful stop see it as they see a stream."""
        if ex.dead or ex.req is None:
            os.close(fd)
            return self._drop(ex)
        r = RequestStruct.from_address(ex.req)
        if not r.evcon:
            os.close(fd)
            ex.dead = True
            return self._drop(ex)
        with_body = carries_body(ex.method, start.code)
        segment = None
        if with_body:
            flags = ev.EVBUF_FS_CLOSE_ON_FREE | ev.EVBUF_FS_DISABLE_LOCKING
            segment = self._lib.evbuffer_file_segment_new(fd, offset, count, flags)
            if not segment:
                os.close(fd)
                logger.error("%s %s: libevent could not map the file", ex.method, ex.path)
                return self._reply_error(ex)
        else:
            os.close(fd)
        self._lib.evhttp_connection_set_closecb(r.evcon, self._close_cb, ex.key)
        self._add_headers(
            r.output_headers, start, count if carries_body("GET", start.code) else None
        )
        ex.code = start.code
        ex.state = "streaming"
        self._lib.evhttp_send_reply_start(ex.req, start.code, start.reason)
        if segment is None:
            return self._end(ex)
        added = self._lib.evbuffer_add_file_segment(self._buf, segment, 0, count)
        self._lib.evbuffer_file_segment_free(segment)  # the buffer holds it (and the fd) now
        if added != 0:
            logger.error("%s %s: libevent could not queue the file", ex.method, ex.path)
            return self._abort(ex)
        ex.sent = count
        self._lib.evhttp_send_reply_chunk_with_cb(ex.req, self._buf, self._file_sent_cb, ex.key)
        self._check_handed_over(ex)

    def _on_file_sent(self, _evcon: int, key: int) -> None:
        ex = self._exchanges.get(key)
        if ex is not None and not ex.dead and ex.req is not None:
            self._end(ex)

    def _begin_chunked(
        self, ex: Exchange, start: StartResponse, chunks: list[bytes], *, keep_length: bool
    ) -> bool:
        """Send the head and first chunk; False (and released) if the client is gone."""
        assert ex.req is not None
        r = RequestStruct.from_address(ex.req)
        if not r.evcon:
            ex.dead = True
            self._drop(ex)
            return False
        self._lib.evhttp_connection_set_closecb(r.evcon, self._close_cb, ex.key)
        self._add_headers(r.output_headers, start, start.length if keep_length else None)
        if (r.major, r.minor) < (1, 1):
            # HTTP/1.0 has no chunked coding: the end of the body is the end of the
            # connection.  (evhttp would otherwise answer a keep-alive 1.0 request with a
            # wrong "Content-Length: 0".)
            self._lib.evhttp_remove_header(r.input_headers, b"Connection")
            self._lib.evhttp_add_header(r.output_headers, b"Connection", b"close")
        ex.code = start.code
        if keep_length and carries_body(ex.method, start.code):
            ex.limit = start.length
        self._lib.evhttp_send_reply_start(ex.req, start.code, start.reason)
        if chunks:
            self._send_chunk(ex, b"".join(chunks))
        return True

    def _start_stream(self, ex: Exchange, start: StartResponse, chunks: list[bytes]) -> None:
        if ex.dead:
            return self._drop(ex)
        ex.state = "streaming"
        self._begin_chunked(ex, start, chunks, keep_length=True)

    def _start_deferred(
        self, ex: Exchange, start: StartResponse, chunks: list[bytes], deferral: AnyDeferral
    ) -> None:
        if ex.dead:
            return self._drop(ex)
        # Later stages add content, so the first stage's length is not the body's.
        if not self._begin_chunked(ex, start, chunks, keep_length=False):
            return
        if ex.method == "HEAD":  # the head is all a HEAD gets: no stages, no stream
            return self._end(ex)
        ex.deferred = True
        self.held += 1
        self.holder.hold(ex, deferral)

    def _resume(self, ex: Exchange, resume: Callable[..., Iterable[bytes]], *args: Any) -> None:
        """A held exchange's wait is over: run its next stage."""
        ex.timer = None
        ex.state = "app"
        if self._pool is not None:
            self._pool.submit(self._run_stage, ex, resume, args)
        else:
            self._run_stage(ex, resume, args)

    def _stage_done(self, ex: Exchange, chunks: list[bytes], deferral: AnyDeferral | None) -> None:
        if ex.dead:
            return self._drop(ex)
        if chunks:
            self._send_chunk(ex, b"".join(chunks))
        if deferral is not None and not self._draining:
            self.holder.hold(ex, deferral)
        else:
            self._end(ex)

    def _send_chunk(self, ex: Exchange, data: bytes) -> None:
        # The buffer is shared by every response, and evhttp leaves in it what it would
        # not send (a HEAD's or a 304's body, a gone client's): never hand such bytes over.
        if ex.dead or ex.req is None or not carries_body(ex.method, ex.code):
            return
        if ex.limit is not None and ex.sent + len(data) > ex.limit:
            # Bytes past the Content-Length would be read as the next response.
            if not ex.close_at_end:
                logger.error(
                    "%s %s: the body runs past its Content-Length %d; cut there, closing",
                    ex.method,
                    ex.path,
                    ex.limit,
                )
                ex.close_at_end = True
            data = data[: ex.limit - ex.sent]
            if not data:
                return
        self._lib.evbuffer_add(self._buf, data, len(data))
        ex.sent += len(data)
        if ex.drained is not None or ex.pump is not None:
            self._lib.evhttp_send_reply_chunk_with_cb(ex.req, self._buf, self._drained_cb, ex.key)
        else:
            self._lib.evhttp_send_reply_chunk(ex.req, self._buf)
        self._check_handed_over(ex)

    def _check_handed_over(self, ex: Exchange) -> None:
        """The shared buffer must be empty after each hand-over: bytes evhttp refused
        would otherwise go out in the next response, to whichever client that is."""
        left = self._lib.evbuffer_get_length(self._buf)
        if left:
            self._lib.evbuffer_drain(self._buf, left)
            logger.error("%s %s: evhttp refused %d bytes; dropped", ex.method, ex.path, left)

    def _on_drained(self, _evcon: int, key: int) -> None:
        ex = self._exchanges.get(key)
        if ex is None:
            return
        ex.pending = 0
        if ex.drained is not None:
            ex.drained.set()
        elif ex.pump is not None:
            self._pump(ex)

    def _end(self, ex: Exchange) -> None:
        """The last chunk: a clean end of the response."""
        if ex.dead:
            return self._drop(ex)
        if ex.limit is not None and ex.sent < ex.limit:
            # Kept open, the client would wait for the missing bytes (or read the next
            # response as them): close once what was sent has left, so that it sees a
            # body cut short.
            logger.error(
                "%s %s: the body ended %d bytes short of its Content-Length; closing",
                ex.method,
                ex.path,
                ex.limit - ex.sent,
            )
            ex.close_at_end = True
        self.holder.release(ex)
        self._restore_read_timeout(ex)
        req = ex.req
        assert req is not None
        if ex.close_at_end:  # evhttp decides from the headers, which a hold freed
            out = RequestStruct.from_address(req).output_headers
            self._lib.evhttp_add_header(out, b"Connection", b"close")
        # Finished first: when the output is already flushed, evhttp frees the request,
        # and the connection if it is to close, inside this call; the close callback
        # must then find nothing of ours left to release.
        ex.req = None
        self._finish(ex)
        self._lib.evhttp_send_reply_end(req)

    def _abort(self, ex: Exchange) -> None:
        """Cut the connection so the client sees an error, never a clean end.  libevent
        notices the shut-down socket and the close callback releases the exchange."""
        if ex.dead or ex.req is None:
            return self._drop(ex)
        ex.code = ex.code or 500
        evcon = RequestStruct.from_address(ex.req).evcon
        if not evcon:  # the client left already
            ex.dead = True
            return self._drop(ex)
        ex.state = "aborting"  # no worker owns it now: the close callback releases it
        self.holder.release(ex)
        fd = self._lib.bufferevent_getfd(self._lib.evhttp_connection_get_bufferevent(evcon))
        shutdown_socket(fd)

    # -- connection loss ---------------------------------------------------------------

    def _on_close(self, evcon: int, key: int) -> None:
        """libevent: the connection of exchange ``key`` is gone (client left, timeout,
        or an aborted response)."""
        if self.guard.tracking:
            self.guard.closing(evcon)
        ex = self._exchanges.get(key)
        if ex is None:
            return  # a keep-alive connection closing after its exchanges finished
        ex.dead = True
        self.holder.release(ex)
        if ex.drained is not None:
            ex.drained.set()
        if ex.state != "app":  # no worker owns it: release it now
            self._drop(ex)

    def _drop(self, ex: Exchange) -> None:
        """Release a dead exchange: free its request (libevent left it to us), close a
        body the loop thread was pumping."""
        self._stop_pump(ex)
        if ex.req is not None:
            r = RequestStruct.from_address(ex.req)
            if not r.evcon:
                self._lib.evhttp_send_reply_end(ex.req)  # with no connection: just frees
            ex.req = None
        if self._exchanges.pop(ex.key, None) is not None:
            self._done(ex, aborted=True)

    def _forget(self, ex: Exchange) -> None:
        """Shutdown: libevent frees everything with evhttp_free; just stop tracking."""
        self.holder.release(ex)
        self._stop_pump(ex)
        ex.dead = True
        ex.req = None
        self._exchanges.pop(ex.key, None)

    # -- bookkeeping -------------------------------------------------------------------

    def _lift_read_timeout(self, ex: Exchange) -> None:
        assert ex.req is not None
        evcon = RequestStruct.from_address(ex.req).evcon
        bev = self._lib.evhttp_connection_get_bufferevent(evcon)
        self._lib.bufferevent_set_timeouts(bev, None, ctypes.byref(timeval_of(self.config.timeout)))
        ex.bev = bev

    def _restore_read_timeout(self, ex: Exchange) -> None:
        if ex.bev is not None:
            # A detached request (evcon NULL) means the connection, and so its
            # bufferevent, is gone: nothing to restore.
            if ex.req is not None and RequestStruct.from_address(ex.req).evcon:
                tv = ctypes.byref(timeval_of(self.config.timeout))
                self._lib.bufferevent_set_timeouts(ex.bev, tv, tv)
            ex.bev = None

    def _finish(self, ex: Exchange) -> None:
        del self._exchanges[ex.key]
        self._done(ex, aborted=False)

    def _done(self, ex: Exchange, aborted: bool) -> None:
        ex.state = "done"
        ex.environ = NO_ENVIRON  # drop the request's references now, not at the next GC
        self.requests += 1
        if ex.deferred:
            self.held -= 1
        if self.config.access_log and access_logger.isEnabledFor(logging.INFO):
            duration = (time.monotonic() - ex.started) * 1000
            access_logger.info(
                '"%s %s %s" %s %d %.1fms%s',
                ex.method,
                ex.path,
                ex.protocol,
                ex.code or "-",
                ex.sent,
                duration,
                " (client gone)" if aborted else "",
            )


def _call_now(fn: Callable[..., Any], *args: Any) -> None:
    fn(*args)


def bind_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A listening TCP socket; IPv6 when ``host`` is an IPv6 literal."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if sys.platform != "win32":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock

"""A WSGI server on libevent's evhttp.

evhttp (C) parses requests, keeps connections alive and frames responses.  Python runs
once per request (building the environ), once per response and once per chunk.  Views run
on a bounded thread pool (``producer.py``); results come back to the loop thread through
``Loop.call_soon_threadsafe``, which writes them (``whole_replies.py``,
``responder.py``).  Only the loop thread calls libevent.  This module owns the rest: the
evhttp object and its lifecycle, taking requests in, losing connections, and each
exchange's bookkeeping (``exchange.py``); when connections are taken is
``admission.py``'s, and stopping ``stopping.py``'s.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import operator
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from . import accesslog, forking
from . import libevent_ctypes as ev
from .admission import VIEW_BACKLOG_HIGH, Admission
from .config import ServerConfig
from .connections import ConnectionGuard, can_track_connections
from .deferral import claiming
from .environ import EnvironBuilder, apply_forwarded
from .exchange import Exchange
from .figures import WorkerFigures
from .files import FileWrapper
from .holding import NO_ENVIRON, Holder
from .interrupt import StopNow, StopRequests
from .libc import free_heap_bytes, return_free_memory
from .listen import UNIX_PEER, UNIX_SERVER, listen_socket, remove_unix_socket, unix_socket_id
from .loop import Loop, timeval_of
from .producer import Producer
from .request import RequestStruct, evhttp_closes, read_request
from .request_checks import BadRequest, Limits
from .responder import Responder
from .start_response import asks_to_close
from .stopping import Stopping
from .workers import ThreadPool

logger = logging.getLogger("django_comet.server")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

# Seconds a closing server waits for its view threads (those still in a view are left).
POOL_SHUTDOWN_WAIT = 1.0


class Server(Producer, Responder, Admission, Stopping):
    """Serve ``app`` on ``config.host:config.port``, or ``config.unix_socket``, or an
    already listening ``sock`` (TCP or Unix)."""

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
        claiming()  # (a held response that blocks in its thread here was hidden from it)
        self._own_loop = loop is None  # closed with the server; a loop passed in is not
        self.loop = loop or Loop(changelist=can_track_connections())
        self._lib = ev.lib()
        # A Unix socket this server bound itself is also its to remove when it stops.
        self._own_path = "" if sock else self.config.unix_socket
        self.sock = sock or listen_socket(self.config)
        self._own_id = unix_socket_id(self._own_path) if self._own_path else None
        self.unix = self.sock.family == getattr(socket, "AF_UNIX", None)
        self.address = (self.sock.getsockname(), 0) if self.unix else self.sock.getsockname()[:2]
        self._exchanges: dict[int, Exchange] = {}
        self._next_key = 1
        self.requests = 0  # exchanges finished since start
        self.refused = 0  # requests answered with an error before any app saw them
        self.held = 0  # exchanges held open right now by deferrals
        self._draining = False
        self._drain_check: Any = None  # the drain's next look (shutdown)
        self._handling_signals = False
        self._stop_requests = StopRequests()
        # The application's code runs in the loop thread now (--threads 0, interrupt.py);
        # view threads write it too, but only --threads 0's signal handlers read it.
        self._in_app = False
        self._let_go = 0  # bytes closed connections let go of, since the last release
        self._arrived_at_release = self._arrived_at_sweep = 0  # request counts (_next_key)
        self._trim_due = False  # a trim waits for closed connections' release
        self._unread_let_go = 0  # connections released with no request, since the sweep
        self._free_low = 0  # the heap's free bytes at their lowest since the last trim
        self._bodies_done = 0  # request body bytes of the exchanges over since a collection
        self._buf = self._lib.evbuffer_new()
        # The read and write timeout of every connection, made once: held responses
        # lift and restore it, and a publish ends thousands of them at a time.
        self._timeout_tv = ctypes.byref(timeval_of(self.config.timeout))
        self._lifted_tv = ctypes.byref(timeval_of(LIFTED_READ_TIMEOUT))
        # Files go out by sendfile where libevent can: the shared buffer only ever hands
        # its contents on whole (evbuffer_add_buffer), which is what the flag promises.
        self._sends_files = ev.ev_off_t is not None
        if self._sends_files:
            self._lib.evbuffer_set_flags(self._buf, ev.EVBUFFER_FLAG_DRAINS_TO_FD)
        threads = self.config.threads
        # A view thread lets the loop send what is done before it starts more.
        self._pool = (
            ThreadPool(
                threads,
                before_each=self.loop.let_catch_up,
                spares=SPARE_THREADS_PER_THREAD * threads,
                on_exit=self.config.on_thread_exit,
            )
            if threads > 0
            else None
        )
        # From a worker, hand a result to the loop thread; inline, just call it.
        self._to_loop: Callable[..., None] = (
            self.loop.call_soon_threadsafe if self._pool else _call_now
        )
        self._environ = EnvironBuilder(
            server=UNIX_SERVER if self.unix else (_server_name(self.config.host), self.address[1]),
            script_name=self.config.script_name,
            url_scheme=self.config.url_scheme,
            multithread=threads > 0,
            multiprocess=self.config.multiprocess,
            extra={"evloop.server": self, "wsgi.file_wrapper": FileWrapper},
        )
        # C callbacks, referenced for as long as the evhttp object lives.
        # (Each guarded: an error raised into C would be printed and lost, half done.
        # The request callback guards itself: the hottest path, it saves two calls.)
        self._request_cb = ev.evhttp_request_cb(self._on_request)
        # These two may run the application's code (a body's next items, its close()):
        # a StopNow raised there goes to the loop, not to ctypes (interrupt.py).
        self._close_cb = ev.evhttp_connection_cb(self.loop.guarded(self._on_close))
        self._drained_cb = ev.evhttp_connection_cb(self.loop.guarded(self._on_drained))
        self._file_sent_cb = ev.evhttp_connection_cb(self.loop.guarded(self._on_file_sent))
        self._complete_cb = ev.evhttp_request_cb(self.loop.guarded(self._on_complete))
        self._limits = Limits.of(self.config)
        # Proxies whose X-Forwarded-* are believed, or None (read for each request).
        self._trusted = self.config.trusted_proxies or None
        self._http = self._make_evhttp()
        self.holder = Holder(self)
        self.shared_figures: WorkerFigures | None = None  # under --workers

    def share_figures(self, directory: str, number: int) -> None:
        """A pre-forked worker: write this worker's figures where the others read them,
        so that the status view shows the whole server's."""
        self.shared_figures = WorkerFigures(self, directory, number)

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
        lib.evhttp_set_timeout_tv(http, self._timeout_tv)
        self.sock.setblocking(False)
        self._listen_fd = self.sock.fileno()
        self._bound = lib.evhttp_accept_socket_with_handle(http, self._listen_fd)
        if not self._bound:
            raise OSError("evhttp_accept_socket_with_handle() failed")
        self._listener = lib.evhttp_bound_socket_get_listener(self._bound)
        self._accept_error_cb = ev.evconnlistener_errorcb(self.loop.guarded(self._on_accept_error))
        lib.evconnlistener_set_error_cb(self._listener, self._accept_error_cb)
        self.accept_pauses = 0
        self.backlog_pauses = 0
        self._pauses: set[str] = set()
        # The server's pending timers, cancelled by close(): a pause's reason -> the timer
        # that lifts it, and "closing", the listener's closing at a stop.
        self._own_timers: dict[str, Any] = {}
        self.guard = ConnectionGuard(self, http)
        self._tracking = self.guard.tracking  # (read for each request: fixed by now)
        self._accepted_this_pass = 0  # (--threads 0: _accepted_for_the_loop)
        if self.config.threads == 0:
            self.guard.on_accept = self._accepted_for_the_loop
        return int(http)

    # -- running -----------------------------------------------------------------------

    def serve_forever(self, *, handle_signals: bool = True, worker: bool = False) -> None:
        """Serve until a stop signal (or ``shutdown()``); a second signal cuts the drain.
        See ``handle_signals`` for ``worker``."""
        if handle_signals:
            self.handle_signals(worker=worker)
        forking.close_in_children(self._descriptors)
        # What exists now (the app, its framework, the server) lives as long as the
        # process: freeze it, so that no collection scans it again.
        gc.collect()
        gc.freeze()
        try:
            self.loop.run()
        except StopNow as stop:
            logger.warning("Stopped at once: %s.", stop)
        finally:
            try:
                self.close()
            finally:
                self.give_back_alarm()

    def _descriptors(self) -> list[int]:
        """The sockets a child forked from a view must not keep (forking.py): the
        listening one, until it is closed, and the clients' connections."""
        listening = [self._listen_fd] if self._listen_fd >= 0 else []
        return listening + self.guard.descriptors()

    def close(self) -> None:
        if self._drain_check is not None:  # a drain cut short: not on a loop that goes on
            self._drain_check.cancel()
            self._drain_check = None
        # Nor a pause's check, nor the listener's closing (evhttp_free closes it then).
        for handle in self._own_timers.values():
            handle.cancel()
        self._own_timers.clear()
        forking.forget(self._descriptors)
        self.holder.close()
        for ex in self._exchanges.values():
            # Paused bodies' workers wait for bytes that will not leave now, or are about
            # to (Producer._wait_at): they go on to close their bodies.
            ex.dead = True
            self._stop_pump(ex)
        if self._pool is not None:
            self._pool.shutdown(timeout=POOL_SHUTDOWN_WAIT)
        for ex in list(self._exchanges.values()):
            ex.state = "aborting"  # (its access-log line says: cut by the server)
            self._done(ex, aborted=True)
            self._forget(ex)
        self.guard.close()
        if self.shared_figures is not None:
            self.shared_figures.close()
        if self._http:
            # Closes the listener and idle connections.  The listener's descriptor closes
            # at once: a loop passed in that goes on running after this may see it
            # reported if another process shares the socket (see Loop._new_base).
            self._lib.evhttp_free(self._http)
            self._http = 0
            self._listen_fd = -1
            if self._bound is not None:
                self.sock.detach()  # libevent owned and closed the fd
        if self._own_path:
            remove_unix_socket(self._own_path, self._own_id)
        self.guard.release_all()
        self._lib.evbuffer_free(self._buf)
        if self._own_loop:
            self.loop.close()

    def stats(self) -> dict[str, Any]:
        """This process's figures."""
        return {
            "held": self.held,
            "requests": self.requests,
            "refused": self.refused,
            "in_flight": len(self._exchanges),
            # Timers and watchers of requests: less the server's own.
            "timers": self.loop.foreground_handles,
            "threads": self._pool.size if self._pool else 0,
            "connections": self.guard.open,
            "header_timeouts": self.guard.timed_out,
            "accept_pauses": self.accept_pauses,
            "backlog_pauses": self.backlog_pauses,
            "connection_pauses": self.guard.pauses,
            **self.holder.stats(),
        }

    def server_stats(self) -> dict[str, Any]:
        """The whole server's figures: this process's, or under ``--workers`` every
        worker's added up (the others' as of their last write, at most a second ago)."""
        if self.shared_figures is None:
            return {"workers": 1, **self.stats()}
        return self.shared_figures.combined(self.stats)

    # -- request intake (loop thread) --------------------------------------------------

    def _on_request(self, req: int, _arg: Any) -> None:
        # Guarded here, not through Loop.guarded (the hottest path: no wrapper call):
        # raised into C, an error would be printed and lost, half done.
        try:
            r = RequestStruct.from_address(req)
            try:
                method, target, protocol, headers, body, remote = read_request(
                    r, self._lib, self._limits
                )
                if self.unix:
                    remote = UNIX_PEER  # evhttp's name for it is glibc's "localhost"
                environ = self._environ.build(method, target, protocol, headers, body, remote)
                trusted = self._trusted
                if trusted is not None and remote[0] in trusted:
                    apply_forwarded(environ, trusted)
                if r.flags & ev.EVHTTP_PROXY_REQUEST:
                    # evhttp takes an absolute-form target naming a host it does not know for a
                    # proxy's request, and then closes the connection unless the response says
                    # "Proxy-Connection: keep-alive".  A server must accept that form (RFC 9112
                    # 3.2.2): answered as any request.
                    r.flags &= ~ev.EVHTTP_PROXY_REQUEST
                connection = environ.get("HTTP_CONNECTION")
                closing = connection is not None and asks_to_close(connection)
                if closing and not evhttp_closes(headers):
                    # evhttp closes only on a first Connection header that is exactly "close"
                    # (past the spaces it strips: not a tab): say it that way.
                    while self._lib.evhttp_remove_header(r.input_headers, b"Connection") == 0:
                        pass
                    self._lib.evhttp_add_header(r.input_headers, b"Connection", b"close")
                key = self._next_key
                self._next_key += 1
                ex = Exchange(key, req, environ)
                ex.body_size = len(body)
                ex.keep_alive = not closing and protocol == "HTTP/1.1"
                if self._tracking:
                    ex.conn = self.guard.request_arrived(r.evcon)
            except BadRequest as exc:
                if exc.status == 505:  # evhttp answers in the request's version: in ours
                    r.major, r.minor = 1, 1
                try:
                    self._log_refused(r, exc.status)
                finally:  # (the client gets its answer whatever the log does)
                    self._send_error(r, req, exc.status, str(exc).encode("latin-1"))
                return
            except Exception:  # a bug of ours: the client still gets an answer
                try:
                    logger.exception("Error reading a request")
                    self._log_refused(r, 500)
                finally:
                    self._send_error(r, req, 500, None)
                return
            self._exchanges[ex.key] = ex
            if self._pool is not None:
                self._lift_read_timeout(ex)  # a slow view must not look like an idle client
                self._pool.submit(self._run_app, ex)
                waiting = self._pool.backlog  # (_views_waiting)
            else:
                waiting = self.loop.call_after_pass(self._run_app, ex)
            if waiting > VIEW_BACKLOG_HIGH and "views" not in self._pauses:
                self._pause_for_views()
        except BaseException as exc:
            self.loop.failed(exc, self._on_request)

    def _log_refused(self, r: RequestStruct, status: int) -> None:
        """A request refused before any app saw it: counted, and an access-log line (a
        probe, a smuggling attempt leaves a trace), its method and target as far as they
        were read (accesslog.py)."""
        self.refused += 1
        if not (self.config.access_log and accesslog.enabled()):
            return
        uri = r.uri
        method = ev.EVHTTP_METHODS.get(r.type, "-") if uri is not None else "-"
        target = uri.decode("latin-1") if uri is not None else "-"
        peer = UNIX_PEER[0] if self.unix else (r.remote_host or b"-").decode("latin-1")
        accesslog.refused(method, target, status, peer)

    def _send_error(self, r: RequestStruct, req: int, status: int, reason: bytes | None) -> None:
        """Refuse a request with an error page and close its connection."""
        if r.type == ev.EVHTTP_REQ_CONNECT:
            # To a CONNECT, evhttp sends no length and never closes (a tunnel would
            # follow): answered as to a GET, the page is framed and the connection ends.
            r.type = ev.EVHTTP_REQ_GET
        # An absolute-form target's request is a proxy's to evhttp (see _on_request),
        # whose answer says Proxy-Connection in place of "Connection: close".
        r.flags &= ~ev.EVHTTP_PROXY_REQUEST
        self._lib.evhttp_send_error(req, status, reason)

    # -- connection loss ---------------------------------------------------------------

    def _on_close(self, evcon: int, key: int) -> None:
        """libevent: the connection of exchange ``key`` is gone (client left, timeout,
        or an aborted response)."""
        ex = self._exchanges.get(key)
        self._let_go += CONNECTION_BYTES  # freed at its release: see release_let_go
        if ex is not None and ex.sent:  # what is still queued never left (a file: most)
            lib = self._lib
            bev = ex.conn or lib.evhttp_connection_get_bufferevent(evcon)
            unsent = lib.evbuffer_get_length(lib.bufferevent_get_output(bev))
            self._let_go += unsent
            if ex.framing:  # chunked: the unsent bytes hold their share of its framing
                unsent = unsent * ex.sent // (ex.sent + ex.framing)
            ex.sent = max(0, ex.sent - unsent)
        if self.guard.tracking:
            self.guard.closing(evcon)
        if ex is None:
            return  # a keep-alive connection closing after its exchanges finished
        ex.dead = True
        self.holder.release(ex)
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

    def release_let_go(self) -> None:
        """Once a second (the connection guard's sweep): when closed connections have let
        go of much unsent output, or a burst of requests is over, or connections no
        request came from have left the heap with much free memory (uploads their clients
        gave up on, freed by libevent), hand the heap's free memory back to the system."""
        if self._bodies_done > RELEASE_AFTER_BYTES:
            # Their requests may sit in reference cycles (Django's does: the closure
            # behind request.user), which only a full collection frees, and an idle
            # server makes none: bodies freed now, then handed back below.
            self._let_go += self._bodies_done
            self._bodies_done = 0
            gc.collect()
        arrived = self._next_key
        burst_over = (
            arrived - self._arrived_at_release >= BURST_REQUESTS
            and arrived - self._arrived_at_sweep < QUIET_REQUESTS
        )
        self._arrived_at_sweep = arrived
        unread, self._unread_let_go = self._unread_let_go, 0
        if self._trim_due:
            return
        if (
            self._let_go > RELEASE_AFTER_BYTES
            or burst_over
            or (unread and self._free_heap_grew())  # uploads given up on
        ):
            self._let_go = 0
            self._arrived_at_release = arrived
            # Once the connections closed by now are released (a pass or two): their
            # memory is not free before, and trimming then would leave it to glibc.
            self._trim_due = True
            self.guard.after_released(self._trim)

    def let_go_unread(self) -> None:
        """A connection no request reached the server from is released: what it read of
        a body (an upload its client gave up on) libevent freed, unseen by the server."""
        self._let_go += CONNECTION_BYTES
        self._unread_let_go += 1

    def _free_heap_grew(self) -> bool:
        """Whether the heap's free memory grew by RELEASE_AFTER_BYTES from its lowest
        since the last trim (a trim hands pages back but leaves them counted free: the
        same holes would be trimmed again at every look)."""
        free = free_heap_bytes()
        self._free_low = min(self._free_low, free)
        return free - self._free_low > RELEASE_AFTER_BYTES

    def _trim(self) -> None:
        self._trim_due = False
        return_free_memory()
        self._free_low = free_heap_bytes()

    def _lift_read_timeout(self, ex: Exchange) -> None:
        assert ex.req is not None
        # (The guard's key for the connection is its bufferevent: the same int, shared.)
        bev = ex.conn or self._lib.evhttp_connection_get_bufferevent(
            RequestStruct.from_address(ex.req).evcon
        )
        self._lib.bufferevent_set_timeouts(bev, self._lifted_tv, self._timeout_tv)
        ex.bev = bev

    def _restore_read_timeout(self, ex: Exchange) -> None:
        if ex.bev is not None:
            # A detached request (evcon NULL) means the connection, and so its
            # bufferevent, is gone: nothing to restore.
            if ex.req is not None and RequestStruct.from_address(ex.req).evcon:
                tv = self._timeout_tv
                self._lib.bufferevent_set_timeouts(ex.bev, tv, tv)
                if ex.deferred:
                    # Held, its input was capped (Holder.hold); evhttp waits for a
                    # request's whole body in that buffer: lift the cap for the next.
                    self._lib.bufferevent_setwatermark(ex.bev, ev.EV_READ, 0, 0)
            ex.bev = None

    def _finish(self, ex: Exchange, req: int | None = None) -> None:
        """The exchange is over; ``req``, about to be sent, tells when it is out (a
        keep-alive connection's deadline for its next request runs from then)."""
        del self._exchanges[ex.key]
        if ex.conn:
            if req is None:
                self.guard.response_done(ex.conn)
            else:
                self._lib.evhttp_request_set_on_complete_cb(req, self._complete_cb, ex.conn)
        self._done(ex, aborted=False)

    def _on_complete(self, _req: int, conn: int) -> None:
        self.guard.response_done(conn)

    def _done(self, ex: Exchange, aborted: bool) -> None:
        # An aborted exchange was cut by the server (an app error), or its client left.
        cut = ex.state == "aborting"
        ex.state = "done"
        self._bodies_done += ex.body_size
        ex.environ = NO_ENVIRON  # drop the request's references now, not at the next GC
        self.requests += 1
        if ex.deferred:
            self.held -= 1
        if self.config.access_log and accesslog.enabled():
            how = ("cut by the server" if cut else "client gone") if aborted else ""
            ms = (time.monotonic() - ex.started) * 1000
            accesslog.served(ex.method, ex.path, ex.protocol, ex.code, ex.sent, ms, how, ex.remote)


# The read timeout of a connection whose request is handled or held: none in effect.
# Not "none" (NULL): libevent forgets a read event's timeout only if it is cleared while
# that event is pending, and keeps it for the event's next activity otherwise.  Cleared
# as a request arrives, when evhttp reads nothing, it came back with the first byte a
# held response's client sent (a pipelined request), and cut the response that much
# later (found by a review of pipelining).
LIFTED_READ_TIMEOUT = 1e9  # seconds: 31 years (COMET_MAX_HOLD is 115 days at most)

# Memory let go by closed connections (their unsent output, and their own structures)
# after which free heap memory goes back to the system: glibc keeps it for reuse
# otherwise.  RSS stayed at 390 MB after slow readers that were dropped had had 300 MB
# buffered, and 16 MiB up after 5,000 streams reset at once (libevent frees a closed
# connection a pass later, among the next pass's allocations).
RELEASE_AFTER_BYTES = 16 * 1024 * 1024
CONNECTION_BYTES = 4096  # about what a held connection takes (bench/fanout)
# A burst of requests (thousands of clients connecting at once, after a restart) leaves
# holes in the heap between the memory of the responses it left held, where its requests'
# buffers were: a quarter to a whole KiB per held SSE stream at 5,000.  Once the server
# is quiet again their free pages go back to the system; under steady load, never.
BURST_REQUESTS = 1000  # arrived since the last release
QUIET_REQUESTS = 50  # arrived in the last second


# Threads that may stand in for view threads waiting on slow readers (a streamed body
# paused in the thread that ran its view: Producer._stream_on), per --threads.  Beyond
# them, such a body waits holding its view thread, the write timeout in all at most
# (Responder._give_up).
SPARE_THREADS_PER_THREAD = 4


def _server_name(host: str) -> str:
    """SERVER_NAME for a bound address: an IPv6 literal in brackets (RFC 3875 4.1.14), as
    a Host header would carry it, so that Django can split off the port."""
    return f"[{host}]" if ":" in host else host


def _call(fn: Callable[..., Any], *args: Any) -> None:
    fn(*args)


# fn(*args), in C where the interpreter has it (Python 3.11): no frame of its own for
# each hand-over of --threads 0.
_call_now: Callable[..., Any] = getattr(operator, "call", _call)

"""Per-connection limits that evhttp lacks: deadlines for request heads (a slowloris
sender is cut), a floor under the rate of a slow upload (a slow-POST sender is cut), and
a maximum number of open connections (beyond it, accepting pauses and new clients wait
in the kernel's backlog).  Its sweep is also when the server hands memory that closed
connections let go back to the system (``Server.release_let_go``).

evhttp tells Python nothing about a connection until its first request is complete, so
the guard creates each connection's bufferevent itself (``evhttp_set_bevcb``) and holds
one reference on it.  A sweep once a second finds the connections evhttp has let go
(``bufferevent_free`` clears the event callback; our reference keeps the memory valid
to look at), drops our reference (which closes the socket, once a pass has begun since
it was disabled: see ``_release``), and deals with the connections past their deadline.  The event
callback, not the read callback: evhttp clears the read callback itself whenever it
writes a response, for as long as a download or a stream lasts.  Its offset in
``struct bufferevent`` is found at start by setting a known callback on a scratch
bufferevent, not compiled in.

A connection closed while its client's bytes wait unread in the kernel (a request
pipelined behind one that closes, the rest of a refused upload), or while the kernel
still has the end of the response to deliver, is closed in stages, as RFC 9112 9.6
advises: libevent has shut its sending side already; the guard reads and drops what
comes until the client closes too (``LINGER_SECONDS`` between two reads at most,
``LINGER_TOTAL_SECONDS`` in all), and only then lets the socket go.  Closed at once, the
kernel would answer unread bytes, or any that come later, with a reset, which throws
away the end of the response still on its way (and a client may read a cut body as a
whole one).

A deadline runs while a connection owes us a request: from its opening, and again from
the end of each response.  A request in progress (a view running, a response held) has
none.  evhttp only reports a request once its body is in too, so a connection past its
deadline may be an upload: from then on the bytes arriving are counted (an evbuffer
callback, on slow connections only), and it is cut as soon as a period brings fewer
than ``MIN_UPLOAD_RATE`` per second, the first period being short.  A head that passes
this way still ends at evhttp's bound on its size (48 KiB here: within about 100 s).
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import itertools
import logging
import os
import socket
import termios
import time
from typing import TYPE_CHECKING, Any

from . import libevent_ctypes as ev

if TYPE_CHECKING:
    from collections.abc import Callable

    from .loop import Handle
    from .server import Server

logger = logging.getLogger("django_comet.server")

SWEEP_SECONDS = 1.0
# Connections whose response ended lately, looked at first at the connection limit.
DONE_LATELY = 1000
# Bytes per second under which a request still arriving after its deadline is cut: the
# floor Apache's mod_reqtimeout applies to request bodies by default.
MIN_UPLOAD_RATE = 500
# How long a connection past its deadline is watched before its rate is first judged.
PROBATION_SECONDS = 2.0
# A closed connection waits for its client to close too, reading and dropping what it
# sends meanwhile, as nginx does: up to this long between two reads (its
# lingering_timeout)...
LINGER_SECONDS = 5.0
# ... and this long in all (its lingering_time): the rest of a refused upload, sent at a
# modest rate, is read to its end rather than cut by a reset.
LINGER_TOTAL_SECONDS = 30.0
_NONE = bytes(4)  # a count of 0, as the ioctls take and give it


def can_track_connections() -> bool:
    """Whether this libevent's bufferevents let the guard track connections (a scratch
    event base tells, before the server's own is made: see Loop._new_base)."""
    lib = ev.lib()
    base = lib.event_base_new()
    if not base:
        return False
    try:
        return find_eventcb_offset(lib, base) is not None
    finally:
        lib.event_base_free(base)


def find_eventcb_offset(lib: ctypes.CDLL, base: int) -> int | None:
    """Where ``errorcb`` (the event callback) sits in ``struct bufferevent``, or None if
    it cannot be found."""
    marker = ev.bufferevent_data_cb(lambda bev, ctx: None)  # never called: an address
    address = ctypes.cast(marker, ctypes.c_void_p).value
    bev = lib.bufferevent_socket_new(base, -1, 0)
    try:
        lib.bufferevent_setcb(bev, ev.bufferevent_data_cb(), None, address, None)
        words = (ctypes.c_void_p * 64).from_address(bev)
        found = [i for i, word in enumerate(words) if word == address]
        return found[0] * ctypes.sizeof(ctypes.c_void_p) if len(found) == 1 else None
    finally:
        lib.bufferevent_free(bev)


class ConnectionGuard:
    def __init__(self, server: Server, http: int):
        self.server = server
        self._lib = server._lib
        self.header_timeout = server.config.header_timeout
        # Keep-alive: the next request may begin as late as the idle timeout after the
        # previous response (evhttp closes an idle connection then), and its head then
        # has the header timeout, as a new connection's has.
        self.next_request_timeout = (
            server.config.timeout + self.header_timeout if self.header_timeout else 0.0
        )
        self.max_connections = server.config.max_connections
        self.timed_out = 0
        self.paused = False
        self.pauses = 0  # times accepting paused at max_connections
        self.on_accept: Callable[[], None] | None = None  # called as each is accepted
        self._conns: dict[int, float] = {}  # bufferevent -> deadline for a request, or 0
        self._releasing: list[int] = []  # disabled: our reference goes in two passes
        # Batches disabled a pass ago or more, each dropped at a later pass.
        self._dropping: dict[int, list[int]] = {}
        self._next_batch = 0
        # after_released: (the last batch to wait for, what to call once it is dropped).
        self._after_release: list[tuple[int, Callable[[], None]]] = []
        # Closing in stages: bufferevent -> [its reader, its idle deadline, its deadline].
        self._lingering: dict[int, list[Handle]] = {}
        self._lingered: set[int] = set()  # done lingering: on their way to be let go
        # Connections past their deadline: [bytes arrived, since when] (monotonic time).
        self._arriving: dict[int, list[Any]] = {}
        # Referenced while C may call them.
        self._count_arrivals = ev.evbuffer_cb_func(server.loop.guarded(self._arrived))
        self._offset = find_eventcb_offset(self._lib, server.loop.base)
        self._sweeper: Handle | None = None
        # Connections whose response ended lately (bufferevent -> None, oldest first):
        # where those evhttp let go unseen are looked for first.
        self._done_lately: dict[int, None] = {}
        if self._offset is None:
            logger.warning(
                "Cannot track connections with this libevent: no header deadline "
                "and no connection limit."
            )
            return
        self._bevcb = ev.evhttp_bevcb(self._new_connection)
        self._lib.evhttp_set_bevcb(http, self._bevcb, None)
        self._sweeper = server.loop.call_later(SWEEP_SECONDS, self._sweep, background=True)

    @property
    def open(self) -> int:
        """Connections open, and those evhttp let go since the last sweep (a whole
        reply's connection closes with no call to Python).  (Read by status views, in
        their threads: nothing here may call libevent.)"""
        return len(self._conns)

    @property
    def tracking(self) -> bool:
        return self._offset is not None

    def _new_connection(self, base: int, _arg: Any) -> int:
        """evhttp's new connection's bufferevent, one we keep a reference to.  It returns
        a pointer, so it is not guarded as the other callbacks are: an error raised into
        C left evhttp an uninitialised pointer (a crash).  Without a bufferevent (NULL),
        evhttp makes its own, untracked."""
        bev = 0
        try:
            bev = self._lib.bufferevent_socket_new(base, -1, ev.BEV_OPT_CLOSE_ON_FREE) or 0
            if bev:
                self._lib.bufferevent_incref(bev)
                deadline = time.monotonic() + self.header_timeout if self.header_timeout else 0.0
                limit = self.max_connections
                # (Connections closing in stages hold their descriptors: they count.)
                if limit and len(self._conns) + len(self._lingering) + 1 >= limit:
                    # Short connections closed since the sweep count no more.  (Before
                    # this one is counted: evhttp sets its callbacks once it has it.)
                    self._reap_done_lately()
                self._conns[bev] = deadline
                if limit and len(self._conns) + len(self._lingering) >= limit:
                    self._pause()
                if self.on_accept is not None:
                    self.on_accept()
        except BaseException as exc:  # (what is tracked by then stays tracked)
            self.server.loop.failed(exc, self._new_connection)
        return int(bev)

    def request_arrived(self, evcon: int) -> int:
        """A request came in time: no deadline while it is answered.  Returns the
        connection's key for ``response_done``."""
        bev: int = self._lib.evhttp_connection_get_bufferevent(evcon)
        self._done_lately.pop(bev, None)
        if self._conns.get(bev):
            self._conns[bev] = 0.0
            if bev in self._arriving:
                self._stop_counting(bev)
        return bev

    def response_done(self, bev: int) -> None:
        """The connection's response is complete (or its last bytes are on their way):
        the next request is due."""
        done_lately = self._done_lately
        done_lately[bev] = None
        if len(done_lately) > DONE_LATELY:
            del done_lately[next(iter(done_lately))]
        if self.next_request_timeout and bev in self._conns:
            self._conns[bev] = time.monotonic() + self.next_request_timeout

    def closing(self, evcon: int) -> None:
        """evhttp is freeing this connection (its close callback runs first): drop our
        reference at the next pass rather than at the next sweep, so that its memory is
        reused while it is still near the top of the heap (after a storm of resets, most
        of it)."""
        bev = self._lib.evhttp_connection_get_bufferevent(evcon)
        if self._conns.pop(bev, None) is not None:
            self._done_lately.pop(bev, None)
            self._arriving.pop(bev, None)  # its input buffer, callback and all, goes with it
            self._release(bev)

    def _release(self, bev: int) -> None:
        """Drop our reference, the last one once evhttp let go, which closes the socket:
        only after a pass has begun since its watch was removed, so that epoll has
        forgotten the socket by then (with the changelist, removals reach epoll when the
        next pass begins: Loop).  In two steps, a timer each (a timer armed in a pass
        runs in a later one): a connection disabled in the pass where the first step's
        timer runs, before it, is dropped by the second step's, one pass later still."""
        self._lib.bufferevent_disable(bev, ev.EV_READ | ev.EV_WRITE)
        self._releasing.append(bev)
        if len(self._releasing) == 1:
            self.server.loop.call_later(0, self._a_pass_began, background=True)

    def after_released(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the connections closed by now have had our reference
        dropped (at once if none wait; those closing in stages are not waited for: they
        may take seconds).  Connections closed later are not waited for either: under
        steady traffic on short connections there is always one on its way out."""
        if not (self._releasing or self._dropping):
            callback()
            return
        last = self._next_batch if self._releasing else max(self._dropping)
        self._after_release.append((last, callback))

    def _a_pass_began(self) -> None:
        batch, self._releasing = self._releasing, []
        key = self._next_batch
        self._next_batch += 1
        self._dropping[key] = batch
        self.server.loop.close_unwatched(functools.partial(self._drop_released, key))

    def _drop_released(self, key: int) -> None:
        for bev in self._dropping.pop(key):  # this batch only: a later one may be younger
            if bev in self._lingered:
                self._lingered.discard(bev)
            elif self._should_linger(bev):
                self._linger(bev)
                continue
            self._lib.bufferevent_decref(bev)
        if self._after_release:
            oldest = min(self._dropping, default=self._next_batch)
            due = [callback for last, callback in self._after_release if last < oldest]
            self._after_release = [item for item in self._after_release if item[0] >= oldest]
            for callback in due:
                callback()

    def _should_linger(self, bev: int) -> bool:
        """Whether the client sent bytes not read, or has not taken the whole response
        yet (bytes unacknowledged in the kernel's send queue): to close now would reset
        the connection (at once, or when the client sends more)."""
        fd = self._lib.bufferevent_getfd(bev)
        if fd < 0:
            return False
        input_buffer = self._lib.bufferevent_get_input(bev)
        if self._lib.evbuffer_get_length(input_buffer):
            # Read by libevent after evhttp let go, for no one: the rest of an upload
            # refused with a 413 (which evhttp answers itself), as it came in until now
            # (the kernel's queue then looks empty, and more is on its way).  Its memory
            # goes now; what follows is read and dropped.
            self._lib.evbuffer_drain(input_buffer, self._lib.evbuffer_get_length(input_buffer))
            return True
        try:
            return (
                fcntl.ioctl(fd, termios.FIONREAD, _NONE) != _NONE
                or fcntl.ioctl(fd, termios.TIOCOUTQ, _NONE) != _NONE
            )
        except OSError:
            return False

    def _linger(self, bev: int) -> None:
        """Read and drop what the client sends until it closes, or LINGER_SECONDS pass
        with nothing from it, or LINGER_TOTAL_SECONDS in all."""
        fd = self._lib.bufferevent_getfd(bev)
        os.set_blocking(fd, False)  # (as libevent made it: a read here must never wait)
        loop = self.server.loop
        reader = loop.add_reader(fd, functools.partial(self._drain, bev, fd), background=True)
        idle = loop.call_later(LINGER_SECONDS, self._done_lingering, bev, background=True)
        total = loop.call_later(LINGER_TOTAL_SECONDS, self._done_lingering, bev, background=True)
        self._lingering[bev] = [reader, idle, total]

    def _drain(self, bev: int, fd: int) -> None:
        try:
            while os.read(fd, 65536):
                pass
        except BlockingIOError:  # all read for now: LINGER_SECONDS for more from now on
            handles = self._lingering.get(bev)
            if handles is not None:
                handles[1].cancel()
                handles[1] = self.server.loop.call_later(
                    LINGER_SECONDS, self._done_lingering, bev, background=True
                )
            return
        except OSError:
            pass  # a reset: the client is gone
        self._done_lingering(bev)  # the client closed its side (or is gone)

    def _done_lingering(self, bev: int) -> None:
        handles = self._lingering.pop(bev, None)
        if handles is None:
            return
        for handle in handles:
            handle.cancel()
        self._lingered.add(bev)
        self._release(bev)  # after a pass, as any other: its watch was just removed

    def descriptors(self) -> list[int]:
        """The sockets of the connections open now, closing ones included (one just
        accepted may have none yet)."""
        closing = [*self._releasing, *self._lingering, *itertools.chain(*self._dropping.values())]
        getfd = self._lib.bufferevent_getfd
        return [fd for bev in (*self._conns, *closing) if (fd := getfd(bev)) >= 0]

    def unsent(self) -> int:
        """Bytes of output libevent has not written yet, over all open connections."""
        offset = self._offset
        if offset is None:
            return 0
        lib = self._lib
        total = 0
        for bev in self._conns:
            if ctypes.c_void_p.from_address(bev + offset).value:
                total += lib.evbuffer_get_length(lib.bufferevent_get_output(bev))
        return total

    def _sweep(self) -> None:
        self._sweeper = self.server.loop.call_later(SWEEP_SECONDS, self._sweep, background=True)
        self._reap()
        now = time.monotonic()
        for bev, deadline in list(self._conns.items()):
            if deadline and now > deadline:
                self._past_deadline(bev, now)
        if self.paused and len(self._conns) + len(self._lingering) < self.max_connections:
            self.paused = False
            self.server._accepting(True)
        self.server.release_let_go()

    def _reap_done_lately(self) -> None:
        """``_reap``, of the connections whose response ended lately only: those that
        close with no call to Python (after a whole reply, or a client's close between
        two requests), found at once at the limit, not by looking at every connection
        at each accept there."""
        offset = self._offset
        assert offset is not None
        for bev in list(self._done_lately):
            if bev not in self._conns:
                del self._done_lately[bev]
            elif not ctypes.c_void_p.from_address(bev + offset).value:
                self._let_go(bev)

    def _reap(self) -> None:
        """Stop counting the connections evhttp has let go (it cleared their event
        callback; ours is the last reference)."""
        offset = self._offset
        if offset is None:
            return
        let_go = [
            bev for bev in self._conns if not ctypes.c_void_p.from_address(bev + offset).value
        ]
        for bev in let_go:
            self._let_go(bev)

    def _let_go(self, bev: int) -> None:
        del self._conns[bev]
        self._done_lately.pop(bev, None)
        self._arriving.pop(bev, None)
        self.server.let_go_unread()
        self._release(bev)

    def _past_deadline(self, bev: int, now: float) -> None:
        lib = self._lib
        if lib.evbuffer_get_length(lib.bufferevent_get_output(bev)):
            # The last response is still leaving (a slow reader; the write timeout
            # watches that): the next request is due once it has left.
            self._conns[bev] = now + self.next_request_timeout
            return
        counted = self._arriving.get(bev)
        if counted is None:  # perhaps an upload: watch what arrives before judging
            lib.evbuffer_add_cb(lib.bufferevent_get_input(bev), self._count_arrivals, bev)
            self._arriving[bev] = [0, now]
            self._conns[bev] = now + min(self.header_timeout, PROBATION_SECONDS)
            return
        arrived, since = counted
        if arrived >= MIN_UPLOAD_RATE * (now - since):
            counted[:] = [0, now]
            self._conns[bev] = now + self.header_timeout
            return
        self._conns[bev] = 0.0
        self._stop_counting(bev)
        self.timed_out += 1
        shutdown_socket(lib.bufferevent_getfd(bev))  # evhttp sees EOF and frees it

    def _arrived(self, _buf: int, info: Any, bev: int) -> None:
        counted = self._arriving.get(bev)
        if counted is not None:
            counted[0] += info.contents.n_added

    def _stop_counting(self, bev: int) -> None:
        del self._arriving[bev]
        self._lib.evbuffer_remove_cb(
            self._lib.bufferevent_get_input(bev), self._count_arrivals, bev
        )

    def _pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.pauses += 1
            logger.warning(
                "%d connections open: not accepting more for now.",
                len(self._conns) + len(self._lingering),
            )
            self.server._accepting(False)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def release_all(self) -> None:
        """After evhttp_free: drop our reference on every connection's bufferevent."""
        dropping = [bev for batch in self._dropping.values() for bev in batch]
        for handles in self._lingering.values():
            for handle in handles:
                handle.cancel()
        for bev in [*self._conns, *self._releasing, *dropping, *self._lingering]:
            self._lib.bufferevent_decref(bev)
        self._conns.clear()
        self._releasing.clear()
        self._dropping.clear()
        self._after_release.clear()
        self._arriving.clear()
        self._done_lately.clear()
        self._lingering.clear()
        self._lingered.clear()


def shutdown_socket(fd: int) -> None:
    """Shut a socket libevent owns down (libevent then sees EOF and cleans up); the
    descriptor itself stays libevent's to close."""
    if fd < 0:
        return
    sock = socket.socket(fileno=fd)  # borrowed: detached below, never closed here
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()

"""Per-connection limits that evhttp lacks: a deadline for a new connection's first
request (a slowloris sender is cut), and a maximum number of open connections (beyond
it, accepting pauses and new clients wait in the kernel's backlog).

evhttp tells Python nothing about a connection until its first request is complete, so
the guard creates each connection's bufferevent itself (``evhttp_set_bevcb``) and holds
one reference on it.  A sweep once a second finds the connections evhttp has let go
(``bufferevent_free`` clears the event callback; our reference keeps the memory valid
to look at), drops our reference (which closes the socket), and cuts the connections
past their deadline.  The event callback, not the read callback: evhttp clears the read
callback itself whenever it writes a response, for as long as a download or a stream
lasts.  Its offset in ``struct bufferevent`` is found at start by setting a known
callback on a scratch bufferevent, not compiled in.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from . import libevent_ctypes as ev

if TYPE_CHECKING:
    from .loop import Handle
    from .server import Server

logger = logging.getLogger("django_comet.server")

SWEEP_SECONDS = 1.0


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
        self.max_connections = server.config.max_connections
        self.timed_out = 0
        self.paused = False
        self._conns: dict[int, float] = {}  # bufferevent -> first-request deadline, 0 once met
        self._offset = find_eventcb_offset(self._lib, server.loop.base)
        self._sweeper: Handle | None = None
        if self._offset is None:
            logger.warning(
                "Cannot track connections with this libevent: no header deadline "
                "and no connection limit."
            )
            return
        self._bevcb = ev.evhttp_bevcb(self._new_connection)  # referenced while C may call
        self._lib.evhttp_set_bevcb(http, self._bevcb, None)
        self._sweeper = server.loop.call_later(SWEEP_SECONDS, self._sweep)

    @property
    def open(self) -> int:
        return len(self._conns)

    @property
    def handles(self) -> int:
        """Loop handles the guard itself keeps (its sweeper)."""
        return 1 if self._sweeper is not None else 0

    @property
    def tracking(self) -> bool:
        return self._offset is not None

    def _new_connection(self, base: int, _arg: Any) -> int:
        bev = self._lib.bufferevent_socket_new(base, -1, ev.BEV_OPT_CLOSE_ON_FREE)
        self._lib.bufferevent_incref(bev)
        deadline = time.monotonic() + self.header_timeout if self.header_timeout else 0.0
        self._conns[bev] = deadline
        if self.max_connections and len(self._conns) >= self.max_connections:
            self._pause()
        return int(bev)

    def request_arrived(self, evcon: int) -> None:
        """A first request came in time: no more deadline for this connection."""
        bev = self._lib.evhttp_connection_get_bufferevent(evcon)
        if self._conns.get(bev):
            self._conns[bev] = 0.0

    def closing(self, evcon: int) -> None:
        """evhttp is freeing this connection (its close callback runs first): drop our
        reference now rather than at the next sweep, so that its memory is reused while
        it is still near the top of the heap (after a storm of resets, most of it)."""
        bev = self._lib.evhttp_connection_get_bufferevent(evcon)
        if self._conns.pop(bev, None) is not None:
            self._lib.bufferevent_decref(bev)

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
        self._sweeper = self.server.loop.call_later(SWEEP_SECONDS, self._sweep)
        now = time.monotonic()
        offset = self._offset
        assert offset is not None
        for bev, deadline in list(self._conns.items()):
            if not ctypes.c_void_p.from_address(bev + offset).value:
                del self._conns[bev]  # evhttp let it go: ours is the last reference
                self._lib.bufferevent_decref(bev)
            elif deadline and now > deadline:
                self._conns[bev] = 0.0
                self.timed_out += 1
                shutdown_socket(self._lib.bufferevent_getfd(bev))  # evhttp sees EOF and frees it
        if self.paused and len(self._conns) < self.max_connections:
            self.paused = False
            self.server._accepting(True)

    def _pause(self) -> None:
        if not self.paused:
            self.paused = True
            logger.warning("%d connections open: not accepting more for now.", len(self._conns))
            self.server._accepting(False)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def release_all(self) -> None:
        """After evhttp_free: drop our reference on every connection's bufferevent."""
        for bev in self._conns:
            self._lib.bufferevent_decref(bev)
        self._conns.clear()


def shutdown_socket(fd: int) -> None:
    """Shut a socket libevent owns down (libevent then sees EOF and cleans up); the
    descriptor itself stays libevent's to close."""
    if fd < 0:
        return
    dup = socket.socket(fileno=os.dup(fd))
    try:
        dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        dup.close()

"""The PostgreSQL broker's connections for publishes, replays and reads of large events.

A connection per thread, kept for the thread's life, held up to five per view thread,
and ``--workers`` ran PostgreSQL out of connections: now a few connections are lent,
each to one thread for one command.  Publishes take the publishers' lock one at a time
across every process anyway.  The reader thread of large events (and of the listener's
health checks) keeps one of its own: its reads take no lock, and must not wait behind
publishes waiting for it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

SIZE = 4  # connections lent at once (the reader's own not counted)


class ConnectionPool:
    def __init__(self, connect: Callable[[], Any]):
        self._connect = connect
        self._renew()
        # A forked child (a view's, a --workers worker) starts with a pool of its own:
        # the parent's connections are the parent's, and its locks may be held there.
        this = weakref.ref(self)  # (a pool let go must not live on in the hook)

        def renew_in_child() -> None:
            pool = this()
            if pool is not None:
                pool._renew()

        os.register_at_fork(after_in_child=renew_in_child)

    def _renew(self) -> None:
        self._idle: list[Any] = []
        self._idle_lock = threading.Lock()
        self._lendable = threading.BoundedSemaphore(SIZE)
        self._reader = threading.local()
        # Every connection made, so that close() closes them all: one outliving the
        # broker (under `manage.py test`, a bare postgres:// one) kept the test database
        # from being destroyed.
        self._made: weakref.WeakSet[Any] = weakref.WeakSet()

    def read_here(self) -> None:
        """This thread is the reader: it gets a connection of its own."""
        self._reader.reading = True

    @contextlib.contextmanager
    def lent(self) -> Iterator[Any]:
        """An idle connection (a new one if none is), this thread's alone until the
        block ends (the reader's own, on the reader thread); one the block ends with an
        error is closed, not given back (broken, or in an unknown state)."""
        pooled = not getattr(self._reader, "reading", False)
        if pooled:
            self._lendable.acquire()
        try:
            conn = self._take(pooled)
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.close()
                raise
            if pooled and not conn.closed:
                with self._idle_lock:
                    self._idle.append(conn)
        finally:
            if pooled:
                self._lendable.release()

    def _take(self, pooled: bool) -> Any:
        if pooled:
            with self._idle_lock:
                conn = self._idle.pop() if self._idle else None
        else:
            conn = getattr(self._reader, "conn", None)
        if conn is None or conn.closed:
            conn = self._connect()
            self._made.add(conn)
            if not pooled:
                self._reader.conn = conn
        return conn

    def drop_idle(self) -> None:
        """Close the idle connections: the database went away since they were made (a
        restart leaves them all dead, and only their next use would find out)."""
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.close()

    def open_connections(self) -> list[Any]:
        return [conn for conn in list(self._made) if not conn.closed]

    def close(self) -> None:
        for conn in list(self._made):
            with contextlib.suppress(Exception):
                conn.close()

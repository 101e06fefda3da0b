"""A bounded pool of threads that run blocking application code off the loop thread."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

_STOP = object()
STUCK_LOG_EVERY = 60.0  # seconds between two warnings that bodies hold every thread

logger = logging.getLogger("django_comet.server")


class ThreadPool:
    """``submit(fn, *args)`` runs ``fn`` on one of ``size`` threads, in FIFO order.

    Deliberately smaller than concurrent.futures: no Future per call (results go back to
    the loop through ``Loop.call_soon_threadsafe``), so a request costs one queue put.
    """

    def __init__(
        self,
        size: int,
        name: str = "comet-worker",
        before_each: Callable[[], None] | None = None,
        spares: int = 0,
        on_exit: Callable[[], None] | None = None,
    ):
        if size < 1:
            raise ValueError("a thread pool needs at least one thread")
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._before_each = before_each  # called by a thread before it takes a call
        self._on_exit = on_exit  # called by a thread as it leaves the pool
        self._name = name
        self._started = 0
        self._lock = threading.Lock()
        self._spares_left = spares  # see stand_in
        # When a thread last took a call, and when calls began to wait (see stalled).
        self.last_take = self._waiting_since = time.monotonic()
        self._closed = False
        self._start_failed = False  # (logged once)
        self._aside: set[int] = set()  # threads that leave once their call is over
        self._in_bodies: set[int] = set()  # threads streaming a body (see in_body)
        self._idle = 0  # threads waiting for a call
        self._stuck_said = 0.0  # when the pool last logged that bodies hold it all
        self._threads: list[threading.Thread] = []
        for _ in range(size):
            self._start_thread()

    @property
    def size(self) -> int:
        """Threads right now: spares standing in included."""
        return len(self._threads)

    def stand_in(self) -> bool:
        """Worker thread: its call is about to wait long for something other than the
        application (a client that reads slowly), and must wait in this thread.  A spare
        thread takes calls in its place meanwhile, while there are spares left, and this
        thread leaves the pool once its call is over.  True: a spare stands in (asked
        again in the same call, still True); False: the call waits holding its place."""
        me = threading.get_ident()
        if me in self._aside:
            return True
        with self._lock:
            return self._start_spare_for(me)

    def _start_spare_for(self, thread: int) -> bool:  # (under the lock)
        if self._spares_left <= 0 or self._closed:
            return False
        try:
            self._start_thread()
        except RuntimeError as exc:  # "can't start new thread": memory, a pids limit
            if not self._start_failed:
                self._start_failed = True
                logger.warning("Could not start a spare view thread (%s)", exc)
            return False
        self._spares_left -= 1
        self._aside.add(thread)
        return True

    @contextlib.contextmanager
    def in_body(self) -> Iterator[None]:
        """Worker thread: its call goes on iterating a response's body, whose first
        bytes have gone out.  A generator may wait between items as long as it likes (a
        stream of its own, a slow query's rows), so while calls wait with no thread
        free, a spare takes calls in the place of such a thread (``_relieve``), as for a
        call waiting on its client (``stand_in``): a few bodies that wait no longer hold
        every view thread."""
        me = threading.get_ident()
        self._in_bodies.add(me)
        try:
            if self._queue.qsize() and not self._idle:
                self._relieve()
            yield
        finally:
            self._in_bodies.discard(me)

    def _relieve(self) -> None:
        """Calls wait and no thread is free: a spare takes the place of a thread that is
        streaming a body, if there is one not relieved yet and a spare is left."""
        with self._lock:
            if self._idle:
                return
            streaming = self._in_bodies - self._aside
            if not streaming:
                return
            if self._start_spare_for(next(iter(streaming))):
                return
            now = time.monotonic()
            if self._closed or now - self._stuck_said < STUCK_LOG_EVERY:
                return
            self._stuck_said = now
            streaming = set(self._in_bodies)
        logger.warning(
            "Requests wait for a view thread: %d threads are streaming response bodies, "
            "and no spare thread can take their places. A body that waits between items "
            "(a stream of its own) holds a thread for as long as it runs: see --threads, "
            "and EventStreamResponse, which holds none",
            len(streaming),
        )

    def _start_thread(self) -> None:  # (under the lock, or before the pool is shared)
        thread = threading.Thread(
            target=self._work, name=f"{self._name}-{self._started}", daemon=True
        )
        # Signals are not blocked here: a process a view starts would inherit the mask
        # (and ignore SIGTERM).  Where the server handles signals its loop thread is the
        # main one (under the autoreloader a signal ends the process, as it does
        # runserver), and the wake-up descriptor brings it any signal a view thread
        # received.
        thread.start()  # (first: a thread that failed to start is not the pool's)
        self._started += 1
        self._threads.append(thread)

    @property
    def backlog(self) -> int:
        """Calls waiting for a thread."""
        return self._queue.qsize()

    def stalled(self, seconds: float) -> bool:
        """Calls have waited ``seconds`` and no thread took one meanwhile: every thread is
        held (by slow views, or by bodies paused for slow clients)."""
        if not self._queue.qsize():
            return False
        return time.monotonic() - max(self.last_take, self._waiting_since) > seconds

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        if not self._queue.qsize():  # (approximate: a thread may be taking the last one)
            self._waiting_since = time.monotonic()
        self._queue.put((fn, args))
        if self._in_bodies and not self._idle:
            self._relieve()

    def _work(self) -> None:
        get, before_each = self._queue.get, self._before_each
        lock, me = self._lock, threading.get_ident()
        while True:
            with lock:
                self._idle += 1  # (from here on: about to take a call)
            if before_each is not None:
                before_each()
            item = get()
            with lock:
                self._idle -= 1
            self.last_take = time.monotonic()
            if self._in_bodies and self._queue.qsize() and not self._idle:
                # More calls wait, and this thread took the one a free thread was
                # counted for when they came: no submit will look again.
                self._relieve()
            if item is _STOP:
                self._exiting()
                return
            fn, args = item
            try:
                fn(*args)
            except BaseException:  # a thread that died would shrink the pool for good
                logger.exception("Uncaught error in worker thread running %r", fn)
            if me in self._aside:  # a spare took its place
                # (What it leaves, its database connections, is closed before it stops
                # counting among the threads: once it is not counted, it has none.)
                self._exiting()
                with lock:
                    self._aside.discard(me)
                    if not self._closed:
                        self._spares_left += 1
                    self._threads.remove(threading.current_thread())
                return

    def _exiting(self) -> None:
        if self._on_exit is not None:
            try:
                self._on_exit()
            except Exception:
                logger.exception("Error in %r as a view thread left the pool", self._on_exit)

    def shutdown(self, timeout: float | None = None) -> None:
        """Let queued work finish, then stop the threads (waiting up to ``timeout``)."""
        with self._lock:
            self._closed = True  # no spare started from now on
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(_STOP)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:  # one deadline for all, not one each
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

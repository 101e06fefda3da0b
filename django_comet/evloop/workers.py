"""A bounded pool of threads that run blocking application code off the loop thread."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

_STOP = object()

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
    ):
        if size < 1:
            raise ValueError("a thread pool needs at least one thread")
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._before_each = before_each  # called by a thread before it takes a call
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(size)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def size(self) -> int:
        return len(self._threads)

    @property
    def backlog(self) -> int:
        """Calls waiting for a thread."""
        return self._queue.qsize()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._queue.put((fn, args))

    def _work(self) -> None:
        get, before_each = self._queue.get, self._before_each
        while True:
            if before_each is not None:
                before_each()
            item = get()
            if item is _STOP:
                return
            fn, args = item
            try:
                fn(*args)
            except BaseException:  # a thread that died would shrink the pool for good
                logger.exception("Uncaught error in worker thread running %r", fn)

    def shutdown(self, timeout: float | None = None) -> None:
        """Let queued work finish, then stop the threads (waiting up to ``timeout``)."""
        for _ in self._threads:
            self._queue.put(_STOP)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:  # one deadline for all, not one each
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

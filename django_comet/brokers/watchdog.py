"""Cutting a connection whose server stopped answering in the middle of a command.

A server that froze (SIGSTOP, a paused VM) keeps its connections open, and its kernel
acknowledges what it is sent, so neither TCP keepalives nor a write timeout notice: a
client blocked reading the answer waits for as long as the freeze lasts.  One thread
watches every command in progress in the process and shuts down the socket of one that
is past its limit, which ends the wait with an error in the thread that was waiting.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from ..evloop.interrupt import start_without_signals

logger = logging.getLogger("django_comet.brokers")


class Watchdog:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._busy: dict[int, tuple[float, int]] = {}  # thread -> (deadline, socket)
        self._thread: threading.Thread | None = None
        self._pid = 0  # of the process whose thread it is (a fork has none)

    @contextlib.contextmanager
    def watching(self, conn: Any, limit: float) -> Iterator[None]:
        """Around one command on ``conn`` (anything with ``fileno()``) on this thread:
        its socket is shut down if the command is still running ``limit`` s later."""
        key = threading.get_ident()
        with self._changed:
            self._busy[key] = (time.monotonic() + limit, conn.fileno())
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._watch, name="comet-broker-watchdog", daemon=True
                )
                start_without_signals(self._thread)
            elif len(self._busy) == 1:
                self._changed.notify()  # it waits for work without a deadline
        try:
            yield
        finally:
            with self._changed:
                self._busy.pop(key, None)

    def _watch(self) -> None:
        with self._changed:
            while True:
                now = time.monotonic()
                for key, (deadline, fd) in list(self._busy.items()):
                    if deadline <= now:
                        del self._busy[key]
                        logger.warning("A broker did not answer in time; cutting its connection")
                        _shut_down(fd)
                next_deadline = min((d for d, _ in self._busy.values()), default=None)
                self._changed.wait(None if next_deadline is None else next_deadline - now)


def _shut_down(fd: int) -> None:
    """Shut a socket down under the feet of whoever waits on it (on a copy of its
    descriptor: closing this one must not close theirs)."""
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
        sock.shutdown(socket.SHUT_RDWR)


watchdog = Watchdog()  # the process's

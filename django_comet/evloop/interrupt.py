"""Stopping a server whose loop thread is inside a view (``--threads 0``).

There the loop runs the views itself: a view that blocks (a slow query, a sleep) keeps
the loop from the stop a signal asks for, from its grace period's end, and from a second
signal's "stop now".  Python runs signal handlers in the main thread (the loop's),
between two bytecodes of whatever it runs, the view's included: a handler that finds
the view there raises ``StopNow`` into it, and the server stops at once.  Never into the
server's own code, which may be between two libevent calls.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

_SERVER_CODE = os.path.dirname(os.path.abspath(__file__)) + os.sep


class StopNow(BaseException):
    """Raised into a view running in the loop thread: the server stops at once."""


def in_app_code(frame: FrameType | None) -> bool:
    """Whether ``frame``, the main thread's, runs the application's code (or Django's,
    or the standard library's on their behalf) rather than the server's."""
    return frame is not None and not frame.f_code.co_filename.startswith(_SERVER_CODE)


def cut_after(seconds: float, thread_id: int, still_running: Callable[[], bool]) -> None:
    """In ``seconds``, if the loop still runs and is inside a view, signal its thread
    (SIGTERM): a handler running there then raises ``StopNow`` (``seconds`` is the
    grace period, and a bit: within it the loop stops by itself once it runs)."""

    def cut() -> None:
        frame = sys._current_frames().get(thread_id)
        if still_running() and in_app_code(frame):
            signal.pthread_kill(thread_id, signal.SIGTERM)

    timer = threading.Timer(seconds, cut)
    timer.daemon = True
    timer.start()

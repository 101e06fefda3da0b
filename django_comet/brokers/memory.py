"""The default broker: events stay inside this process."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from django.core.signals import request_started

from ..evloop.hub import Event, hub
from .base import Broker

logger = logging.getLogger("django_comet.brokers")

# Whether this process has handled a request (runcomet, runserver, gunicorn, the test
# client): set by the first request_started, after which the receiver goes.
_served = False
_warned = False


def note_serving(**kwargs: Any) -> None:
    """request_started (connected by the app): this process serves clients."""
    global _served
    _served = True
    request_started.disconnect(dispatch_uid=__name__)


def watch_for_requests() -> None:
    request_started.connect(note_serving, dispatch_uid=__name__)


class MemoryBroker(Broker):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Ids start at the clock, so that they keep growing across restarts of the
        # process: a browser's Last-Event-ID from before a restart stays older than every
        # new event instead of hiding the first ones.  In microseconds (as Redis's after
        # a data loss), so that the old process's ids ran ahead of it only if it
        # published over a million events a second on average; below 2**53, exact in
        # JavaScript, for centuries.
        self._last_id = max(hub.last_id, time.time_ns() // 1_000)
        # A cursor below this comes from before this process's events began (a
        # restart), and what followed it is gone.  0 when the hub had events already (a
        # broker replaced within the process): its history tells those gaps itself.
        self._started_at = 0 if hub.last_id else self._last_id

    def since(self, channels: Iterable[str], after: int) -> tuple[list[Event], bool]:
        """As the hub's history, and a gap for a cursor from before this process began
        (a client back after a restart): what the old process published after it is
        gone, even once this one has published newer events."""
        events, gap = hub.since(channels, after)
        return events, gap or 0 < after < self._started_at

    def newest_id(self) -> int:
        """Where this process's ids began, before it published: a cursor above it is
        from another epoch, one below it from before the restart (a gap)."""
        return self._last_id

    def fresh_cursor(self, channels: list[str]) -> int:
        """Never 0 (which asks for the history, never a gap): a client that came before
        any publish hears of what the next restart loses."""
        return self._last_id

    def hub_has_all_after(self) -> int:
        return self._started_at  # (every event since this broker began is in the hub)

    def publish(self, channel: str, data: str, name: str | None = None) -> int:
        # The main thread only: a server's own threads (a ticker started by an app's
        # ready(), under runcomet, runserver or gunicorn) may publish before it serves.
        if (
            not (_served or _warned or hub.serving)
            and threading.current_thread() is threading.main_thread()
            and not under_a_test_runner()
        ):
            _warn_serving_no_one(channel)
        with self._lock:  # ids and their order into the hub agree
            self._last_id += 1
            event = Event(channel, self._last_id, data, name)
            hub.add(event)
        return event.id


def under_a_test_runner() -> bool:
    """Whether Django's test environment is set up (``manage.py test``, pytest-django):
    a test reads what it publishes in its own process, where the warning is no help."""
    from django.test import utils

    return hasattr(getattr(utils, "_TestState", None), "saved_data")


def _warn_serving_no_one(channel: str) -> None:
    global _warned
    _warned = True
    logger.warning(
        "publish(%r) with COMET_BROKER = 'memory://' in a process that has served no "
        "request and runs no comet server (a shell, a management command, a task "
        "worker?): the event stays in this process, and no browser gets it. To publish "
        "from outside the server, use a shared broker (COMET_BROKER = 'postgres://' or "
        "'redis://...').",
        channel,
    )

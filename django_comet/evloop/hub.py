"""Events inside one process: recent history per channel, and the hand-off to the loop.

A broker (memory, PostgreSQL, Redis) gives every event its id and calls ``Hub.add`` in id
order, from any thread.  The hub keeps the last ``size`` events of each channel (for
Last-Event-ID replay and long-poll cursors) and passes each event to its sinks: the
running server's fan-out, scheduled onto the loop thread.  The SSE frame of an event is
encoded once, here, and written as-is to every subscriber.
"""

from __future__ import annotations

import collections
import re
import threading
from collections.abc import Callable, Iterable

_NEWLINES = re.compile(r"\r\n|\r|\n")
_FIELD_JUNK = re.compile(r"[\r\n\0]")


def sse_frame(event_id: int | None, name: str | None, data: str) -> bytes:
    """One Server-Sent Events frame: ``id:``, ``event:``, one ``data:`` line per line."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if name:
        lines.append("event: " + _FIELD_JUNK.sub("", name))
    lines.extend("data: " + line for line in _NEWLINES.split(data))
    return ("\n".join(lines) + "\n\n").encode("utf-8")


class Event:
    """A published event: ``data`` is already text (the Django layer encodes JSON)."""

    __slots__ = ("channel", "data", "frame", "id", "name")

    def __init__(self, channel: str, event_id: int, data: str, name: str | None = None):
        self.channel = channel
        self.id = event_id
        self.data = data
        self.name = name
        self.frame = sse_frame(event_id, name, data)

    def __repr__(self) -> str:
        return f"<Event {self.channel}#{self.id}>"


class Hub:
    def __init__(self, size: int = 100):
        self.size = size
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._history: dict[str, collections.deque[Event]] = {}
        self._lost: dict[str, int] = {}  # channel -> newest id pushed out of its history
        self._sinks: list[Callable[[Event], None]] = []
        self.published = 0
        self.last_id = 0

    def add(self, event: Event) -> None:
        """Any thread, in id order: remember ``event`` and pass it to every sink."""
        with self._lock:
            history = self._history.get(event.channel)
            if history is None:
                history = self._history[event.channel] = collections.deque()
            history.append(event)
            while len(history) > self.size:
                self._lost[event.channel] = history.popleft().id
            self.published += 1
            self.last_id = max(self.last_id, event.id)
            for sink in self._sinks:  # under the lock, so sinks see ids in order
                sink(event)
            self._changed.notify_all()

    def since(self, channels: Iterable[str], after: int) -> tuple[list[Event], bool]:
        """Events of ``channels`` with an id above ``after``, oldest first, and whether
        the history no longer reaches back to ``after`` (some were lost)."""
        with self._lock:
            return self._since(channels, after)

    def _since(self, channels: Iterable[str], after: int) -> tuple[list[Event], bool]:
        events: list[Event] = []
        gap = False
        for channel in channels:
            history = self._history.get(channel)
            if history and history[-1].id > after:
                events.extend(e for e in history if e.id > after)
            gap = gap or after < self._lost.get(channel, 0)
        events.sort(key=lambda e: e.id)
        return events, gap

    def wait(self, channels: list[str], after: int, timeout: float) -> list[Event]:
        """Block (up to ``timeout``) until an event newer than ``after`` exists; for
        servers without an event loop, where a deferral degrades to a blocking wait."""
        with self._changed:
            self._changed.wait_for(lambda: self._since(channels, after)[0], timeout)
            return self._since(channels, after)[0]

    def newest_id(self, channels: Iterable[str]) -> int:
        with self._lock:
            return max((h[-1].id for c in channels if (h := self._history.get(c))), default=0)

    def add_sink(self, sink: Callable[[Event], None]) -> None:
        with self._lock:
            self._sinks.append(sink)

    def remove_sink(self, sink: Callable[[Event], None]) -> None:
        with self._lock:
            if sink in self._sinks:
                self._sinks.remove(sink)


hub = Hub()  # the process's hub: brokers feed it, the running server drains it

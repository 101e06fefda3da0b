"""The default broker: events stay inside this process."""

from __future__ import annotations

import threading
import time

from ..evloop.hub import Event, hub
from .base import Broker


class MemoryBroker(Broker):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Ids start at the clock (milliseconds), so that they keep growing across restarts
        # of the process: a browser's Last-Event-ID from before a restart stays older
        # than every new event instead of hiding the first ones.
        self._last_id = max(hub.last_id, time.time_ns() // 1_000_000)

    def publish(self, channel: str, data: str, name: str | None = None) -> int:
        with self._lock:  # ids and their order into the hub agree
            self._last_id += 1
            event = Event(channel, self._last_id, data, name)
            hub.add(event)
        return event.id

"""The default broker: events stay inside this process."""

from __future__ import annotations

import threading

from ..evloop.hub import Event, hub
from .base import Broker


class MemoryBroker(Broker):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_id = hub.last_id  # ids keep growing if the broker is made anew

    def publish(self, channel: str, data: str, name: str | None = None) -> int:
        with self._lock:  # ids and their order into the hub agree
            self._last_id += 1
            event = Event(channel, self._last_id, data, name)
            hub.add(event)
        return event.id

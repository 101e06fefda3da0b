"""Long-poll timeouts: thousands of one-shot deadlines on one loop timer.

Most long-polls end by an event, not by their timeout, and thousands wait at once.  A
libevent timer each (the C event, a ``Handle``, the callback bound to its waiter) cost
about 0.6 KiB per waiter.  Here deadlines are rounded up to a ``GRAIN`` (a tick); a
waiter is an entry in its tick's set, and one loop timer is armed for the earliest tick.
A waiter that ends early leaves its set at once, and an emptied tick goes with it, so a
long timeout that is never reached leaves nothing behind.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .loop import Handle, Loop

logger = logging.getLogger("django_comet.server")

# Deadlines fall due up to this late, never early: waiters that arrive together share a
# tick, and the timer runs at most once per tick.
GRAIN = 0.01


class Due(dict[Any, None]):
    """The waiters of one tick, in arrival order (an ordered set)."""

    __slots__ = ("tick",)

    def __init__(self, tick: int):
        super().__init__()
        self.tick = tick


class Deadlines:
    """``expire(item)`` for each item added once its delay has passed, unless it was
    discarded first.  Loop thread only."""

    def __init__(self, loop: Loop, expire: Callable[[Any], None]):
        self._loop = loop
        self._expire = expire
        self._due: dict[int, Due] = {}
        self._ticks: list[int] = []  # a heap of ticks, some no longer in _due
        self._timer: Handle | None = None
        self._armed_for = 0  # the tick the timer is armed for

    def add(self, item: Any, delay: float) -> Due:
        """Expire ``item`` in ``delay`` seconds (up to a GRAIN later).  Keep what this
        returns for ``discard``."""
        tick = math.ceil((time.monotonic() + delay) / GRAIN)
        due = self._due.get(tick)
        if due is None:
            due = self._due[tick] = Due(tick)
            heapq.heappush(self._ticks, tick)
            if self._timer is None or tick < self._armed_for:
                self._arm(tick)
        due[item] = None
        return due

    def discard(self, due: Due, item: Any) -> None:
        """``item`` no longer waits: it leaves its tick, and an emptied tick goes."""
        due.pop(item, None)
        if not due and self._due.get(due.tick) is due:
            del self._due[due.tick]
            if not self._due:
                self._disarm()
            elif len(self._ticks) > 2 * len(self._due) + 64:
                # Ticks emptied by early ends pile up in the heap: rebuild it.
                self._ticks = list(self._due)
                heapq.heapify(self._ticks)

    def close(self) -> None:
        self._due.clear()
        self._disarm()

    def _arm(self, tick: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_for = tick
        self._timer = self._loop.call_later(max(0.0, tick * GRAIN - time.monotonic()), self._run)

    def _disarm(self) -> None:
        self._ticks.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _run(self) -> None:
        self._timer = None
        try:
            now = time.monotonic()
            # (self._ticks afresh each time: an expiry may rebuild or clear the heap.)
            while self._ticks and self._ticks[0] * GRAIN <= now:
                due = self._due.pop(heapq.heappop(self._ticks), None)
                if due is None:
                    continue  # emptied by early ends
                # An expiry may end other waiters of this tick: they leave ``due``.
                for item in list(due):
                    if due.pop(item, 0) is None:  # (0: it left meanwhile)
                        try:
                            self._expire(item)
                        except Exception:  # the others of the tick still expire
                            logger.exception("Error ending a wait at its timeout")
        finally:
            self._rearm()

    def _rearm(self) -> None:
        ticks = self._ticks
        while ticks and ticks[0] not in self._due:
            heapq.heappop(ticks)  # emptied by early ends
        if not ticks:
            self._disarm()
        elif self._timer is None or ticks[0] != self._armed_for:
            self._arm(ticks[0])

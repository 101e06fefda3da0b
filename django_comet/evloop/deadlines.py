"""Thousands of one-shot deadlines on one loop timer: long-poll timeouts, and the next
stages of staged responses.

A libevent timer each (the C event, a ``Handle``, the callback bound to its waiter) cost
about 0.6 KiB per long-poll, and three C calls per stage.  Here deadlines are rounded up
to a ``grain`` (a tick); a waiter is an entry in its tick's set, and one loop timer is
armed for the earliest tick.  A waiter that ends early leaves its set at once, and an
emptied tick goes with it, so a long timeout that is never reached leaves nothing behind.
Waiters due in the same tick are run in one go, which, for stages, also means one
hand-over of a batch to the view threads rather than a wake-up each.
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

# Deadlines fall due up to a grain late, never early: waiters that arrive together share a
# tick, and the timer runs at most once per tick.  A long-poll's timeout can be this late.
GRAIN = 0.01


class Due(dict[Any, tuple[Any, ...]]):
    """The waiters of one tick, in arrival order, each with its expiry's arguments."""

    __slots__ = ("tick",)

    def __init__(self, tick: int):
        super().__init__()
        self.tick = tick


class Deadlines:
    """``expire(item, *args)`` for each item added once its delay has passed, unless it
    was discarded first.  Loop thread only."""

    def __init__(self, loop: Loop, expire: Callable[..., None], grain: float = GRAIN):
        self._loop = loop
        self._grain = grain
        self._expire = expire
        self._due: dict[int, Due] = {}
        self._ticks: list[int] = []  # a heap of ticks, some no longer in _due
        self._timer: Handle | None = None
        self._armed_for = 0  # the tick the timer is armed for

    def add(self, item: Any, delay: float, *args: Any) -> Due:
        """Expire ``item`` (with ``args``) in ``delay`` seconds, up to a grain later.  Keep
        what this returns for ``discard``."""
        tick = math.ceil((time.monotonic() + delay) / self._grain)
        due = self._due.get(tick)
        if due is None:
            due = self._due[tick] = Due(tick)
            heapq.heappush(self._ticks, tick)
            if self._timer is None or tick < self._armed_for:
                self._arm(tick)
        due[item] = args
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
        self._timer = self._loop.call_later(
            max(0.0, tick * self._grain - time.monotonic()), self._run
        )

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
            while self._ticks and self._ticks[0] * self._grain <= now:
                due = self._due.pop(heapq.heappop(self._ticks), None)
                if due is None:
                    continue  # emptied by early ends
                # An expiry may end other waiters of this tick: they leave ``due``.
                for item in list(due):
                    args = due.pop(item, None)
                    if args is not None:  # (None: it left meanwhile)
                        try:
                            self._expire(item, *args)
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

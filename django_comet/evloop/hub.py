"""Events inside one process: recent history per channel, and the hand-off to the loop.

A broker (memory, PostgreSQL, Redis) gives every event its id and calls ``Hub.add`` in id
order, from any thread.  The hub keeps the last ``size`` events of each channel (for
Last-Event-ID replay and long-poll cursors) and passes each event to its sinks: the
running server's fan-out, scheduled onto the loop thread.  The SSE frame of an event is
encoded once, as its ``Event`` is made (frames.py), and written as-is to every subscriber.
"""

from __future__ import annotations

import array
import bisect
import collections
import heapq
import itertools
import operator
import threading
from collections.abc import Callable, Iterable

from .frames import sse_frame


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
    def __init__(self, size: int = 100, channels: int = 10_000):
        self.size = size
        # Channels whose history is kept: beyond it the least recently published one is
        # let go, with a lost mark (a replay from before its newest event is told of the
        # gap), so that a channel per user or per object does not grow memory for ever.
        self.channels = channels
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # In the order of their last events (taken from the front: see _let_go).
        self._history: collections.OrderedDict[str, collections.deque[Event]] = (
            collections.OrderedDict()
        )
        # A channel's lost mark: the newest id lost, pushed out of its history, or a
        # broker's gap.  Kept for the channels with a history ...
        self._lost: dict[str, int] = {}
        # ... and, exactly, for as many channels let go (their newest id), the least
        # recently let go first out: a channel per user must not grow memory for ever.
        # (An OrderedDict: taken from the front, a dict walks past its deleted slots.)
        self._let_go: collections.OrderedDict[str, int] = collections.OrderedDict()
        # Marks past that are folded into a fixed table (``_Forgotten``): a bound above
        # each channel's mark, never below, so a gap is never missed; one may be told
        # that did not happen, to a client whose cursor is older than marks folded since.
        # Such a bound is told as a gap, never taken for events a history let go (a
        # stream behind is not cut for it).
        self._forgotten: _Forgotten | None = None
        # channel -> the newest id of a broker's gap (or a bound from the table), for
        # channels with a history or an exact mark: where it is the lost mark, the
        # history's own losses are no news.
        self._gapped: dict[str, int] = {}
        self._lost_everywhere = 0  # newest id of events this process never received
        self._sinks: list[Callable[[Event], None]] = []
        self._gap_sinks: list[Callable[[list[str] | None, int], None]] = []
        self.published = 0
        self.last_id = 0
        # The newest id a broker has told of, delivered or not yet (PostgreSQL reads an
        # event too large for NOTIFY before it delivers it and those after it).
        self.heard_id = 0

    def forget(self) -> None:
        """Let go of every channel's history and marks (a test's new broker starts
        afresh); ids go on growing from the last."""
        with self._lock:
            self._history.clear()
            self._lost.clear()
            self._let_go.clear()
            self._forgotten = None
            self._gapped.clear()
            self._lost_everywhere = 0

    def add(self, event: Event) -> None:
        """Any thread, in id order: remember ``event`` and pass it to every sink."""
        with self._lock:
            history = self._history.get(event.channel)
            if history is None:
                history = collections.deque()
                if len(self._history) >= self.channels:
                    self._let_go_least_recent()
                self._bring_back(event.channel)
                self._history[event.channel] = history
            else:
                self._history.move_to_end(event.channel)
            history.append(event)
            while len(history) > self.size:
                lost = history.popleft().id
                if lost > self._lost.get(event.channel, 0):  # a broker's gap may be newer
                    self._lost[event.channel] = lost
            self.published += 1
            self.last_id = max(self.last_id, event.id)
            for sink in self._sinks:  # under the lock, so sinks see ids in order
                sink(event)
            self._changed.notify_all()

    def add_gap(self, channels: list[str] | None, through: int) -> None:
        """Any thread: events up to id ``through`` on ``channels`` (None: on any channel)
        will never reach this process (a broker's catch-up no longer had them).  Replays
        from before it report the gap, and the gap sinks are told, in order with
        events."""
        with self._lock:
            if channels is None:
                self._lost_everywhere = max(self._lost_everywhere, through)
            else:
                for channel in channels:
                    mark = through
                    if channel in self._history:
                        self._lost[channel] = max(self._lost.get(channel, 0), mark)
                    else:
                        if channel not in self._let_go:
                            mark = max(mark, self._mark(channel))  # a bound, told as a gap
                        self._let_go[channel] = max(self._let_go.get(channel, 0), mark)
                    self._gapped[channel] = max(self._gapped.get(channel, 0), mark)
                self._forget_beyond_bound()
            for sink in self._gap_sinks:
                sink(channels, through)

    def since(
        self, channels: Iterable[str], after: int, known_lost: int = 0
    ) -> tuple[list[Event], bool]:
        """Events of ``channels`` with an id above ``after``, oldest first, and whether
        the history no longer reaches back to ``after`` (some were lost), counting only
        losses newer than ``known_lost`` (a deferral's ``lost_mark``: its replay, from
        the broker, had what was lost before)."""
        with self._lock:
            events, gap, _ = self._since(channels, after, known_lost)
            return events, gap

    def catch_up(
        self, channels: list[str], after: int, known_lost: int, budget: int
    ) -> tuple[list[Event], bool, int, bool]:
        """For a stream behind, which takes what fits a batch at a time, however long
        the history: the oldest events newer than ``after`` whose frames add up to
        ``budget`` bytes (one more, at least one); whether the history let go of one of
        them (the stream can never have it); the newest id of a broker's gap after
        ``after`` and ``known_lost`` (0: none), whose news may still be on its way to the
        gap sinks; and whether the events are all there is."""
        with self._lock:
            events, _, complete = self._since(channels, after, known_lost, budget)
            floor = max(after, known_lost)
            fallen = any(self._let_go_of(c) > floor for c in channels)
            lost = max(self._lost_everywhere, *(self._mark(c) for c in channels), 0)
            return events, fallen, (lost if lost > floor else 0), complete

    def let_go_mark(self, channel: str) -> int:
        """The newest id of ``channel`` that its history let go (not a broker's gap)."""
        with self._lock:
            return self._let_go_of(channel)

    def _let_go_of(self, channel: str) -> int:
        """The newest id of ``channel`` its history let go, unless a broker's gap is
        newer (then 0: the gap, told, covers it)."""
        if channel in self._history:
            lost = self._lost.get(channel, 0)
        else:
            lost = self._let_go.get(channel, 0)  # (0 for a bound from the table: a gap)
        return 0 if self._gapped.get(channel, 0) >= lost else lost

    def _mark(self, channel: str) -> int:
        """``channel``'s lost mark (0: nothing lost)."""
        if channel in self._history:
            return self._lost.get(channel, 0)
        return self._mark_without_history(channel)

    def _mark_without_history(self, channel: str) -> int:
        """The lost mark of a channel with no history: exact, or the table's bound."""
        mark = self._let_go.get(channel)
        if mark is None:
            return self._forgotten.mark(channel) if self._forgotten else 0
        return mark

    def _let_go_least_recent(self) -> None:
        channel, history = self._history.popitem(last=False)
        mark = max(history[-1].id if history else 0, self._lost.pop(channel, 0))
        if mark:
            self._let_go[channel] = mark
            self._forget_beyond_bound()

    def _bring_back(self, channel: str) -> None:
        """A channel gets a history again: its mark, if it had one, moves along."""
        mark = self._let_go.pop(channel, None)
        if mark is None and self._forgotten:
            # A bound, maybe another channel's: told as a gap, never taken for events
            # this channel's history let go (a stream behind is not cut for it).
            mark = self._forgotten.mark(channel)
            if mark:
                self._gapped[channel] = max(self._gapped.get(channel, 0), mark)
        if mark:
            self._lost[channel] = mark

    def _forget_beyond_bound(self) -> None:
        while len(self._let_go) > self.channels:
            channel, mark = self._let_go.popitem(last=False)
            if self._forgotten is None:
                self._forgotten = _Forgotten(self.channels)
            self._forgotten.fold(channel, mark)
            self._gapped.pop(channel, None)

    def _since(
        self, channels: Iterable[str], after: int, known_lost: int = 0, budget: int | None = None
    ) -> tuple[list[Event], bool, bool]:
        """Events newer than ``after``, whether some are lost, and whether these are all
        (else ``budget`` cut them)."""
        runs: list[list[Event]] = []
        complete = True
        gap = after < self._lost_everywhere and self._lost_everywhere > known_lost
        for channel in channels:
            history = self._history.get(channel)
            if history is not None:
                if history and history[-1].id > after:
                    run, whole = _newer(history, after, budget)
                    runs.append(run)
                    complete = complete and whole
                lost = self._lost.get(channel, 0)
            else:
                lost = self._mark_without_history(channel)
            gap = gap or (after < lost and lost > known_lost)
        if len(runs) <= 1:
            return (runs[0] if runs else []), gap, complete
        merged = heapq.merge(*runs, key=_EVENT_ID)
        if budget is None:
            return list(merged), gap, complete
        # Each run is cut at the budget: their merge is, at the same.
        events, whole = _take(merged, budget)
        return events, gap, complete and whole

    def wait(
        self, channels: list[str], after: int, timeout: float | None, known_lost: int = 0
    ) -> tuple[list[Event], bool]:
        """Block (up to ``timeout``) until an event newer than ``after`` exists, for
        servers without an event loop, where a deferral degrades to a blocking wait; the
        events and whether some before them are gone, as ``since`` (with ``known_lost``).
        Events published while it waits are caught as they come, however small the
        history (0 keeps none).
        A gap is told with the events after it, never alone: a caller that cannot move
        its cursor past the lost events would hear of them again and again."""
        wanted = set(channels)
        caught: list[Event] = []

        def catch(event: Event) -> None:  # called under the lock, in id order
            if event.channel in wanted and event.id > after:
                caught.append(event)

        with self._changed:
            events, gap, _ = self._since(channels, after, known_lost)
            if events:
                return events, gap
            # From here on every event is caught: only what was lost before counts.
            self._sinks.append(catch)
            try:
                self._changed.wait_for(lambda: caught, timeout)
            finally:
                self._sinks.remove(catch)
        return caught, gap and bool(caught)

    def since_or_newest(self, channels: list[str], after: int) -> tuple[list[Event], int]:
        """Events of ``channels`` newer than ``after``, and ``after``; or, with none,
        none and the newest id this process has seen or knows lost (a cursor past
        everything it has, and has not, of those channels)."""
        with self._lock:
            events, _, _ = self._since(channels, after)
            if events:
                return events, after
            lost = max(self._lost_everywhere, *(self._mark(c) for c in channels), 0)
            return events, max(after, self.last_id, lost)

    def lost_mark(self, channels: Iterable[str]) -> int:
        """The newest id known lost on ``channels`` (let go by the history, or never
        received): a deferral notes it when made, so that the server tells a client only
        of losses after that (its replay, from the broker, had all before)."""
        with self._lock:
            return max(self._lost_everywhere, *(self._mark(c) for c in channels), 0)

    def newest_id(self, channels: Iterable[str]) -> int:
        """The newest id seen on ``channels``, kept in the history or not: the cursor of
        a client that wants what comes from now on, and has missed nothing before."""
        with self._lock:
            newest = self._lost_everywhere
            for channel in channels:
                history = self._history.get(channel)
                newest = max(newest, history[-1].id if history else 0, self._mark(channel))
            return newest

    @property
    def serving(self) -> bool:
        """Whether a server in this process takes events from here (has a sink)."""
        return bool(self._sinks)

    def add_sink(self, sink: Callable[[Event], None]) -> None:
        with self._lock:
            self._sinks.append(sink)

    def remove_sink(self, sink: Callable[[Event], None]) -> None:
        with self._lock:
            if sink in self._sinks:
                self._sinks.remove(sink)

    def add_gap_sink(self, sink: Callable[[list[str] | None, int], None]) -> None:
        with self._lock:
            self._gap_sinks.append(sink)

    def remove_gap_sink(self, sink: Callable[[list[str] | None, int], None]) -> None:
        with self._lock:
            if sink in self._gap_sinks:
                self._gap_sinks.remove(sink)


_EVENT_ID = operator.attrgetter("id")


class _Forgotten:
    """Lost marks folded into a fixed table: each channel's mark raises two of its slots
    (chosen by hashing the name), and a channel's bound is the lower of its two.  A
    channel's bound is never below its own mark; it is above it when both slots were
    raised by other channels' newer marks, which becomes likely once several times the
    setting's number of channels were let go after it (8-16 slots per channel of the
    setting: a quiet channel's up-to-date client is told a gap that did not happen 1-5%
    of the time after 3 times, 15-30% after 5 times, half or more after 10 times)."""

    def __init__(self, channels: int):
        size = 1 << max(10, (SLOTS_PER_CHANNEL * channels - 1).bit_length())
        self._mask = size - 1
        self._slots = array.array("q", bytes(8 * size))

    def fold(self, channel: str, mark: int) -> None:
        h, mask, slots = hash(channel), self._mask, self._slots
        for i in (h & mask, (h >> 32) & mask):
            if mark > slots[i]:
                slots[i] = mark

    def mark(self, channel: str) -> int:
        h, mask, slots = hash(channel), self._mask, self._slots
        return min(slots[h & mask], slots[(h >> 32) & mask])


SLOTS_PER_CHANNEL = 8


def _newer(
    history: collections.deque[Event], after: int, budget: int | None
) -> tuple[list[Event], bool]:
    """The events of one channel's history (in id order) newer than ``after``, up to
    ``budget`` bytes, and whether that is all of them: found by bisection, not by a walk
    through the whole history (a stream catching up asks again and again)."""
    newer = itertools.islice(history, bisect.bisect_right(history, after, key=_EVENT_ID), None)
    if budget is None:
        return list(newer), True
    return _take(newer, budget)


def oldest_that_fit(events: list[Event], budget: int) -> tuple[list[Event], bool]:
    """The oldest of ``events`` whose frames fit in ``budget`` bytes (the oldest always),
    and whether they are all of them."""
    total = 0
    for i, event in enumerate(events):
        total += len(event.frame)
        if total > budget and i:
            return events[:i], False
    return events, True


def newest_that_fit(events: list[Event], budget: int) -> tuple[list[Event], bool]:
    """The newest of ``events`` whose frames fit in ``budget`` bytes (the newest always),
    and whether they are all of them."""
    total = 0
    for i in range(len(events) - 1, 0, -1):
        total += len(events[i].frame)
        if total + len(events[i - 1].frame) > budget:
            return events[i:], False
    return events, True


def poll_batch(events: list[Event], gap: bool, budget: int) -> list[Event]:
    """A long-poll answer's events: the oldest that fit in ``budget`` (the next poll
    takes the next), or, with a gap, the newest (the client reloads: each next batch
    would tell it of the gap again)."""
    return (newest_that_fit if gap else oldest_that_fit)(events, budget)[0]


def _take(events: Iterable[Event], budget: int) -> tuple[list[Event], bool]:
    """The first ``events`` until their frames add up past ``budget`` bytes, and whether
    that is all of them."""
    taken: list[Event] = []
    size = 0
    for event in events:
        if size > budget:
            return taken, False
        taken.append(event)
        size += len(event.frame)
    return taken, True


hub = Hub()  # the process's hub: brokers feed it, the running server drains it

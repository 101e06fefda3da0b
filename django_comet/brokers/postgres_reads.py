"""Notified events on their way to the hub, in id order, under runcomet: an event too
large for NOTIFY's payload comes as its id and channel, and is read from the table on a
reader thread (the loop thread never waits on a query); the events notified after it
wait their turn (mixed into ``PostgresBroker``)."""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from ..evloop.hub import Event, hub
from .pool import ConnectionPool
from .postgres_sql import SELECT_EVENTS

logger = logging.getLogger("django_comet.brokers")

READ_TIMEOUT = 10.0  # seconds for reading large events under runcomet; then reconnect
# Large events notified while the reader thread was busy are read together, this many
# at most, in queries of about READ_BATCH_BYTES each, so that each stays well within
# READ_TIMEOUT on a slow link and holds the GIL briefly (one each: about 1,000 a second
# here, a catch-up's pace).
READ_BATCH = 100
READ_BATCH_BYTES = 1024 * 1024

# Past this without a read of large events answering (statement_timeout is the server's,
# and a read is tried twice), the reader is given up on; then reconnect.
STUCK_AFTER = 2 * READ_TIMEOUT + 5


class LargeEventReads:
    """Loop thread, but for the methods that say they run on the reader thread."""

    psycopg: Any
    _loop: Any
    _pool: ConnectionPool
    _in_order: deque[_Notified]
    _reads: ReadQueue
    _reads_watchdog: Any
    _generation: int
    _deliver_lock: threading.Lock
    _deliver: Callable[[Event], None]
    _start_reader: Callable[[], None]
    _reconnect: Callable[[str], None]
    described: Callable[[Exception], str]

    def _notified(self, payload: str) -> None:
        """Loop thread: deliver a notified event, in id order.  One too large for NOTIFY
        is read on the reader thread; the events after it wait until it has been."""
        notice = _notice(payload)
        hub.heard_id = max(hub.heard_id, notice.id if isinstance(notice, Event) else notice[0])
        if isinstance(notice, Event):
            if not self._in_order:
                self._deliver(notice)
                return
            self._in_order.append(_Notified(notice.id, notice.channel, read=True, event=notice))
            return
        event_id, channel = notice
        if event_id <= hub.last_id:
            return  # delivered by the catch-up it was notified during: not read again
        slot = _Notified(event_id, channel, generation=self._generation)
        self._in_order.append(slot)
        self._reads.put(slot)
        if self._reads_watchdog is None:
            self._reads_watchdog = self._loop.call_later(STUCK_AFTER, self._stuck, background=True)

    def _stuck(self) -> None:
        self._reads_watchdog = None
        if self._in_order and not self._in_order[0].read:
            stuck = self._reads
            self._start_reader()
            stuck.put(None)  # that thread ends once its read returns, if ever
            self._reconnect(
                f"Reading event {self._in_order[0].event_id} took over {STUCK_AFTER:.0f} s"
            )

    def _work_through(self, work: ReadQueue) -> None:
        """Reader thread: the loop thread's work, in order: large events to read (those
        waiting together in one query, up to READ_BATCH) and health checks."""
        self._pool.read_here()  # on a connection of its own
        later: deque[_Notified | Callable[[], None] | None] = deque()
        while (job := later.popleft() if later else work.get()) is not None:
            if not isinstance(job, _Notified):
                job()
                continue
            batch = [job]
            while len(batch) < READ_BATCH:
                try:
                    job = work.get_nowait()
                except queue.Empty:
                    break
                if not isinstance(job, _Notified):
                    later.append(job)  # (None too: this thread ends after the batch)
                    break
                batch.append(job)
            self._read_for_loop(batch)

    def _read_for_loop(self, batch: list[_Notified]) -> None:
        """Reader thread: read large events and hand them back to the loop thread, as
        each query has read some."""
        while batch:
            try:
                events, through = self._read_some([slot.event_id for slot in batch], READ_TIMEOUT)
            except Exception as exc:
                self._loop.call_soon_threadsafe(self._were_read, batch, {}, exc)
                return
            done = [slot for slot in batch if slot.event_id <= through]
            batch = batch[len(done) :]
            self._loop.call_soon_threadsafe(self._were_read, done, events, None)

    def _were_read(
        self, batch: list[_Notified], events: dict[int, Event], error: Exception | None
    ) -> None:
        answered = False
        for slot in batch:
            if slot.generation != self._generation:
                continue  # read for a connection since lost, whose catch-up covered it
            if error is not None:
                # Never skipped: the events after it wait, and a new connection's
                # catch-up reads them all again, these first.
                said = self.described(error)
                return self._reconnect(f"Could not read event {slot.event_id} ({said})")
            slot.read, slot.event = True, events.get(slot.event_id)
            answered = True
        waiting = self._in_order
        while waiting and waiting[0].read:
            self._deliver_or_gap(waiting.popleft())
        if answered and self._reads_watchdog is not None:  # from this answer on
            self._reads_watchdog.cancel()
            self._reads_watchdog = (
                self._loop.call_later(STUCK_AFTER, self._stuck, background=True)
                if waiting
                else None
            )

    def _deliver_or_gap(self, notified: _Notified) -> None:
        if notified.event is not None:
            self._deliver(notified.event)
        else:  # pruned before it could be read: a gap its streams must hear of
            channels = None if notified.channel is None else [notified.channel]
            with self._deliver_lock:  # unless a catch-up delivered it already
                if notified.event_id > hub.last_id:
                    hub.add_gap(channels, notified.event_id)

    def _read(self, event_id: int) -> Event | None:
        """An event too large for NOTIFY (None if it was pruned first)."""
        return self._read_some([event_id])[0].get(event_id)

    def _read_some(
        self, ids: list[int], timeout: float | None = None
    ) -> tuple[dict[int, Event], int]:
        """Events too large for NOTIFY, by id (in id order), as many as one query of
        READ_BATCH_BYTES takes, read on the reader thread's own connection (the
        listening one is busy listening), within ``timeout`` seconds if given; and the
        id up to which ``ids`` are read (those missing up to it were pruned first)."""
        try:
            rows = self._select_events(ids, timeout)
        except self.psycopg.errors.QueryCanceled:
            raise  # too slow, not gone: a retry would wait as long
        except self.psycopg.OperationalError:
            self._pool.drop_idle()  # the database restarted: one fresh try
            rows = self._select_events(ids, timeout)
        events = {int(i): Event(channel, int(i), data, name) for i, channel, name, data in rows}
        through = int(rows[-1][0]) if rows else ids[-1]
        gone = [str(i) for i in ids if i <= through and i not in events]  # newer ones came
        if len(gone) == 1:
            logger.warning(
                "event %s was pruned before it could be read; its streams get the gap event",
                gone[0],
            )
        elif gone:
            logger.warning(
                "events %s were pruned before they could be read; their streams get the gap event",
                ", ".join(gone),
            )
        return events, through

    def _select_events(self, ids: list[int], timeout: float | None) -> list[Any]:
        with self._pool.lent() as conn, conn.transaction():
            if timeout is not None:
                conn.execute(f"SET LOCAL statement_timeout = {int(timeout * 1000)}")
            cursor = conn.execute(SELECT_EVENTS, {"ids": ids, "budget": READ_BATCH_BYTES})
            # Row by row, not fetchall(): that converts every row holding the GIL (the
            # loop thread waited up to half a second for a batch of large events).
            return [row for row in cursor]


class _Notified:
    """A notified event on its way to the hub, in id order: one too large for NOTIFY is
    not ``read`` until the reader thread has (``event`` stays None if it was pruned
    first)."""

    __slots__ = ("channel", "event", "event_id", "generation", "read")

    def __init__(
        self,
        event_id: int,
        channel: str | None,
        read: bool = False,
        event: Event | None = None,
        generation: int = 0,
    ):
        self.event_id = event_id
        self.channel = channel
        self.read = read
        self.event = event
        self.generation = generation  # of the LISTEN connection it was notified on


# The reader thread's work: large events to read, health checks to send; None ends it.
ReadQueue = queue.SimpleQueue[_Notified | Callable[[], None] | None]


def _notice(payload: str) -> Event | tuple[int, str | None]:
    """What a NOTIFY payload says: the event, carried whole, or the id and channel of one
    too large to carry (a bare id, from an older django-comet, names no channel)."""
    if not payload.startswith("["):
        return int(payload), None
    fields = json.loads(payload)
    if len(fields) == 2:
        return int(fields[0]), fields[1]
    event_id, channel, name, data = fields
    return Event(channel, event_id, data, name)

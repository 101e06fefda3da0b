from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..evloop.hub import Event, hub
from ..evloop.interrupt import start_without_signals

logger = logging.getLogger("django_comet.brokers")


class Broker:
    """Publishes events with ids that grow, keeps a history every process can read, and
    feeds every event, from any process sharing the broker, into this process's hub in id
    order."""

    def publish(self, channel: str, data: str, name: str | None = None) -> int:
        """Publish ``data`` (text) on ``channel``; return the event's id."""
        raise NotImplementedError

    def since(self, channels: Iterable[str], after: int) -> tuple[list[Event], bool]:
        """The shared history: events of ``channels`` newer than ``after``, oldest first,
        and whether some of them are gone."""
        return hub.since(channels, after)

    def newest_id(self) -> int:
        """The newest id handed out by any process sharing the broker (0: none yet)."""
        return hub.last_id

    def fresh_cursor(self, channels: list[str]) -> int:
        """The cursor of a client that wants only what is published from now on: the
        newest id this process has seen, on any channel (one counter for all of them)."""
        return max(hub.last_id, hub.newest_id(channels))

    def hub_has_all_after(self) -> int | None:
        """An id after which every event of the broker reaches this process's hub, or
        None if none is known yet: a client told of a gap with no event after it may
        move its cursor there (past what is gone), or it would be told it again."""
        return None

    def early_client(self) -> contextlib.AbstractContextManager[int | None]:
        """Around the broker reads that give a client its cursor (see ListeningBroker)."""
        return contextlib.nullcontext()

    # What the broker's client raises when the broker cannot be reached.
    unreachable: tuple[type[Exception], ...] = ()

    def refused(self, exc: Exception) -> bool:
        """Whether ``exc``, from connecting, is the broker refusing this configuration
        (a wrong password, a database that does not exist): retrying will not mend it,
        and the log says so as an error, not as an outage."""
        return False

    def retry_message(self, exc: Exception, what: str, lost: str = "lost") -> tuple[int, str]:
        """The log level and text for a listener's failed connection, retried."""
        if self.refused(exc):
            return logging.ERROR, f"{what} refused: {self.described(exc)}; check COMET_BROKER"
        return logging.WARNING, f"{what} {lost} ({self.described(exc)})"

    def described(self, exc: Exception) -> str:
        """``exc`` in one line, for the log."""
        return " ".join(str(exc).split()) or repr(exc)

    def local_since(self, channels: Iterable[str], after: int) -> tuple[list[Event], bool]:
        """As ``since``, from this process's own history, for when the broker cannot be
        asked."""
        return hub.since(channels, after)

    def cut_off(self) -> bool:
        """Whether this process knows the broker to be out of reach right now (its
        listener lost it, or a replay's read failed lately): replays then read this
        process's own history at once, rather than each wait for the broker's timeouts
        (a frozen one: seconds per request, on a view thread)."""
        return False

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Around a replay's reads from the broker: whether they failed (``cut_off``)."""
        yield

    def start_listening(self, loop: Any = None) -> None:
        """Begin receiving other processes' events into the hub (idempotent).  A running
        server passes its event loop, which a broker may use to watch its socket."""

    def close(self) -> None:
        """Release connections and threads."""


# Seconds replays read this process's own history after one of them could not read the
# broker's while its listener looked connected, before one asks the broker again.
DOUBTED_FOR = 10.0


def catch_up_bound(history_size: int) -> int:
    """The events a process catches up on after it lost its broker connection, at the
    most: ten channels' history, and never 0 (Redis keeps a log this long, PostgreSQL's
    catch-up reads as many)."""
    return max(history_size * 10, 100)


class ListeningBroker(Broker):
    """A broker whose events arrive on a connection that one thread waits on (or, where
    the broker can, the loop watches: PostgreSQL's under runcomet).

    The thread blocks on the broker's socket (no busy polling) and hands each event to
    the hub, whose sink wakes the event loop through its thread-safe wake-up; only the
    loop thread touches libevent.  After a lost connection it reconnects with backoff
    and first catches up on what it missed, so delivery resumes without a gap.
    """

    backoff_max = 5.0

    def __init__(self) -> None:
        self._listener: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._listening = False
        # Held from the check of an event's id to its hand-off to the hub, so that two
        # deliveries (a catch-up and a live notification) cannot both pass the check.
        self._deliver_lock = threading.Lock()
        self._closed = threading.Event()
        self.connected = threading.Event()
        self._listening_from: int | None = None  # the newest id when it first listened
        # Until this process listens, its hub cannot tell a client what comes next: the
        # broker gives cursors then, and the first connection catches up from the
        # newest id the earliest of those clients saw (``_early_floor``), so that what
        # was published between a client's arrival and the listen reaches it.
        self._early = threading.Condition()
        self._early_clients = 0  # getting their cursors from the broker right now
        self._early_floor: int | None = None
        self._caught_up = False  # the hub has everything from the early floor on
        self._doubt = threading.Lock()  # (replaying: after a replay's read failed)
        self._doubted_until = 0.0
        self._asking_again = False

    def local_since(self, channels: Iterable[str], after: int) -> tuple[list[Event], bool]:
        """This process's hub has every event since it began listening (a reconnect
        catches up; nothing is published while the broker is down); a cursor from before
        that, or from before it ever listened, is a gap."""
        events, gap = hub.since(channels, after)
        floor = self._listening_from
        return events, gap or floor is None or after < floor

    def cut_off(self) -> bool:
        # (Once caught up: until its first listen a process has no history of its own.
        # What is published before its listener is back reaches the hub by its catch-up.)
        if not self._caught_up:
            return False
        if not self.connected.is_set():
            return True
        with self._doubt:
            if not self._doubted_until:
                return False
            if self._asking_again or time.monotonic() < self._doubted_until:
                return True
            self._asking_again = True  # this caller's replay asks the broker again
            return False

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """A replay's read that fails while the listener still looks connected (a broker
        frozen rather than gone: the listener finds out only once its own wait for a
        word from it is over, up to 40 s) has the replays of the next ``DOUBTED_FOR``
        read this process's history at once: each would have held a view thread for
        the broker's timeout, and a few pollers held every one.  Then one replay asks
        the broker again (the others still read the history meanwhile)."""
        try:
            yield
        except self.unreachable:
            with self._doubt:
                self._doubted_until = time.monotonic() + DOUBTED_FOR
                self._asking_again = False
            raise
        except BaseException:
            with self._doubt:
                self._asking_again = False
            raise
        else:
            with self._doubt:
                self._doubted_until = 0.0
                self._asking_again = False

    def hub_has_all_after(self) -> int | None:
        return self._listening_from if self._caught_up else None

    def _newest_known(self) -> int:
        """The newest id this process received or handed out as a cursor (every id up
        to where it began listening may be one): ids the broker hands out again below
        it would be taken for old ones (see the listeners' checks for ids gone back)."""
        return max(hub.last_id, self._listening_from or 0)

    def fresh_cursor(self, channels: list[str]) -> int:
        if self._caught_up:
            # Every id above where it began listening reaches this hub: that is a cursor
            # too (a process that has seen no event of these channels, or none at all,
            # answered 0, and the client's next poll took the whole history for new).
            return max(hub.last_id, hub.newest_id(channels), self._listening_from or 0)
        try:
            with self.early_client() as newest:
                return self.newest_id() if newest is None else newest
        except self.unreachable:  # nothing can be published meanwhile, most likely
            return hub.newest_id(channels)

    @contextlib.contextmanager
    def early_client(self) -> Iterator[int | None]:
        """Around the reads that give a client its cursor, before this process listens:
        the first connection waits for them to end, and catches up from the newest id
        read as they began (given to the block; None once it listens: what comes next
        is notified then)."""
        with self._early:
            early = self._listening_from is None
            if early:
                self._early_clients += 1
        if not early:
            yield None
            return
        try:
            newest = self.newest_id()
            with self._early:
                if self._early_floor is None or newest < self._early_floor:
                    self._early_floor = newest
            yield newest
        finally:
            with self._early:
                self._early_clients -= 1
                self._early.notify_all()

    def _catch_up_from(self, newest: int) -> int | None:
        """Listener, subscribed, given the broker's newest id: the id to catch up from,
        or None for nothing (a first connection that no client came before).  Call
        ``_caught_up_now`` once the catch-up is delivered."""
        with self._early:
            if self._listening_from is None:
                self._listening_from = newest
                # Cursors being read now came before the listen; a broker read that
                # hangs for this long is given up on (its client may miss that window).
                self._early.wait_for(lambda: self._early_clients == 0, timeout=30)
                if self._early_floor is None:
                    self._caught_up = True
                    return None
            start = self._listening_from if self._caught_up else self._early_floor
        assert start is not None
        return max(hub.last_id, start)

    def _caught_up_now(self) -> None:
        self._caught_up = True

    def start_listening(self, loop: Any = None) -> None:
        """Start once, whichever way: a later call, with or without a loop, does nothing
        (a second listener would feed every event into the hub twice)."""
        with self._start_lock:
            if self._listening:
                return
            self._listening = True
            self._start(loop)

    def _start(self, loop: Any) -> None:
        """Called once, under the start lock: a thread waits on the connection."""
        self._listener = threading.Thread(
            target=self._listen_forever, name=f"comet-{type(self).__name__}", daemon=True
        )
        start_without_signals(self._listener)

    def close(self) -> None:
        self._closed.set()

    def _listen_forever(self) -> None:
        backoff = 0.1
        while not self._closed.is_set():
            try:
                self._listen(self._deliver)
            except Exception as exc:  # the broker went away: retry
                was_up = self.connected.is_set()
                if was_up:
                    backoff = 0.1  # it was up: a new outage starts from the short wait
                self.connected.clear()
                if self._closed.is_set():
                    return
                level, said = (  # ("unreachable": no connection made, this time)
                    self.retry_message(exc, f"{type(self).__name__} connection")
                    if was_up
                    else self.retry_message(exc, type(self).__name__, lost="unreachable")
                )
                logger.log(level, "%s; retrying in %.1fs", said, backoff)
                self._closed.wait(backoff)
                backoff = min(backoff * 2, self.backoff_max)
            else:
                backoff = 0.1

    def _listen(self, deliver: Callable[[Event], None]) -> None:
        """Connect, subscribe, call ``deliver`` for missed then live events; return only
        when closed, raise when the connection breaks."""
        raise NotImplementedError

    def _deliver(self, event: Event) -> None:
        with self._deliver_lock:  # the check and the add as one step
            if event.id > hub.last_id:  # catch-up and live notifications may overlap
                hub.add(event)

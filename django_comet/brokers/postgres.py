"""PostgreSQL broker: ids from a sequence, history in a table, LISTEN/NOTIFY.

``COMET_BROKER = "postgres://user:pass@host:port/db"``, or ``"postgres://"`` alone for
Django's default database settings.  Needs ``django-comet[postgres]`` (psycopg 3).

Publishing is one short transaction: an advisory lock (so that ids commit, and so are
notified, in id order), an INSERT that takes the id, and a NOTIFY that carries the event;
an event too large for NOTIFY's 8000-byte payload is notified by id and channel and read
from the table (under runcomet, on a helper thread: the loop thread never waits on a
query, and the events notified after it wait their turn).  One pruned before it could be
read is a gap on its channel, told to its streams like any other.

History: ``since`` answers at most the history size of events per channel (their union,
oldest first) and reports a gap whenever an event of those channels newer than the
client's id is not in the answer: cut there, or pruned (``comet_channel.lost_id``).  Every
``PRUNE_EVERY``-th id (ids come from the shared sequence, so this holds across processes,
``comet_publish`` included), the publish prunes each channel that had an event among the
last ``PRUNE_EVERY`` ids down to the history size: a channel keeps about ``history_size +
PRUNE_EVERY`` rows at most.  A history size of 0 keeps no history, as the in-process hub
does: ``since`` answers nothing, with a gap when something newer than the client's id was
published (the newest row of a channel stays, to read large events and to tell that).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from ..evloop.hub import Event, hub
from ..evloop.interrupt import start_without_signals
from .base import ListeningBroker, catch_up_bound
from .pool import ConnectionPool
from .postgres_reads import LargeEventReads, ReadQueue, _notice, _Notified
from .postgres_sql import (
    LOCK_KEY,
    MOVE_IDS_PAST,
    MOVE_ROW_PAST_IDS,
    NEWEST_ID,
    NOTIFY_CHANNEL,
    PRUNE,
    SCHEMA,
    SINCE,
    STALLED_PUBLISHER,
    TABLES_MADE,
    installation_names,
)
from .watchdog import watchdog as command_watchdog

T = TypeVar("T")

logger = logging.getLogger("django_comet.brokers")

# What a connection refused by the server's configuration says (rather than a server down,
# starting or full): retried all the same, but logged as errors.
REFUSALS = (
    "does not exist",  # the database or the role
    "authentication failed",
    "pg_hba.conf",
    "permission denied",
    "not permitted to log in",
)
MAX_PAYLOAD = 7900  # NOTIFY refuses payloads of 8000 bytes and more
PRUNE_EVERY = 50
# TCP keepalives for every broker connection unless the URL sets its own: a connection a
# network dropped without a word (a NAT, a load balancer) fails in about 25 s, not hours.
# Keepalives probe idle connections only: a query sent into such a network is given up
# after tcp_user_timeout (ms) unacknowledged, not after TCP's retries (about 15 minutes).
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 20_000,
}
# A command (a publish, a replay's read) that has had no answer for this long is cut, and
# tried once more on a new connection: a server that froze (SIGSTOP, a paused VM) keeps
# its connections open and its kernel acknowledges what it is sent, so neither the
# keepalives nor tcp_user_timeout tell, and the view thread would wait for ever.
REPLY_WITHIN = 20.0
# A LISTEN connection that has heard nothing for this long checks that its server still
# answers, and takes one that leaves it unanswered for LISTEN_REPLY_WITHIN for gone (a
# reconnect that catches up): a server frozen (SIGSTOP, a paused VM) keeps its
# connections open and its kernel acknowledges them, so the keepalives never tell.  Under
# runcomet the check is a NOTIFY, sent on another connection, that must come back on the
# LISTEN one (the loop thread never waits on a query); without a loop, a query on it.
LISTEN_PING_AFTER = 30.0
LISTEN_REPLY_WITHIN = 10.0


@contextlib.contextmanager
def _locked(conn: Any, key: int) -> Iterator[None]:
    """A transaction holding the publishers' advisory lock (ids commit, and so are
    notified, in id order), ended by PostgreSQL if its client stalls inside it."""
    with conn.transaction():
        conn.execute(STALLED_PUBLISHER)
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
        yield


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        # (Installed but broken, as without libpq: its own reason says what to fix.)
        why = "" if exc.name == "psycopg" else f" (psycopg failed to load: {exc})"
        raise ImportError(
            f"COMET_BROKER postgres:// needs psycopg 3: pip install 'psycopg[binary]>=3.2'"
            f" (django-comet's [postgres] extra){why}"
        ) from exc
    return psycopg


class PostgresBroker(LargeEventReads, ListeningBroker):
    def __init__(self, conninfo: str, history_size: int = 100):
        super().__init__()
        self.psycopg = _psycopg()
        self.conninfo = conninfo
        self.history_size = history_size
        self._pool = ConnectionPool(self._connect)
        self._loop: Any = None
        self._watcher: Any = None  # the loop's watcher of the LISTEN connection
        self._listen_conn: Any = None  # the LISTEN connection the loop watches
        # Loop thread: notified events in id order, only while a large one is being read
        # on the reader thread.
        self._in_order: deque[_Notified] = deque()
        # Of the LISTEN connection: a read for one since lost is dropped (its catch-up
        # read the event again).
        self._generation = 0
        self._reads: ReadQueue = queue.SimpleQueue()  # the reader thread's work
        # Loop thread: armed while large events wait to be read, from the last read that
        # answered (a read whose answer never comes, on a network that dropped the
        # connection without a word, must not hold every later event back).
        self._reads_watchdog: Any = None
        # Loop thread: the LISTEN connection's health check (see LISTEN_PING_AFTER): when
        # it last heard from its server, its timer (the next check, or the deadline of
        # the ping in flight), and that ping's channel (one per connection) and payload.
        self._heard = 0.0
        self._health: Any = None
        self._ping_channel = ""
        self._pings = 0
        self.unreachable = (self.psycopg.OperationalError,)
        # The tables are made by the first connection, not here: a database that is
        # down when the server starts must not stop it (the listener retries).
        self._schema_made = False
        # Those of the schema the tables are in (installation_names), known from the
        # first connection on.
        self._notify_channel, self._lock_key = NOTIFY_CHANNEL, LOCK_KEY

    def _connect(self, application_name: str | None = None) -> Any:
        given = self.psycopg.conninfo.conninfo_to_dict(self.conninfo)
        options: dict[str, Any] = {k: v for k, v in KEEPALIVES.items() if k not in given}
        if self.psycopg.pq.version() < 120000:  # a libpq before 12 refuses the option
            options.pop("tcp_user_timeout", None)
        if application_name is not None and "application_name" not in given:
            options["application_name"] = application_name
        conn = self.psycopg.connect(self.conninfo, autocommit=True, connect_timeout=5, **options)
        if not self._schema_made:
            schema = conn.execute("SELECT current_schema()").fetchone()[0]
            self._notify_channel, self._lock_key = installation_names(schema)
            # CREATE ... IF NOT EXISTS is not safe against itself: workers starting
            # together on a new database would fail on each other's table.
            with _locked(conn, self._lock_key):
                if not conn.execute(TABLES_MADE).fetchone()[0]:
                    conn.execute(SCHEMA)
                # Tables made again (a database recreated or restored without them)
                # start their ids at 1: those seen here would be taken for old ones.
                if known := self._newest_known():
                    conn.execute(MOVE_IDS_PAST, {"seen": known})
            self._schema_made = True
        return conn

    def refused(self, exc: Exception) -> bool:
        if isinstance(exc, self.psycopg.errors.InsufficientPrivilege):
            return True  # (the role may not make the tables, or not use them)
        # libpq says why in its message only (no SQLSTATE for a failed connection).
        return isinstance(exc, self.psycopg.OperationalError) and any(
            reason in str(exc) for reason in REFUSALS
        )

    def described(self, exc: Exception) -> str:
        # The server's own message: without the statement it quotes, over three lines.
        primary = getattr(getattr(exc, "diag", None), "message_primary", None)
        return primary or super().described(exc)

    def _tables_gone(self) -> None:
        """The tables went away under a running process (a database recreated, or
        restored without them): the next connection makes them again."""
        logger.error("PostgreSQL has no comet_event table any more; making the tables again")
        self._schema_made = False
        self._pool.drop_idle()

    def _on_conn(self, work: Callable[[Any], T]) -> T:
        """``work(connection)`` on a connection of the pool, tried once more on a fresh
        one when the database went away since, or stopped answering."""
        try:
            return self._watched(work)
        except self.psycopg.OperationalError:
            self._pool.drop_idle()
            return self._watched(work)
        except self.psycopg.errors.UndefinedTable:
            self._tables_gone()
            return self._watched(work)

    def _watched(self, work: Callable[[Any], T]) -> T:
        with self._pool.lent() as conn, command_watchdog.watching(conn, REPLY_WITHIN):
            return work(conn)

    def publish(self, channel: str, data: str, name: str | None = None) -> int:
        return self._on_conn(lambda conn: self._publish(conn, channel, data, name))

    def _publish(self, conn: Any, channel: str, data: str, name: str | None) -> int:
        with _locked(conn, self._lock_key):
            row = conn.execute(
                "INSERT INTO comet_event (channel, name, data) VALUES (%s, %s, %s) RETURNING id",
                (channel, name, data),
            ).fetchone()
            event_id = int(row[0])
            known = self._newest_known()
            if event_id <= known:
                # The ids went back (a crash that lost commits, a failover to a standby
                # that lagged) and this publish came before the listener's reconnection
                # could tell (_catch_up): past what this process has seen, or every
                # process that saw the first would take it for an old one, and drop it.
                self._move_ids_past(conn, event_id - 1, known)
                row = conn.execute(MOVE_ROW_PAST_IDS, {"id": event_id}).fetchone()
                event_id = int(row[0])
            payload = json.dumps([event_id, channel, name, data], separators=(",", ":"))
            if len(payload.encode("utf-8")) > MAX_PAYLOAD:
                # Listeners read it from the table; the channel tells them whom it
                # concerns if it was pruned before they could.
                payload = json.dumps([event_id, channel])
            conn.execute("SELECT pg_notify(%s, %s)", (self._notify_channel, payload))
            if event_id % PRUNE_EVERY == 0:
                # The newest row of a channel stays even with no history (size 0): a
                # large event is read from it, and since() tells a gap by it.
                keep = max(self.history_size, 1)
                conn.execute(PRUNE, {"since": event_id - PRUNE_EVERY, "keep": keep})
        return event_id

    def since(self, channels: Iterable[str], after: int) -> tuple[list[Event], bool]:
        channels = list(dict.fromkeys(channels))
        if not channels:
            return [], False
        size = max(self.history_size, 0)
        query = {"channels": channels, "after": after, "limit": size + 1}
        rows = self._on_conn(lambda conn: conn.execute(SINCE, query).fetchall())
        per_channel: dict[str, list[Event]] = {}
        gap = False
        for event_id, channel, name, data, lost_id in rows:
            gap = gap or after < lost_id  # pruned events newer than the client's id
            if event_id is not None:
                per_channel.setdefault(channel, []).append(Event(channel, event_id, data, name))
        events: list[Event] = []
        for newest_first in per_channel.values():
            newest_first.sort(key=lambda e: e.id, reverse=True)
            if len(newest_first) > size:  # more than the history holds: cut, a gap
                gap = True
                del newest_first[size:]
            events.extend(newest_first)
        events.sort(key=lambda e: e.id)
        return events, gap

    def newest_id(self) -> int:
        row = self._on_conn(lambda conn: conn.execute(NEWEST_ID).fetchone())
        return int(row[0])  # pruning always keeps each channel's newest row

    # -- with an event loop (runcomet): the loop watches the LISTEN connection's socket --

    def _start(self, loop: Any) -> None:
        if loop is None:
            super()._start(loop)  # no loop here: a thread waits instead
        else:
            self._loop = loop
            self._start_reader()
            self._connect_for_loop()

    def _start_reader(self) -> None:
        """A reader thread for large events (and the health check's pings), with a queue
        of its own.  A daemon: a read stuck on the network must not keep the process
        alive (nor the next reader)."""
        self._reads = queue.SimpleQueue()
        start_without_signals(
            threading.Thread(
                target=self._work_through,
                args=(self._reads,),
                name="comet-postgres-read",
                daemon=True,
            )
        )

    def close(self) -> None:
        super().close()
        self._reads.put(None)
        self._pool.close()

    def _connect_for_loop(self) -> None:
        """Connect (blocking, with backoff) on a helper thread, catch up, then hand the
        connection to the loop thread, which watches its socket from then on."""

        def connect() -> None:
            backoff = 0.1
            while not self._closed.is_set():
                try:
                    conn = self._listening_connection(self._deliver)
                except Exception as exc:  # down, or not yet writable (a standby): retry
                    level, said = self.retry_message(exc, "PostgreSQL", lost="unreachable")
                    logger.log(level, "%s; retrying in %.1fs", said, backoff)
                    self._closed.wait(backoff)
                    backoff = min(backoff * 2, self.backoff_max)
                else:
                    self._loop.call_soon_threadsafe(self._watch, conn)
                    return

        start_without_signals(
            threading.Thread(target=connect, name="comet-postgres-connect", daemon=True)
        )

    def _watch(self, conn: Any) -> None:
        """Loop thread: read notifications whenever the socket is readable."""
        self.connected.set()
        self._listen_conn = conn
        self._watcher = self._loop.add_reader(
            conn.fileno(), lambda: self._readable(conn), background=True
        )
        self._health = self._loop.call_later(LISTEN_PING_AFTER, self._check_health, background=True)
        self._readable(conn)  # some may have arrived during the catch-up

    def _readable(self, conn: Any) -> None:
        self._heard = time.monotonic()
        try:
            for notify in conn.notifies(timeout=0):  # what has arrived; never waits
                if notify.channel == self._notify_channel:
                    self._notified(notify.payload)
                elif notify.payload == str(self._pings):
                    self._answered()
        except Exception as exc:  # the server went away: watch a new connection
            self._reconnect(f"PostgreSQL connection lost ({self.described(exc)})")

    def _check_health(self) -> None:
        """Loop thread: after LISTEN_PING_AFTER without a word from the server, a ping
        (a NOTIFY sent by the reader thread) that must come back in time."""
        quiet = time.monotonic() - self._heard
        if quiet < LISTEN_PING_AFTER:
            self._health = self._loop.call_later(
                LISTEN_PING_AFTER - quiet, self._check_health, background=True
            )
            return
        self._pings += 1
        self._reads.put(functools.partial(self._ping, self._ping_channel, str(self._pings)))
        self._health = self._loop.call_later(
            LISTEN_REPLY_WITHIN,
            self._reconnect,
            f"PostgreSQL left a health check unanswered for {LISTEN_REPLY_WITHIN:g} s",
            background=True,
        )

    def _answered(self) -> None:
        self._health.cancel()
        self._health = self._loop.call_later(LISTEN_PING_AFTER, self._check_health, background=True)

    def _ping(self, channel: str, payload: str) -> None:
        """Reader thread: notify the LISTEN connection's own channel."""
        try:
            self._on_conn(lambda conn: conn.execute("SELECT pg_notify(%s, %s)", (channel, payload)))
        except Exception as exc:  # the loop reconnects when the ping's deadline passes
            logger.warning("PostgreSQL health check not sent (%s)", exc)

    def _reconnect(self, why: str) -> None:
        """Loop thread: give up the LISTEN connection and what waits on it; the next one
        catches up from the newest event delivered, in order."""
        self.connected.clear()
        self._generation += 1
        self._in_order.clear()
        if self._reads_watchdog is not None:
            self._reads_watchdog.cancel()
            self._reads_watchdog = None
        self._health.cancel()
        self._watcher.cancel()
        self._loop.close_unwatched(functools.partial(_close_quietly, self._listen_conn))
        if not self._closed.is_set():
            logger.warning("%s; reconnecting", why)
            self._connect_for_loop()

    # -- without a loop (runserver, gunicorn, a shell): one thread waits ------------------

    def _listen(self, deliver: Callable[[Event], None]) -> None:
        with self._listening_connection(deliver) as conn:
            heard = time.monotonic()
            while not self._closed.is_set():
                if time.monotonic() - heard > LISTEN_PING_AFTER:  # a frozen server?
                    # Cut if unanswered: the error reconnects.  (Notifications that
                    # arrive meanwhile wait in psycopg's backlog for notifies().)
                    with command_watchdog.watching(conn, LISTEN_REPLY_WITHIN):
                        conn.execute("SELECT 1")
                    heard = time.monotonic()
                for notify in conn.notifies(timeout=1.0):
                    heard = time.monotonic()
                    notice = _notice(notify.payload)
                    if isinstance(notice, Event):
                        deliver(notice)
                    else:
                        event_id, channel = notice
                        if event_id <= hub.last_id:
                            continue  # delivered by the catch-up (notified during it)
                        self._deliver_or_gap(
                            _Notified(event_id, channel, read=True, event=self._read(event_id))
                        )

    def _listening_connection(self, deliver: Callable[[Event], None]) -> Any:
        """A connection that LISTENs, after delivering what was published while we were
        not listening (at start, after a reconnect)."""
        # Named, so that its backend can be told apart in pg_stat_activity.
        conn = self._connect(application_name=f"django_comet listen {os.getpid()}")
        try:
            conn.execute(f"LISTEN {self._notify_channel}")  # in effect from here: autocommit
            if self._loop is not None:  # the health check's pings come back here
                self._ping_channel = f"comet_ping_{uuid.uuid4().hex}"
                conn.execute(f"LISTEN {self._ping_channel}")
            self._catch_up(conn, deliver)
        except BaseException as exc:  # (not left to the garbage collector)
            _close_quietly(conn)
            if isinstance(exc, self.psycopg.errors.UndefinedTable):
                self._tables_gone()  # made by the retry's connection
            raise
        # Listening once caught up, not before: a catch-up that fails would otherwise
        # leave the status saying so through the outage that follows.
        self.connected.set()
        return conn

    def _catch_up(self, conn: Any, deliver: Callable[[Event], None]) -> None:
        # A first connection catches up only for the clients that came before it (what
        # came before them is read from the table when a client asks, not loaded into
        # the hub); a reconnection, from the newest event it had.
        newest = int(conn.execute(NEWEST_ID).fetchone()[0])
        known = self._newest_known()
        if newest < known:
            self._move_ids_past(conn, newest, known)
        after = self._catch_up_from(newest)
        if after is None:
            return
        # The newest events at most, as many as Redis' log keeps: the table keeps a
        # history per channel, and many channels' worth would be loaded at once.
        bound = catch_up_bound(self.history_size)
        missed = conn.execute(
            "SELECT id, channel, name, data FROM comet_event WHERE id > %s "
            "ORDER BY id DESC LIMIT %s",
            (after, bound + 1),
        ).fetchall()
        missed.reverse()
        left_out = missed.pop(0)[0] if len(missed) > bound else None
        # Read after the events: a prune in between makes a gap told too many, never one
        # missed.
        lost = conn.execute(
            "SELECT channel, lost_id FROM comet_channel WHERE lost_id > %s", (after,)
        ).fetchall()
        if lost:  # pruned before this process could read them: its streams hear of it
            logger.warning(
                "Events on %d channel(s) were pruned while this process was away from "
                "PostgreSQL; their streams get the gap event",
                len(lost),
            )
            for channel, lost_id in lost:
                hub.add_gap([channel], int(lost_id))
        if left_out is not None:  # on any channel, as Redis' log does
            logger.warning(
                "This process missed more than %d events while away from PostgreSQL; "
                "every stream gets the gap event",
                bound,
            )
            hub.add_gap(None, int(left_out))
        for i, channel, name, data in missed:
            deliver(Event(channel, int(i), data, name))
        self._caught_up_now()

    def _move_ids_past(self, conn: Any, newest: int, seen: int) -> None:
        """The table's newest id is below ids this process has seen: a failover to a
        standby that lagged, a restore.  The ids it would hand out again would be taken
        for old ones, and dropped, by every process that saw the first ones: the
        sequence moves past what this process saw (under the publishers' lock, never
        back)."""
        with _locked(conn, self._lock_key):
            conn.execute(MOVE_IDS_PAST, {"seen": seen})
        logger.error(
            "PostgreSQL's newest event id went back from %d to %d (a failover, a "
            "restore?); events above it are gone: the ids go on from %d",
            seen,
            newest,
            seen,
        )


def _close_quietly(conn: Any) -> None:
    with contextlib.suppress(Exception):
        conn.close()


def conninfo_from_url(url: str, database: Any = None) -> str:
    """postgres://... as given, or for a bare postgres:// that of ``database`` (a Django
    connection; the default database's when None)."""
    if url.rstrip("/") not in ("postgres:", "postgresql:"):
        return url
    if database is None:
        from django.db import connections

        database = connections["default"]
    params = database.get_connection_params()
    if "dbname" not in params and "database" in params:
        params["dbname"] = params.pop("database")
    # Every libpq keyword the project's database connection uses (sslmode, sslrootcert,
    # options, ...), so that the broker's connection is as safe; psycopg's own (a
    # cursor factory, a context) are not libpq's.
    psycopg = _psycopg()
    keywords = {d.keyword.decode() for d in psycopg.pq.Conninfo.get_defaults()}
    kept = {k: v for k, v in params.items() if k in keywords and v not in (None, "")}
    return str(psycopg.conninfo.make_conninfo(**kept))

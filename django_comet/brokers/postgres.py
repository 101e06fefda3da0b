"""PostgreSQL broker: ids from a sequence, history in a table, LISTEN/NOTIFY.

``COMET_BROKER = "postgres://user:pass@host:port/db"``, or ``"postgres://"`` alone for
Django's default database settings.  Needs ``django-comet[postgres]`` (psycopg 3).

Publishing is one short transaction: an advisory lock (so that ids commit, and so are
notified, in id order), an INSERT that takes the id, and a NOTIFY that carries the event;
an event too large for NOTIFY's 8000-byte payload is notified by id and read from the
table.  Old rows beyond the history size of their channel are pruned as events come.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from ..evloop.hub import Event
from .base import ListeningBroker

logger = logging.getLogger("django_comet.broker")

NOTIFY_CHANNEL = "comet_events"
LOCK_KEY = 0x636F6D6574  # "comet"
MAX_PAYLOAD = 7900  # NOTIFY refuses payloads of 8000 bytes and more
PRUNE_EVERY = 50

SCHEMA = """
CREATE TABLE IF NOT EXISTS comet_event (
    id bigserial PRIMARY KEY,
    channel text NOT NULL,
    name text,
    data text NOT NULL,
    created timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS comet_event_channel_id ON comet_event (channel, id);
CREATE TABLE IF NOT EXISTS comet_channel (
    channel text PRIMARY KEY,
    lost_id bigint NOT NULL
);
"""


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise ImportError(
            "COMET_BROKER postgres:// needs psycopg 3: pip install 'django-comet[postgres]'"
        ) from exc
    return psycopg


class PostgresBroker(ListeningBroker):
    def __init__(self, conninfo: str, history_size: int = 100):
        super().__init__()
        self.psycopg = _psycopg()
        self.conninfo = conninfo
        self.history_size = history_size
        self._local = threading.local()  # one publishing connection per thread
        self._loop: Any = None
        self._watcher: Any = None  # the loop's watcher of the LISTEN connection
        self._count = 0
        with self._connect() as conn:
            conn.execute(SCHEMA)

    def _connect(self) -> Any:
        return self.psycopg.connect(self.conninfo, autocommit=True, connect_timeout=5)

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = self._local.conn = self._connect()
        return conn

    def publish(self, channel: str, data: str, name: str | None = None) -> int:
        try:
            return self._publish(self._conn(), channel, data, name)
        except self.psycopg.OperationalError:
            self._local.conn = None  # the database restarted: one fresh try
            return self._publish(self._conn(), channel, data, name)

    def _publish(self, conn: Any, channel: str, data: str, name: str | None) -> int:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            row = conn.execute(
                "INSERT INTO comet_event (channel, name, data) VALUES (%s, %s, %s) RETURNING id",
                (channel, name, data),
            ).fetchone()
            event_id = int(row[0])
            payload = json.dumps([event_id, channel, name, data], separators=(",", ":"))
            if len(payload.encode("utf-8")) > MAX_PAYLOAD:
                payload = str(event_id)  # listeners read it from the table
            conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, payload))
            self._count += 1
            if self._count % PRUNE_EVERY == 0:
                self._prune(conn, channel)
        return event_id

    def _prune(self, conn: Any, channel: str) -> None:
        row = conn.execute(
            "SELECT id FROM comet_event WHERE channel = %s ORDER BY id DESC OFFSET %s LIMIT 1",
            (channel, self.history_size),
        ).fetchone()
        if row is not None:
            conn.execute(
                "DELETE FROM comet_event WHERE channel = %s AND id <= %s", (channel, row[0])
            )
            conn.execute(
                "INSERT INTO comet_channel (channel, lost_id) VALUES (%s, %s) "
                "ON CONFLICT (channel) DO UPDATE SET lost_id = GREATEST(comet_channel.lost_id, "
                "EXCLUDED.lost_id)",
                (channel, row[0]),
            )

    def since(self, channels: Iterable[str], after: int) -> tuple[list[Event], bool]:
        channels = list(channels)
        conn = self._conn()
        rows = conn.execute(
            "SELECT id, channel, name, data FROM comet_event WHERE channel = ANY(%s) AND id > %s "
            "ORDER BY id",
            (channels, after),
        ).fetchall()
        lost = conn.execute(
            "SELECT coalesce(max(lost_id), 0) FROM comet_channel WHERE channel = ANY(%s)",
            (channels,),
        ).fetchone()[0]
        events = [Event(channel, int(i), data, name) for i, channel, name, data in rows]
        return events[-self.history_size * len(channels) :], after < lost

    # -- with an event loop (runcomet): the loop watches the LISTEN connection's socket --

    def start_listening(self, loop: Any = None) -> None:
        if loop is None:
            return super().start_listening()  # no loop here: a thread waits instead
        with self._start_lock:
            if self._listener is not None or self._loop is not None:
                return
            self._loop = loop
        self._connect_for_loop()

    def _connect_for_loop(self) -> None:
        """Connect (blocking, with backoff) on a helper thread, catch up, then hand the
        connection to the loop thread, which watches its socket from then on."""

        def connect() -> None:
            backoff = 0.1
            while not self._closed.is_set():
                try:
                    conn = self._listening_connection(self._deliver)
                except self.psycopg.OperationalError as exc:
                    logger.warning("PostgreSQL unreachable (%s); retrying in %.1fs", exc, backoff)
                    self._closed.wait(backoff)
                    backoff = min(backoff * 2, self.backoff_max)
                else:
                    self._loop.call_soon_threadsafe(self._watch, conn)
                    return

        threading.Thread(target=connect, name="comet-postgres-connect", daemon=True).start()

    def _watch(self, conn: Any) -> None:
        """Loop thread: read notifications whenever the socket is readable."""
        self.connected.set()
        self._watcher = self._loop.add_reader(conn.fileno(), lambda: self._readable(conn))
        self._readable(conn)  # some may have arrived during the catch-up

    def _readable(self, conn: Any) -> None:
        try:
            for notify in conn.notifies(timeout=0):  # what has arrived; never waits
                self._deliver(self._event(notify.payload))
        except Exception as exc:  # the server went away: watch a new connection
            self.connected.clear()
            self._watcher.cancel()
            with contextlib.suppress(Exception):
                conn.close()
            if not self._closed.is_set():
                logger.warning("PostgreSQL connection lost (%s); reconnecting", exc)
                self._connect_for_loop()

    # -- without a loop (runserver, gunicorn, a shell): one thread waits ------------------

    def _listen(self, deliver: Callable[[Event], None]) -> None:
        with self._listening_connection(deliver) as conn:
            while not self._closed.is_set():
                for notify in conn.notifies(timeout=1.0):
                    deliver(self._event(notify.payload))

    def _listening_connection(self, deliver: Callable[[Event], None]) -> Any:
        """A connection that LISTENs, after delivering what was published while we were
        not listening (at start, after a reconnect)."""
        from ..evloop.hub import hub

        conn = self._connect()
        conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        self.connected.set()
        for i, channel, name, data in conn.execute(
            "SELECT id, channel, name, data FROM comet_event WHERE id > %s ORDER BY id",
            (hub.last_id,),
        ).fetchall():
            deliver(Event(channel, int(i), data, name))
        return conn

    def _event(self, payload: str) -> Event:
        if payload.startswith("["):
            event_id, channel, name, data = json.loads(payload)
            return Event(channel, event_id, data, name)
        # Too large for NOTIFY: read it on another connection (this one is busy listening).
        i, channel, name, data = (
            self._conn()
            .execute(
                "SELECT id, channel, name, data FROM comet_event WHERE id = %s", (int(payload),)
            )
            .fetchone()
        )
        return Event(channel, int(i), data, name)


def conninfo_from_url(url: str) -> str:
    """postgres://... as given, or Django's default database for a bare postgres://."""
    if url.rstrip("/") not in ("postgres:", "postgresql:"):
        return url
    from django.db import connections

    params = connections["default"].get_connection_params()
    if "dbname" not in params and "database" in params:
        params["dbname"] = params.pop("database")
    parts = [
        f"{k}={_quote(v)}"
        for k, v in params.items()
        if k in ("dbname", "user", "password", "host", "port") and v not in (None, "")
    ]
    return " ".join(parts)


def _quote(value: Any) -> str:
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"

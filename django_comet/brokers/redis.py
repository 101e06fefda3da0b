"""Redis broker: ids from INCR, history in bounded lists, pub/sub, one Lua script.

``COMET_BROKER = "redis://host:port/db"``.  Needs ``django-comet[redis]`` (redis-py).

Publishing runs one script, atomic in Redis: take the next id, append the event to its
channel's history and to a global log (both trimmed), remember the newest id pushed out
of the channel's history, PUBLISH.  Scripts run one at a time, so events are published
in id order.  Each publish carries a token of its own, which the script remembers for
30 s with the id it gave: a retry (after a timeout or a lost connection, by redis-py
or by us) of a publish that went through returns that id instead of publishing again.

A Redis that lost its data starts its counter again from the clock, and notes where
(``comet:epoch``): a cursor from before it is told of a gap, as is every stream of a
process that was listening across the loss (what it had not received yet is gone).
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from ..evloop.hub import Event, hub
from .base import ListeningBroker, catch_up_bound, logger

PREFIX = "comet:"
# Pub/sub spans a server's databases: each database's channel is its own, so that two
# installations on two databases of one Redis never hear each other's events (database
# 0 keeps the name it always had: processes of an older version still hear it).
PUBSUB_CHANNEL = PREFIX + "events"

_PUBLISH = """
local done = redis.call('GET', KEYS[7])
if done then  -- a retry of a publish that went through: its id, and where ids went back
    local space = string.find(done, ' ')
    return {tonumber(string.sub(done, 1, space - 1)), tonumber(string.sub(done, space + 1))}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
    redis.call('SET', KEYS[1], ARGV[7])
    redis.call('SET', KEYS[6], ARGV[7])
end
local id = redis.call('INCR', KEYS[1])
-- Not above the newest id the publishing process has seen (ARGV[8]): the counter went
-- back (a failover to a replica that lagged), and the id would be taken for an old one.
local back = 0
if id <= tonumber(ARGV[8]) then
    back = id - 1
    id = tonumber(ARGV[8]) + 1
    redis.call('SET', KEYS[1], string.format('%d', id))
end
-- Ids have 16 digits: Lua's own number formatting (and cjson's) keeps only 14.
local payload = '[' .. string.format('%d', id) .. ',' .. cjson.encode(ARGV[1]) .. ','
    .. cjson.encode(ARGV[2]) .. ',' .. cjson.encode(ARGV[3]) .. ']'
local key = KEYS[2] .. ARGV[1]
-- Down to the history size, however long the list was (the size may have been lowered).
local over = redis.call('RPUSH', key, payload) - tonumber(ARGV[4])
for _ = 1, over do
    local dropped = cjson.decode(redis.call('LPOP', key))
    redis.call('SET', KEYS[3] .. ARGV[1], string.format('%d', dropped[1]))
end
-- The global log, for catching up; the newest id it let go tells a catch-up what it lost.
local excess = redis.call('RPUSH', KEYS[4], payload) - tonumber(ARGV[5])
for _ = 1, excess do
    local dropped = cjson.decode(redis.call('LPOP', KEYS[4]))
    redis.call('SET', KEYS[5], string.format('%d', dropped[1]))
end
redis.call('PUBLISH', ARGV[6], payload)
redis.call('SET', KEYS[7], string.format('%d %d', id, back), 'EX', 30)
return {id, back}
"""

# The counter and the epoch started from the clock (ARGV[1]) unless there already; the
# epoch.
_START_COUNTER = """
if redis.call('EXISTS', KEYS[1]) == 0 then
    redis.call('SET', KEYS[1], ARGV[1])
    redis.call('SET', KEYS[2], ARGV[1])
end
return redis.call('GET', KEYS[2])
"""


def _clock() -> int:
    """Where a counter starts: the clock, in microseconds, so that ids still grow past
    those handed out before a data loss, unless those came faster than a million a
    second on average.  (Below 2**53 for centuries: exact in JavaScript.)"""
    return time.time_ns() // 1_000


# The counter, moved up to ARGV[1] unless it is there already (or past it).
_MOVE_IDS_PAST = """
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
    redis.call('SET', KEYS[1], ARGV[1])
end
"""

# Every connection to Redis: a reply that takes this long (a Redis blocked by a slow
# script, a network gone quiet) is an error, whatever redis-py's default is; TCP
# keepalives find a connection a network dropped without a word in about 25 s, and
# unacknowledged writes are given up after 20 s (both as PostgreSQL's).
CONNECTION_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": 5,
    "socket_timeout": 10,
    "socket_keepalive": True,
    "socket_keepalive_options": {
        option: value
        for option, value in (
            (getattr(socket, "TCP_KEEPIDLE", None), 10),
            (getattr(socket, "TCP_KEEPINTVL", None), 5),
            (getattr(socket, "TCP_KEEPCNT", None), 3),
            (getattr(socket, "TCP_USER_TIMEOUT", None), 20_000),
        )
        if option is not None  # (Linux has them all; macOS the first three)
    },
}


# A listener that has heard nothing for this long sends a PING, and takes a Redis that
# leaves it unanswered for socket_timeout for gone (an error, then a reconnect that
# catches up): a Redis frozen (SIGSTOP, a paused VM) keeps its connections open, and its
# kernel acknowledges the PING, so neither the TCP keepalives nor the write timeout tell.
LISTEN_PING_AFTER = 30.0
LISTEN_REPLY_WITHIN = float(CONNECTION_OPTIONS["socket_timeout"])


def connection_options(url: str) -> dict[str, Any]:
    """CONNECTION_OPTIONS, without the TCP ones for a Unix socket (unix://)."""
    if url.startswith("unix:"):
        return {k: v for k, v in CONNECTION_OPTIONS.items() if not k.startswith("socket_keep")}
    return CONNECTION_OPTIONS


def _redis() -> Any:
    try:
        import redis
    except ImportError as exc:
        why = "" if exc.name == "redis" else f" (redis-py failed to load: {exc})"
        raise ImportError(
            f"COMET_BROKER redis:// needs redis-py: pip install 'redis>=5' (django-comet's"
            f" [redis] extra){why}"
        ) from exc
    return redis


class RedisBroker(ListeningBroker):
    def __init__(self, url: str, history_size: int = 100):
        super().__init__()
        self.redis = _redis()
        self.url = url
        self.history_size = history_size
        self.client = self.redis.Redis.from_url(url, **connection_options(url))
        database = self.client.connection_pool.connection_kwargs.get("db") or 0
        self.pubsub_channel = f"{PUBSUB_CHANNEL}:{database}" if database else PUBSUB_CHANNEL
        self._script = self.client.register_script(_PUBLISH)
        self._told_epoch = 0  # the data loss this process's streams were told of
        self.unreachable = (self.redis.ConnectionError, self.redis.TimeoutError)

    def refused(self, exc: Exception) -> bool:
        # A wrong password (or user), an ACL that says no, a database index out of range
        # (not READONLY, OOM, BUSY...: a failover or a load, which pass).
        exceptions = self.redis.exceptions
        return isinstance(exc, (exceptions.AuthenticationError, exceptions.NoPermissionError)) or (
            isinstance(exc, exceptions.ResponseError) and "DB index" in str(exc)
        )

    def publish(self, channel: str, data: str, name: str | None = None) -> int:
        keys = [
            PREFIX + "id",
            PREFIX + "history:",
            PREFIX + "lost:",
            PREFIX + "log",
            PREFIX + "log-lost",
            PREFIX + "epoch",
            PREFIX + "published:" + uuid.uuid4().hex,
        ]
        args = [
            channel,
            name or "",
            data,
            self.history_size,
            # The global log, for catching up after a reconnect: never 0, even with no
            # per-channel history (the script's LTRIM from -0 failed every publish).
            catch_up_bound(self.history_size),
            self.pubsub_channel,
            _clock(),  # where the counter starts, in a Redis that lost its data
            known := self._newest_known(),
        ]
        try:
            event_id, back = self._script(keys=keys, args=args)
        except (self.redis.ConnectionError, self.redis.TimeoutError):
            # A restart, a slow Redis: once more, with the same token (never twice).
            event_id, back = self._script(keys=keys, args=args)
        if back:
            _say_ids_went_back(known, back)
        return int(event_id)

    @staticmethod
    def _decode(payload: bytes | str) -> Event:
        event_id, channel, name, data = json.loads(payload)
        return Event(channel, int(event_id), data, name or None)

    def since(self, channels: Iterable[str], after: int) -> tuple[list[Event], bool]:
        channels = list(channels)
        pipe = self.client.pipeline()
        pipe.get(PREFIX + "epoch")
        for channel in channels:
            pipe.lrange(PREFIX + "history:" + channel, 0, -1)
            pipe.get(PREFIX + "lost:" + channel)
        epoch, *results = pipe.execute()
        events: list[Event] = []
        # A cursor from before the counter last started (a Redis that lost its data):
        # what followed it is gone.
        gap = 0 < after < int(epoch or 0)
        for payloads, lost in zip(results[::2], results[1::2], strict=True):
            newer = [e for e in map(self._decode, payloads) if e.id > after]
            gap = gap or (lost is not None and after < int(lost))
            # A list longer than the history size (it was larger until a restart):
            # its newest, as the size says, and the rest is a gap.
            if len(newer) > self.history_size:
                del newer[: len(newer) - max(self.history_size, 0)]
                gap = True
            events.extend(newer)
        events.sort(key=lambda e: e.id)
        return events, gap

    def newest_id(self) -> int:
        return int(self.client.get(PREFIX + "id") or 0)

    def _listen(self, deliver: Callable[[Event], None]) -> None:
        # A listener waits on a quiet connection: TCP keepalives, and a PING when it
        # has heard nothing for a while (LISTEN_PING_AFTER), find one that a NAT or a
        # failover dropped without a word, or a Redis that stopped answering.
        client = self.redis.Redis.from_url(self.url, **connection_options(self.url))
        pubsub = client.pubsub()
        try:
            pubsub.subscribe(self.pubsub_channel)
            # Redis may run another connection's commands before this one's SUBSCRIBE:
            # its confirmation first, then the reads a catch-up starts from.
            confirmed = pubsub.get_message(timeout=5)
            if confirmed is None or confirmed["type"] != "subscribe":
                raise self.redis.ConnectionError(f"SUBSCRIBE not confirmed ({confirmed!r})")
            marks = client.pipeline(transaction=True)
            marks.get(PREFIX + "id")
            marks.get(PREFIX + "epoch")
            newest, epoch = (int(mark or 0) for mark in marks.execute())
            known = self._newest_known()
            if known > 0 and (newest == 0 or known < epoch):
                # Its counter is gone, or began again after what this process saw: what
                # was published that this process had not received yet is gone with it.
                if newest == 0:  # started here, as the next publish would: a cursor
                    # handed out from now on is the epoch, never taken for one before it
                    newest = epoch = int(
                        client.eval(_START_COUNTER, 2, PREFIX + "id", PREFIX + "epoch", _clock())
                    )
                if epoch != self._told_epoch:  # (once: a reconnect finds the same loss)
                    self._told_epoch = epoch
                    logger.error(
                        "Redis lost its data (restarted without persistence, or flushed): "
                        "events this process had not yet received are gone; every stream "
                        "gets the gap event"
                    )
                    hub.add_gap(None, epoch)
            elif newest < known:
                # A failover to a replica that lagged: ids handed out again would be
                # taken for old ones, and dropped, by every process that saw the first.
                client.eval(_MOVE_IDS_PAST, 1, PREFIX + "id", known)
                _say_ids_went_back(known, newest)
            # A first connection catches up only for the clients that came before it
            # (what came before them is read from the histories when a client asks,
            # never fed to streams as if it were new); a reconnection, from the newest
            # event it had.
            after = self._catch_up_from(newest)
            if after is not None:
                snapshot = client.pipeline(transaction=True)  # the log and its mark agree
                snapshot.lrange(PREFIX + "log", 0, -1)
                snapshot.get(PREFIX + "log-lost")
                log, lost_mark = snapshot.execute()
                log_lost = int(lost_mark or 0)
                if log_lost > after:  # gone from the log before this process read them
                    logger.warning(
                        "Events were lost while this process was away from Redis (the "
                        "catch-up log keeps %d); every stream gets the gap event",
                        catch_up_bound(self.history_size),
                    )
                    hub.add_gap(None, log_lost)
                for payload in log:  # missed while away
                    event = self._decode(payload)
                    if event.id > after:
                        deliver(event)
                self._caught_up_now()
            self.connected.set()
            heard, pinged = time.monotonic(), 0.0
            while not self._closed.is_set():
                message = pubsub.get_message(timeout=1.0)
                now = time.monotonic()
                if message is not None:
                    heard, pinged = now, 0.0  # (a PING's answer too)
                    if message["type"] == "message":
                        deliver(self._decode(message["data"]))
                elif pinged and now - pinged > LISTEN_REPLY_WITHIN:
                    raise self.redis.ConnectionError(
                        f"no answer to a PING in {LISTEN_REPLY_WITHIN:g} s"
                    )
                elif not pinged and now - heard > LISTEN_PING_AFTER:
                    pubsub.ping()
                    pinged = now
        finally:
            pubsub.close()
            client.close()

    def close(self) -> None:
        super().close()
        self.client.close()


def _say_ids_went_back(seen: int, newest: int) -> None:
    logger.error(
        "Redis's newest event id went back from %d to %d (a failover?); "
        "events above it are gone: the ids go on from %d",
        seen,
        newest,
        seen,
    )

"""Publishing events and reading a channel's recent history."""

from __future__ import annotations

import inspect
import json
import re
import time
from collections.abc import Iterable
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.http import HttpRequest, HttpResponseBadRequest, HttpResponseForbidden
from django.http.response import HttpResponseBase
from django.utils.module_loading import import_string

from .brokers import get_broker
from .brokers.base import Broker, logger
from .conf import comet_settings
from .evloop import hub as hub_module
from .evloop.hub import Event, hub

__all__ = ["history", "may_listen", "publish"]

RESERVED_EVENT_PREFIX = "comet-"
MAX_EVENT_ID = 2**63 - 1  # ids are 64-bit (PostgreSQL bigint)
_CHANNEL = re.compile(r"[A-Za-z0-9_.:\-]{1,200}\Z")


def check_channel(channel: str) -> str:
    if not isinstance(channel, str) or not _CHANNEL.match(channel):
        raise ValueError(f"invalid channel name {channel!r}: use 1-200 letters, digits and _ . : -")
    return channel


def check_channels(channels: Iterable[str], caller: str) -> list[str]:
    """``channels`` once each, checked, and no more than COMET_MAX_CHANNELS of them."""
    checked = list(dict.fromkeys(check_channel(c) for c in channels))
    if not checked:
        raise ValueError(f"{caller} needs at least one channel")
    if len(checked) > comet_settings.MAX_CHANNELS:
        raise ValueError(
            f"{caller}: {len(checked)} channels, more than COMET_MAX_CHANNELS "
            f"({comet_settings.MAX_CHANNELS})"
        )
    return checked


def publish(channel: str, data: Any, *, event: str | None = None) -> int:
    """Publish ``data`` (anything JSON can encode, with Django's encoder) on ``channel``
    from any view, thread or shell; return the event's id.  Subscribers receive the JSON
    text as SSE ``data``; ``event`` becomes the SSE ``event:`` name."""
    check_channel(channel)
    if event is not None and (not isinstance(event, str) or not re.fullmatch(r"[\w.:-]+", event)):
        raise ValueError(f"invalid event name {event!r}")
    if event is not None and event.startswith(RESERVED_EVENT_PREFIX):
        # The server's own events (the history gap, the heartbeat): comet.js acts on them.
        raise ValueError(f"event names starting with {RESERVED_EVENT_PREFIX!r} are reserved")
    # allow_nan=False: NaN and Infinity are not JSON, and browsers' JSON.parse refuses them.
    text = json.dumps(data, cls=DjangoJSONEncoder, separators=(",", ":"), allow_nan=False)
    limit = comet_settings.MAX_EVENT_SIZE
    if len(text) > limit:  # (ASCII: json.dumps escapes the rest)
        # Kept whole in every history (the broker's, each process's, as text and as
        # a frame): 100 events of 10 MB were 2.4 GB.
        raise ValueError(
            f"publish(): the event's JSON is {len(text)} bytes, over COMET_MAX_EVENT_SIZE "
            f"({limit}): publish where to fetch the data instead"
        )
    return get_broker().publish(channel, text, event)


def replay(broker: Broker, channels: list[str], after: int | None) -> tuple[list[Event], bool, int]:
    """For a client back with cursor ``after`` (a Last-Event-ID, a poll's ``since``; 0:
    from the start): the events of ``channels`` it missed, whether some of them are gone
    (never for 0), and the cursor to
    follow from; for a new client (None), nothing but its cursor.  A cursor newer than
    any id the broker handed out comes from another epoch (a memory broker that
    restarted, a reset database): then everything there is, as a gap, from cursor 0, or,
    with nothing there, the newest id (read before the history was).  Cursor 0 with no
    history moves on too, where the broker says how far its hub is complete: a cursor
    left at 0 takes the next epoch's losses for history, never told.  This process's hub
    may lag a shared broker, so the broker has the last word (asked only when the hub has
    not seen the cursor)."""
    if after is None:
        return [], False, broker.fresh_cursor(channels)
    after = min(after, MAX_EVENT_ID)  # any larger cursor is as foreign, and fits a bigint
    if broker.cut_off():
        _unreachable("lost by its listener, or a read from it failed lately")
        events, gap = broker.local_since(channels, after)
    else:
        # Read before the broker is: every id up to it was handed out before the read.
        complete_after = broker.hub_has_all_after()
        lost = hub.lost_mark(channels)  # (before it too: a cursor from 0 moves past these)
        try:
            with broker.replaying(), broker.early_client():
                events, gap = broker.since(channels, after)
                if not events and after > hub.last_id and after > (newest := broker.newest_id()):
                    events, _ = broker.since(channels, 0)
                    return events, True, 0 if events else newest
        except broker.unreachable as exc:
            _unreachable(_first_line(exc))
            events, gap = broker.local_since(channels, after)
        else:
            if not events and after == 0 and complete_after:
                # Not back before what is known lost: a gap its next poll would be told.
                return events, False, max(complete_after, lost)
            if gap and not events and after > 0 and complete_after is not None:
                # Nothing of these channels is left up to it, and all after it reaches
                # the hub: past the gap (else a process that has received nothing
                # newer than the cursor would tell the gap again at every reconnect).
                return events, True, max(after, complete_after)
    # Cursor 0 asks for whatever history there is: a client with no state has nothing to
    # reload (a gap would tell every new page of a busy channel that it missed something).
    return events, gap and after > 0, after


UNREACHABLE_TOLD_EVERY = 60.0  # seconds between two warnings of the same outage
_unreachable_told = -UNREACHABLE_TOLD_EVERY


def _first_line(exc: Exception) -> str:
    return (str(exc).strip() or repr(exc)).splitlines()[0]  # (psycopg's messages: lines)


def _unreachable(why: str) -> None:
    """Say that replays fall back on this process's history, once a minute at most:
    every replay of every client does while the broker is away."""
    global _unreachable_told
    now = time.monotonic()
    if now - _unreachable_told >= UNREACHABLE_TOLD_EVERY:
        _unreachable_told = now
        logger.warning(
            "Broker unreachable (%s): replaying from this process's history "
            "(said once a minute while it lasts)",
            why,
        )


def replay_head(events: list[Event]) -> tuple[list[Event], bool]:
    """The oldest of a replay's ``events`` that fit in COMET_MAX_PENDING_OUTPUT (the
    oldest always), and whether they are all of them.  A replay is taken a bound at a
    time, in order: a poll's next answer is the next batch (its ``last_id`` is the
    batch's), a stream's held response takes the rest from this process's history as it
    reads (one request for many channels' history from their start must not pin a copy
    of all of it for as long as its client reads slowly)."""
    return hub_module.oldest_that_fit(events, comet_settings.MAX_PENDING_OUTPUT)


def replay_tail(events: list[Event], gap: bool, after: int | None) -> tuple[list[Event], bool]:
    """A replay cut from the other end, for a client that reloads (a gap), or a stream
    whose process cannot take the rest from its own history: the newest events that fit
    in COMET_MAX_PENDING_OUTPUT (the newest always), and a gap for those left out too
    (not for a cursor of 0, which asks for whatever there is)."""
    events, whole = hub_module.newest_that_fit(events, comet_settings.MAX_PENDING_OUTPUT)
    return events, gap or (not whole and bool(after))


def as_dict(event: Event) -> dict[str, Any]:
    return {
        "channel": event.channel,
        "id": event.id,
        "event": event.name,
        "data": json.loads(event.data),
    }


def is_event_id(value: Any) -> bool:
    """An event id as code passes it: an int, 0 or more (a query string's text is not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def history(channel: str, after: int = 0) -> list[dict[str, Any]]:
    """Recent events of ``channel`` newer than ``after``, oldest first (at most
    COMET_HISTORY_SIZE of them), from the broker's shared history; while the broker is
    unreachable, in a process that listens to it (a server's), from its own, as replays
    do (a view that reads the history keeps answering through an outage); elsewhere the
    broker's error is raised."""
    if not is_event_id(after):
        raise TypeError(
            f"history(): after must be an event id (an int, 0 or more), not {after!r}; "
            f"poll_response() takes the query string's text"
        )
    channels, broker = [check_channel(channel)], get_broker()
    if broker.cut_off():
        _unreachable("lost by its listener, or a read from it failed lately")
        events, _ = broker.local_since(channels, after)
    else:
        try:
            with broker.replaying():
                events, _ = broker.since(channels, after)
        except broker.unreachable as exc:
            if broker.hub_has_all_after() is None:
                raise  # (a shell, a task: no history of its own to answer from)
            _unreachable(_first_line(exc))
            events, _ = broker.local_since(channels, after)
    return [as_dict(e) for e in events]


def refusal(
    request: HttpRequest, channels: tuple[str, ...], caller: str
) -> HttpResponseBase | None:
    """The answer for a request to listen to ``channels`` when it may not: 400 for no
    channel or a malformed name (channel names may come from the query string), 403 when
    COMET_AUTHORIZE refuses one.  None when it may.  Plain text: nothing the client sent
    is reflected but a validated channel name.  A channel that is not a str is the
    view's mistake, not the client's: a TypeError (a 500 that says what to fix)."""
    for channel in channels:
        if not isinstance(channel, str):
            raise TypeError(
                f"{caller}() takes each channel name as an argument of its own, a str, not "
                f"{type(channel).__name__}: {caller}(request, *names) for a list of them"
            )
    if not channels:  # (from an empty query string, say): nothing to wait for
        return HttpResponseBadRequest(
            "No channel to listen to.", content_type="text/plain; charset=utf-8"
        )
    if len(set(channels)) > comet_settings.MAX_CHANNELS:  # each costs memory and reads
        return HttpResponseBadRequest(
            f"At most {comet_settings.MAX_CHANNELS} channels at once.",
            content_type="text/plain; charset=utf-8",
        )
    for channel in channels:
        if not _CHANNEL.match(channel):
            return HttpResponseBadRequest(
                "Invalid channel name: use 1-200 letters, digits and _ . : -",
                content_type="text/plain; charset=utf-8",
            )
        if not may_listen(request, channel):
            return HttpResponseForbidden(
                f"Not allowed to listen to {channel}.", content_type="text/plain; charset=utf-8"
            )
    return None


def may_listen(request: HttpRequest, channel: str) -> bool:
    """COMET_AUTHORIZE(request, channel), or True when the setting is None.  Only True
    grants: False or None refuses, and anything else (an HttpResponse, a coroutine from
    an async function) is a TypeError, never taken for a yes because it is truthy."""
    check = comet_settings.AUTHORIZE
    if check is None:
        return True
    if isinstance(check, str):
        check = import_string(check)
    answer = check(request, channel)
    if answer is True:
        return True
    if answer is False or answer is None:
        return False
    if inspect.iscoroutine(answer):
        answer.close()  # never awaited, and said so here rather than by a RuntimeWarning
        raise TypeError("COMET_AUTHORIZE must be a plain function, not an async one")
    raise TypeError(f"COMET_AUTHORIZE must return True or False, not {answer!r}")

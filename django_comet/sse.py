"""Server-Sent Events: ``EventStreamResponse`` and the ``event_stream`` view helper.

Under runcomet a stream holds no thread: after the first content (retry, replay) the
server writes each event's frame, encoded once, to every subscribed connection, and a
heartbeat event every COMET_SSE_HEARTBEAT seconds.  Elsewhere it degrades to a
blocking generator (one thread per stream, as any WSGI server would need).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from django.http import HttpRequest
from django.http.response import HttpResponseBase

from .brokers import get_broker
from .conf import comet_settings
from .deferred import HeldResponse, head_request, request_environ
from .events import check_channels, refusal, replay, replay_head, replay_tail
from .evloop.deferral import Stream, begin, blocking_through, withdraw
from .evloop.frames import GAP_EVENT, gap_frame, heartbeat_frame, jittered_retry
from .evloop.hub import hub

__all__ = ["GAP_EVENT", "EventStreamResponse", "event_stream"]

# Without heartbeats, how long a stream outside runcomet stays silent before a comment.
IDLE_COMMENT_SECONDS = 60.0

# GAP_EVENT is sent when some events newer than the client's Last-Event-ID are gone
# from the history (hub.py says what it holds): the client should then reload whatever
# state it derives from the stream.


class EventStreamResponse(HeldResponse):
    """``text/event-stream`` of every event on ``channels``.

    ``channels``: channel names, or one name.  ``last_event_id``: replay what the client
    missed (from the bounded per-channel history), preceded by a ``comet-history-gap``
    event when some of it is gone.  Without it the stream starts with events published
    from now on.  ``retry``: the reconnection delay, in milliseconds, that the browser
    should use.
    """

    def __init__(
        self,
        channels: Iterable[str],
        *,
        last_event_id: int | str | None = None,
        retry: int | None = None,
    ):
        if retry is not None and (type(retry) is not int or retry < 0):
            # (2.5 meant seconds would be 2 ms: a reconnection storm)
            raise ValueError(f"retry is a whole number of milliseconds >= 0, not {retry!r}")
        super().__init__(content_type="text/event-stream")
        self["Cache-Control"] = "no-cache"
        self["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
        if isinstance(channels, str):
            channels = [channels]  # one channel, not one per letter
        self.channels = check_channels(channels, "EventStreamResponse")
        broker = get_broker()
        broker.start_listening()
        after = _parse_event_id(last_event_id)
        # A first frame makes proxies and browsers see the stream open at once.  A
        # heartbeat (0 when there are none), it tells comet.js the interval, so that a
        # stall is noticed from the start, and that the stream really flows: a proxy
        # that passes the head but buffers the body shows as no frame (a comment would
        # reach no script).
        first = [b"retry: %d\n\n" % retry] if retry is not None else []
        # Taken before the replay: a loss after it, past what the replay sends, is news.
        lost_mark = hub.lost_mark(self.channels)
        events, gap, cursor = replay(broker, self.channels, after)
        batch, whole = replay_head(events)
        if not whole and broker.local_since(self.channels, batch[-1].id)[1]:
            # The rest is not all in this process's history (it started listening
            # since, or let the channel go), where the held stream would take it from.
            batch, gap = replay_tail(events, gap, after)
        events = batch
        moved_on = None  # told with a gap that has no event after it (hub.py)
        if gap and not events:
            events, newest = hub.since_or_newest(self.channels, cursor)
            if not events:  # (else published since the replay: they follow the gap)
                cursor = moved_on = newest
        # The heartbeat carries the cursor when nothing else of the first content does
        # (a new client, or one from 0, with nothing to replay): a browser's reconnect
        # sends it back, so that what a restart lost meanwhile is told, as to a poll.
        told = not events and not gap and cursor and cursor != after
        first.append(heartbeat_frame(comet_settings.SSE_HEARTBEAT, cursor if told else None))
        if gap:  # (a new client, with no cursor, is never told one)
            first.append(gap_frame(after or 0, self.channels, moved_on))
        first.extend(e.frame for e in events)
        self._cursor = events[-1].id if events else cursor
        self._first = b"".join(first)
        self.comet_deferral = Stream(self.channels, self._cursor, lost_mark=lost_mark)
        self._head = head_request()
        self.streaming_content = self._frames(request_environ())

    def _frames(self, environ: dict[str, Any] | None) -> Iterator[bytes]:
        begin(environ, self.comet_deferral)
        yield self._first
        withdraw(environ, self.comet_deferral)
        if self.comet_deferral.claimed or self._head:
            return  # runcomet writes the events from its loop
        blocking_through("An event stream")
        # Any other server: one blocked thread per stream, ended as runcomet ends it:
        # after COMET_MAX_HOLD, with a jittered retry.
        cursor = self._cursor
        known_lost = self.comet_deferral.lost_mark
        heartbeat = comet_settings.SSE_HEARTBEAT
        max_hold = comet_settings.MAX_HOLD
        ends = time.monotonic() + max_hold if max_hold else None
        while ends is None or time.monotonic() < ends:
            wait = heartbeat or IDLE_COMMENT_SECONDS
            if ends is not None:
                wait = min(wait, max(0.0, ends - time.monotonic()))
            events, gap = hub.wait(self.channels, cursor, wait, known_lost)
            if gap:
                yield gap_frame(cursor, self.channels)
                known_lost = hub.lost_mark(self.channels)
            if not events and (ends is None or time.monotonic() < ends):
                # A blocked thread hears of its client leaving only by writing to it:
                # without heartbeats, a comment each idle minute.
                yield heartbeat_frame(heartbeat) if heartbeat else b":\n\n"
            for event in events:
                cursor = event.id
                yield event.frame
        yield jittered_retry()


def _parse_event_id(value: int | str | None) -> int | None:
    """An event id as the server writes them (digits only, as a poll's ``since``);
    anything else is not one of ours: start fresh rather than fail."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    if not (isinstance(value, str) and value.isascii() and value.isdigit()):
        return None
    digits = value.lstrip("0")
    return int(digits or "0") if len(digits) <= 20 else 10**20  # past every id


def event_stream(
    request: HttpRequest, *channels: str, retry: int | None = None
) -> HttpResponseBase:
    """A view's whole job for an SSE endpoint: check COMET_AUTHORIZE for every channel
    (403 if any is refused; 400 for a malformed name), read Last-Event-ID (header, or
    ``?lastEventId=`` for clients that cannot set it) and return the stream."""
    refused = refusal(request, channels, "event_stream")
    if refused is not None:
        return refused
    # The header, which browsers send on their own reconnects, unless it is not one of
    # our ids (a proxy's, another app's on the same URL): then the query's.
    last_event_id: Any = request.headers.get("Last-Event-ID")
    if _parse_event_id(last_event_id) is None:
        last_event_id = request.GET.get("lastEventId")
    return EventStreamResponse(channels, last_event_id=last_event_id, retry=retry)

"""Server-Sent Events: ``EventStreamResponse`` and the ``event_stream`` view helper.

Under runcomet a stream holds no thread: after the first content (retry, replay) the
server writes each event's frame, encoded once, to every subscribed connection, and a
heartbeat comment every COMET_SSE_HEARTBEAT seconds.  Elsewhere it degrades to a
blocking generator (one thread per stream, as any WSGI server would need).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from django.http import HttpRequest, StreamingHttpResponse
from django.http.response import HttpResponseBase

from .brokers import get_broker
from .conf import comet_settings
from .events import check_channel, refusal, replay
from .evloop.deferral import Stream
from .evloop.holding import HEARTBEAT
from .evloop.hub import hub, sse_frame

__all__ = ["GAP_EVENT", "EventStreamResponse", "event_stream"]

# Sent (without an id) when Last-Event-ID is older than the history reaches back; its
# data is {"last_event_id": <the client's>, "channels": [...]}.  The client should then
# reload whatever state it derives from the stream.
GAP_EVENT = "comet-history-gap"


class EventStreamResponse(StreamingHttpResponse):
    """``text/event-stream`` of every event on ``channels``.

    ``last_event_id``: replay what the client missed (from the bounded per-channel
    history), preceded by a ``comet-history-gap`` event when some of it is gone.  Without
    it the stream starts with events published from now on.  ``retry``: the reconnection
    delay, in milliseconds, that the browser should use.
    """

    def __init__(
        self,
        channels: Iterable[str],
        *,
        last_event_id: int | str | None = None,
        retry: int | None = None,
    ):
        super().__init__(content_type="text/event-stream")
        self["Cache-Control"] = "no-cache"
        self["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
        self.channels = list(dict.fromkeys(check_channel(c) for c in channels))
        if not self.channels:
            raise ValueError("EventStreamResponse needs at least one channel")
        broker = get_broker()
        broker.start_listening()
        after = _parse_event_id(last_event_id)
        # A first comment makes proxies and browsers see the stream open at once.
        first = [b"retry: %d\n\n" % retry if retry is not None else b": stream opened\n\n"]
        if after is None:
            self._cursor = hub.newest_id(self.channels)
        else:
            events, gap, cursor = replay(broker, self.channels, after)
            if gap:
                gap_data = json.dumps({"last_event_id": after, "channels": self.channels})
                first.append(sse_frame(None, GAP_EVENT, gap_data))
            first.extend(e.frame for e in events)
            self._cursor = events[-1].id if events else cursor
        self._first = b"".join(first)
        self.comet_deferral = Stream(self.channels, self._cursor)
        self.streaming_content = self._frames()

    def _frames(self) -> Iterator[bytes]:
        yield self._first
        if self.comet_deferral.claimed:
            return  # runcomet writes the events from its loop
        cursor = self._cursor
        interval = comet_settings.SSE_HEARTBEAT or 15.0
        while True:  # any other server: one blocked thread per stream
            events = hub.wait(self.channels, cursor, interval)
            if not events:
                yield HEARTBEAT
            for event in events:
                cursor = event.id
                yield event.frame


def _parse_event_id(value: int | str | None) -> int | None:
    if value is None or value == "":
        return None
    try:
        event_id = int(value)
    except (TypeError, ValueError):
        return None  # not one of ours: start fresh rather than fail
    return event_id if event_id >= 0 else None


def event_stream(
    request: HttpRequest, *channels: str, retry: int | None = None
) -> HttpResponseBase:
    """A view's whole job for an SSE endpoint: check COMET_AUTHORIZE for every channel
    (403 if any is refused; 400 for a malformed name), read Last-Event-ID (header, or
    ``?lastEventId=`` for clients that cannot set it) and return the stream."""
    refused = refusal(request, channels)
    if refused is not None:
        return refused
    last_event_id: Any = request.headers.get("Last-Event-ID") or request.GET.get("lastEventId")
    return EventStreamResponse(channels, last_event_id=last_event_id, retry=retry)

"""``poll_response``: a complete long-poll endpoint whose answers cost no view call.

The answer is ``{"events": [{"id": N, "data": ..., "event": name?}, ...], "last_id": N}``:
at once when events newer than ``since`` exist (from the shared history), otherwise when
the next one is published, otherwise after ``timeout`` seconds with no events.  Under
runcomet the waiting costs no thread and the answer is rendered in the loop thread from
the events' JSON text, once per event for all the waiters with the same cursor, so one
publish wakes thousands of long-polls as cheaply as it feeds SSE streams.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from django.http import HttpRequest, HttpResponseBadRequest
from django.http.response import HttpResponseBase

from .brokers import get_broker
from .conf import comet_settings
from .deferred import HeldResponse, head_request, request_environ, seconds_of
from .events import refusal, replay
from .evloop.deferral import ChannelWait, begin, blocking_through, withdraw
from .evloop.hub import Event, hub, poll_batch

__all__ = ["poll_response", "render_events"]


def render_events(events: list[Event], after: int, gap: bool = False) -> bytes:
    """The JSON body; event data is already JSON text, so nothing is decoded.  ``gap``:
    some events newer than the client's cursor are gone from the history (``"gap":
    true``), as the SSE stream's ``comet-history-gap`` event says."""
    items = []
    for event in events:
        name = f',"event":{json.dumps(event.name)}' if event.name else ""
        items.append(f'{{"id":{event.id},"data":{event.data}{name}}}')
    last_id = events[-1].id if events else after
    more = ',"gap":true' if gap else ""
    return f'{{"events":[{",".join(items)}],"last_id":{last_id}{more}}}'.encode()


class PollResponse(HeldResponse):
    def __init__(self, channels: list[str], since: int | None, timeout: float):
        super().__init__(content_type="application/json")
        self["Cache-Control"] = "no-cache"
        # Its first byte goes out at once (a poll shows as live): a proxy that buffers
        # (nginx does by default) would hold it back until the answer.
        self["X-Accel-Buffering"] = "no"
        broker = get_broker()
        broker.start_listening()
        ready, gap, after = replay(broker, channels, since)
        ready = poll_batch(ready, gap, comet_settings.MAX_PENDING_OUTPUT)
        self.channels = channels
        self.gap = gap
        self.comet_deferral = ChannelWait(
            None,
            channels=channels,
            after=after,
            timeout=timeout,
            ready=ready,
            render=render_events,
            gap=gap,
        )
        self._head = head_request()
        self.streaming_content = self._body(request_environ())

    def _body(self, environ: dict[str, Any] | None) -> Iterator[bytes]:
        wait = self.comet_deferral
        begin(environ, wait)
        # A first byte at once (JSON may start with whitespace): browsers tell a script
        # that the answer has begun (comet.js: "live") only once some body has come.
        yield b" "
        withdraw(environ, wait)
        if wait.claimed or self._head:
            return  # runcomet answers from its loop
        blocking_through("A long-poll")
        if wait.ready:
            yield render_events(wait.ready, wait.after, self.gap)
        else:
            events, gap = hub.wait(self.channels, wait.after, wait.timeout)
            after = wait.after
            if self.gap and not events:  # (see Holder._wait_timed_out)
                events, after = hub.since_or_newest(self.channels, after)
            gap = self.gap or gap
            events = poll_batch(events, gap, comet_settings.MAX_PENDING_OUTPUT)
            yield render_events(events, after, gap)


def poll_response(
    request: HttpRequest, *channels: str, since: int | str | None = None, timeout: float = 25.0
) -> HttpResponseBase:
    """A view's whole job for a long-poll endpoint: check COMET_AUTHORIZE for every
    channel (403 if refused; 400 for a malformed name) and wait for events newer than
    ``since`` (an event id; None: from now on).  ``since`` may be the query string's
    text as it came: anything but a whole number, 0 or more, is a 400."""
    timeout = seconds_of(timeout, "poll_response", "timeout")
    if not timeout:
        raise ValueError("poll_response(): timeout must be over 0")
    refused = refusal(request, channels, "poll_response")
    if refused is not None:
        return refused
    if isinstance(since, str):
        if not (since.isascii() and since.isdigit()):
            return HttpResponseBadRequest(
                "since must be an event id (a whole number).",
                content_type="text/plain; charset=utf-8",
            )
        # More than 20 digits is past every event id (a cursor from before a reset,
        # answered as such); and int() refuses more than 4,300 of them.
        digits = since.lstrip("0")
        since = int(digits or "0") if len(digits) <= 20 else 10**20
    return PollResponse(list(dict.fromkeys(channels)), since, timeout)

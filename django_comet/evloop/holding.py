"""Held responses: staged timers, long-poll channel waits, SSE streams and their fan-out.

Loop thread only.  A held exchange has sent its headers and first content and waits:
- for a time (``Deferral``), then its next stage runs on a worker;
- on a channel (``ChannelWait``) until an event newer than its cursor arrives or the
  timeout passes, then its next stage runs with the event (or None);
- as a stream (``Stream``): every event of its channels is written to it as it comes.

Fan-out is one pass over a channel's subscribers with the event's frame encoded once;
per subscriber it is a cursor check and two C calls.  What a stream is written, and
what happens when its client reads slower than events come, is streams.py's.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .deadlines import Deadlines
from .deferral import AnyDeferral, ChannelWait, Deferral, Stream
from .frames import chunked
from .hub import Event, hub, poll_batch
from .libc import peer_left
from .libevent_ctypes import EV_READ
from .request import RequestStruct
from .start_response import asks_to_close
from .streams import Streams

if TYPE_CHECKING:
    from .exchange import Exchange
    from .server import Server

logger = logging.getLogger("django_comet.server")


NO_ENVIRON: dict[str, Any] = {}  # what a held exchange keeps of its environ: nothing

# A held connection goes on reading, to see its client leave.  What the client sends
# meanwhile (a pipelined request, or a flood) is kept up to this much; then libevent
# stops reading it, and the rest waits in the kernel (TCP pushes back on the client).
HELD_INPUT_MAX = 64 * 1024

# A stage held back for a slow reader is checked again after its delay, or this, if
# longer (a chain of zero delays would otherwise check at every pass).
STAGE_RECHECK_MIN = 0.1

# Stages fall due up to this late, never early, and those due within one grain run
# together (deadlines.py).  Small beside the lateness that matters (bench/fanout's goal
# is 20 ms), it is still several stages long in a burst (0.25 ms each), so a busy server
# hands them to its threads a few at a time instead of waking up for each.
STAGE_GRAIN = 0.001


class Subscribers(dict["Exchange", None]):
    """A channel's subscribers (an ordered set) and the channel's name, which the held
    responses' channel lists share instead of each keeping a copy from its request."""

    __slots__ = ("channel",)

    def __init__(self, channel: str):
        super().__init__()
        self.channel = channel


class Holder:
    def __init__(self, server: Server):
        self.server = server
        self.loop = server.loop
        self._lib = server._lib
        self._buf = server._buf
        self.max_pending = server.config.max_pending_output
        self.max_hold = server.config.max_hold
        self._subscribers: dict[str, Subscribers] = {}
        self.streams = Streams(server)
        self.stages_delayed = 0  # stages held back until their client caught up
        self._timeouts = Deadlines(self.loop, self._wait_timed_out)  # long-polls'
        self._stages = Deadlines(self.loop, self._stage_due, STAGE_GRAIN)  # staged responses'
        self._resume = server._resume
        self._sink = functools.partial(self.loop.call_soon_threadsafe, self._fan_out)
        hub.add_sink(self._sink)
        self._gap_sink = functools.partial(self.loop.call_soon_threadsafe, self._tell_gap)
        hub.add_gap_sink(self._gap_sink)

    def close(self) -> None:
        self._timeouts.close()
        self._stages.close()
        hub.remove_sink(self._sink)
        hub.remove_gap_sink(self._gap_sink)
        self.streams.close()

    # -- holding and releasing ---------------------------------------------------------

    def hold(self, ex: Exchange, deferral: AnyDeferral) -> None:
        server = self.server
        # Stopping, or a response that outlived COMET_MAX_HOLD: one that would wait ends
        # now instead, with the ending its kind of wait has (_end_now).
        if server._draining or (self.max_hold and time.monotonic() - ex.started > self.max_hold):
            if ex.ending and type(deferral) is ChannelWait and deferral.resume is not None:
                server._end(ex)  # its last stage, run as on a timeout, would wait again
            else:
                self._end_now(ex, deferral)
            return
        ex.state = "held"
        ex.environ = NO_ENVIRON  # the response object keeps what the next stage needs
        if ex.bev is None:
            server._lift_read_timeout(ex)
        if ex.outbuf is None:  # held for the first time (a chain of stages: once for all)
            ex.outbuf = self._lib.bufferevent_get_output(ex.bev)  # see Server._send_part
            self._lib.bufferevent_setwatermark(ex.bev, EV_READ, 0, HELD_INPUT_MAX)
            self._shed_headers(ex)
        if isinstance(deferral, Deferral):
            delay = deferral.delay
            resume: Callable[[], Iterable[bytes]] | None = deferral.resume
            if self.max_hold:
                left = ex.started + self.max_hold - time.monotonic()
                if delay > left:  # its stage would come past COMET_MAX_HOLD: end then
                    resume = None
                    delay = max(0.0, left)
            ex.stage_due = self._stages.add(ex, delay, resume, delay)
            return
        if isinstance(deferral, ChannelWait):
            if deferral.ready:  # the view found newer events: answer at once
                self._wake(ex, deferral, deferral.ready, deferral.after, {})
                return
            ready, gap = hub.since(deferral.channels, deferral.after, deferral.lost_mark)
            if ready:  # published since the view looked: answer at once
                self._wake(ex, deferral, ready, deferral.after, {}, gap=gap)
                return
            ex.hold = deferral
            ex.cursor = deferral.after
            self._subscribe(ex, deferral.channels)
            timeout = deferral.timeout
            if self.max_hold:  # a wait ends by COMET_MAX_HOLD too, as on its timeout
                timeout = max(0.0, min(timeout, ex.started + self.max_hold - time.monotonic()))
            deferral.due = self._timeouts.add(ex, timeout)
            return
        ex.hold = deferral
        ex.cursor = deferral.cursor
        deferral.backlog = self._lib.evbuffer_get_length(ex.outbuf)
        self._subscribe(ex, deferral.channels)
        self.streams.start(ex, deferral)

    def _stage_due(self, ex: Exchange, resume: Any, delay: float) -> None:
        """A stage's time has come: run it, unless its client has not taken the earlier
        parts yet (more than ``max_pending`` of them unsent).  Then the stage waits for
        it, checking again after another delay: a chain of stages to a slow reader holds
        that much at most (and the next part), and goes on at the reader's pace; one that
        reads nothing is cut by the write timeout, since nothing is written meanwhile."""
        if resume is None:  # COMET_MAX_HOLD came first
            ex.stage_due = None
            self.server._end(ex)
            return
        if self._lib.evbuffer_get_length(ex.outbuf) > self.max_pending:
            self.stages_delayed += 1
            again = max(delay, STAGE_RECHECK_MIN)
            ex.stage_due = self._stages.add(ex, again, resume, delay)
            return
        if self._client_left(ex):
            ex.stage_due = None
            return
        self._resume(ex, resume)

    def _client_left(self, ex: Exchange) -> bool:
        """Whether the client of held ``ex`` closed its connection, unseen by libevent
        yet: woken by a signal (SIGCONT, after a stop), libevent runs a pass's due timers
        before reading any socket, and every stage whose client left while the process
        was stopped ran.  Its close callback, a pass later, then releases it (one look
        at the socket per stage: the stage itself is a whole request)."""
        fd = self._lib.bufferevent_getfd(ex.bev)
        if fd < 0 or not peer_left(fd):
            return False
        # libevent sees the close by reading: lift the cap on a held one's input (hold).
        self._lib.bufferevent_setwatermark(ex.bev, EV_READ, 0, 0)
        self._lib.bufferevent_enable(ex.bev, EV_READ)
        return True

    def _shed_headers(self, ex: Exchange) -> None:
        """While a response is held, let libevent free the request's and the response's
        header lists, which are on the wire already (about 1 KiB per held response).  The
        one thing evhttp still reads in them is whether to close the connection when the
        response ends, so that is noted on the exchange (HTTP/1.0 closes regardless)."""
        assert ex.req is not None
        r = RequestStruct.from_address(ex.req)
        find = self._lib.evhttp_find_header
        if any(
            (value := find(headers, b"Connection")) and asks_to_close(value.decode("latin-1"))
            for headers in (r.input_headers, r.output_headers)
        ):
            ex.close_at_end = True
        self._lib.evhttp_clear_headers(r.input_headers)
        self._lib.evhttp_clear_headers(r.output_headers)

    def release(self, ex: Exchange) -> None:
        """Stop holding ``ex``: forget its next stage's time, drop its subscriptions."""
        if ex.stage_due is not None:
            self._stages.discard(ex.stage_due, ex)
            ex.stage_due = None
        hold = ex.hold
        if hold is not None:
            ex.hold = None
            if type(hold) is ChannelWait and hold.due is not None:
                self._timeouts.discard(hold.due, ex)
                hold.due = None
            for channel in hold.channels:
                subscribers = self._subscribers.get(channel)
                if subscribers is not None:
                    subscribers.pop(ex, None)
                    if not subscribers:
                        del self._subscribers[channel]
            if type(hold) is Stream:
                self.streams.stop(ex, hold)

    def _subscribe(self, ex: Exchange, channels: list[str]) -> None:
        for i, channel in enumerate(channels):
            subscribers = self._subscribers.get(channel)
            if subscribers is None:
                subscribers = self._subscribers[channel] = Subscribers(channel)
            subscribers[ex] = None
            channels[i] = subscribers.channel

    def _wait_timed_out(self, ex: Exchange) -> None:
        wait = ex.hold
        assert type(wait) is ChannelWait
        self.release(ex)
        if self.max_hold and time.monotonic() - ex.started >= self.max_hold:
            ex.ending = True  # the timeout was COMET_MAX_HOLD's: this is its last answer
        self._answer_empty(ex, wait)

    def _answer_empty(self, ex: Exchange, wait: ChannelWait) -> None:
        """Answer a wait that has no event (its timeout, or the server stopping)."""
        events: list[Event] = []
        after = wait.after
        if wait.gap:  # (a render's only: see longpoll.py)
            # The answer tells of a gap with no event after it: from the same cursor,
            # the client's next poll would hear of it again, at every poll.  Its cursor
            # moves on to the newest id, past what is gone (an event whose fan-out is
            # still queued is answered now instead).
            events, after = hub.since_or_newest(wait.channels, after)
        self._wake(ex, wait, events, after, {})

    def _wake(
        self,
        ex: Exchange,
        wait: ChannelWait,
        events: list[Event] | None,
        after: int,
        rendered: dict[Any, bytes],
        gap: bool = False,
        trigger: Event | None = None,
    ) -> None:
        """A long-poll's wait is over (``events`` newer than ``after``, ``gap`` if some
        before them are gone; empty on timeout; None: look them up, with ``trigger``, the
        event being fanned out, which a short history may have let go already).  Run its
        stage with the first event, or answer with its rendering, shared through
        ``rendered`` by the waiters of one pass with the same rendering, channels and
        cursor (never one listening to other channels)."""
        if wait.resume is not None:
            if self._client_left(ex):
                return
            if events is None:
                events = hub.since(wait.channels, after)[0]
            self.server._resume(ex, wait.resume, events[0] if events else None)
            return
        assert wait.render is not None
        key = (wait.render, *wait.channels, after, wait.missed, wait.gap)
        body = rendered.get(key)
        if body is None:
            if events is None:
                events, gap = hub.since(wait.channels, after, wait.lost_mark)
                if trigger is not None:
                    if not events or trigger.id < events[0].id:
                        events.insert(0, trigger)
                    # The first event after the cursor: of the history, only what was
                    # lost after it counts (a short one may have let the trigger itself
                    # go); before it, what a broker's gap took while it waited.
                    gap = wait.missed or hub.since(wait.channels, trigger.id, wait.lost_mark)[1]
            events = poll_batch(events, gap or wait.gap, self.max_pending)  # (a burst)
            try:
                body = (
                    wait.render(events, after, gap=True)
                    if gap or wait.gap
                    else wait.render(events, after)
                )
            except Exception:  # the other waiters of this event are still answered
                logger.exception("Error rendering a long-poll's answer for %s", ex.path)
                self.server._abort(ex)
                return
            rendered[key] = body
        self.server._send_part(ex, body)
        self.server._end(ex)

    # -- events ------------------------------------------------------------------------

    def _fan_out(self, event: Event) -> None:
        subscribers = self._subscribers.get(event.channel)
        if not subscribers:
            return
        frame, size, event_id = event.frame, len(event.frame), event.id
        # Written straight into each stream's output buffer, framed here once: two C
        # calls per stream (its unsent length, the write), and consecutive events share
        # the buffer's blocks (each one handed to evhttp_send_reply_chunk took blocks of
        # its own: a slow reader of small events held many times its byte count).  A
        # stream's first chunk went through evhttp, which set the connection writing.
        chunk = chunked(frame)  # HTTP/1.1; HTTP/1.0 streams get it raw
        chunk_size = len(chunk)
        framing = chunk_size - size
        limit = self.max_pending
        pending, add = self._lib.evbuffer_get_length, self._lib.evbuffer_add
        rendered: dict[Any, bytes] = {}
        lost: int | None = None  # the channel's newest event let go, looked up if needed
        for ex in list(subscribers):
            if ex.cursor >= event_id:
                continue  # already sent (replayed or caught up)
            hold = ex.hold
            if type(hold) is ChannelWait:
                self.release(ex)
                if hold.render:
                    self._wake(ex, hold, None, ex.cursor, rendered, trigger=event)
                else:
                    self._wake(ex, hold, [event], ex.cursor, rendered)
                continue
            if type(hold) is Stream:
                if hold.behind:  # it catches up from the history, in order (streams.py)
                    if lost is None:
                        lost = hub.let_go_mark(event.channel)
                    if lost > max(ex.cursor, hold.lost_mark):
                        self.streams.drop_slow(ex)  # fallen a history behind: it never can
                    continue
                if pending(ex.outbuf) > limit + hold.backlog:
                    self.streams.fall_behind(ex, hold)
                    continue
                ex.cursor = event_id
                if ex.protocol == "HTTP/1.1":
                    add(ex.outbuf, chunk, chunk_size)
                    ex.framing += framing
                else:
                    add(ex.outbuf, frame, size)
                ex.sent += size

    def _tell_gap(self, channels: list[str] | None, through: int) -> None:
        """Events up to ``through`` on ``channels`` (None: any) will never come: every
        stream that may have wanted them gets the gap event now; a long-poll's answer
        says so with its next event (told alone, the gap would come back at once to
        a client that polls again from the same cursor)."""
        names = self._subscribers if channels is None else channels
        held = list({ex: None for c in names for ex in self._subscribers.get(c, ())})
        for ex in held:
            hold = ex.hold
            if ex.cursor >= through:
                continue
            if type(hold) is Stream:
                self.streams.say_gap(ex, hold, through)
            elif type(hold) is ChannelWait:
                hold.missed = True

    # -- shutdown and figures ----------------------------------------------------------

    def end_all(self) -> None:
        """Server stopping: end every held response with a proper last chunk.  SSE clients
        first get a ``retry:`` with jitter so that they do not all reconnect at once; a
        long-poll is answered as on its timeout (no event), so its client polls again."""
        for ex in list(self.server._exchanges.values()):
            if ex.state == "held":
                self._end_now(ex, ex.hold)  # (a timed stage's Deferral is not kept there)

    def _end_now(self, ex: Exchange, deferral: AnyDeferral | None) -> None:
        """End a response that would otherwise wait, properly: a stream with ``retry:``,
        a long-poll with what it has (usually nothing, as on its timeout), stages after
        the part already sent."""
        if type(deferral) is Stream:
            self.streams.end(ex)
        elif type(deferral) is ChannelWait:
            self.release(ex)
            ex.ending = True  # (for a stage run as on a timeout, that may wait again)
            if deferral.ready:
                self._wake(ex, deferral, deferral.ready, deferral.after, {})
            elif deferral.gap:
                self._answer_empty(ex, deferral)
            else:  # (published since its view looked: answered with those)
                self._wake(ex, deferral, None, deferral.after, {})
        else:
            self.server._end(ex)

    def stats(self) -> dict[str, Any]:
        return {
            "streams": len(self.streams),
            "channels": {name: len(subs) for name, subs in sorted(self._subscribers.items())},
            "events_published": hub.published,
            "streams_behind": self.streams.behind,
            "dropped_slow": self.streams.dropped_slow,
            "stages_delayed": self.stages_delayed,
        }

"""Held responses: staged timers, long-poll channel waits, SSE streams and their fan-out.

Loop thread only.  A held exchange has sent its headers and first content and waits:
- for a time (``Deferral``), then its next stage runs on a worker;
- on a channel (``ChannelWait``) until an event newer than its cursor arrives or the
  timeout passes, then its next stage runs with the event (or None);
- as a stream (``Stream``): every event of its channels is written to it as it comes.

Fan-out is one pass over a channel's subscribers with the event's frame encoded once;
per subscriber it is a cursor check and two C calls.  A stream whose unsent output is
over ``max_pending_output`` falls behind: it is written nothing more until it has taken
half of that, then it catches up from the channels' history.  One that falls a whole
history behind (an event it has not had is let go) is cut as a slow reader (and
counted).  So a burst larger than the bound (a broker's catch-up, a loop publishing in a
view under ``--threads 0``) reaches every client that reads, and nothing is ever
buffered without bound.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from typing import TYPE_CHECKING, Any

from .deadlines import Deadlines
from .deferral import AnyDeferral, ChannelWait, Deferral, Stream
from .hub import Event, gap_frame, heartbeat_frame, hub
from .libevent_ctypes import EV_READ
from .request import RequestStruct
from .wsgi import asks_to_close

if TYPE_CHECKING:
    from .exchange import Exchange
    from .loop import Handle
    from .server import Server

logger = logging.getLogger("django_comet.server")


def jittered_retry() -> bytes:
    """The last frame of a stream the server ends: reconnect in 1-5 s, spread out so
    that the clients of a stopping server do not all come back at once."""
    return b"retry: %d\n\n" % random.randint(1000, 5000)


def chunked(frame: bytes) -> bytes:
    """``frame`` as one chunk of HTTP/1.1's chunked coding."""
    return b"%x\r\n%b\r\n" % (len(frame), frame)


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

# How soon a stream that fell behind is looked at, to see whether it has taken half of
# its bound (then it catches up: 25 MiB/s at most at the default bound).  Each look that
# finds it has not doubles the wait, up to BEHIND_RECHECK_MAX: a slow reader is followed
# closely, and one that reads nothing costs next to nothing until the write timeout.
BEHIND_RECHECK = 0.02
BEHIND_RECHECK_MAX = 0.64


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
        # One timer for all streams: heartbeat events, and the end of streams held
        # longer than max_hold (swept every minute when heartbeats are off).
        self.heartbeat_interval = server.config.heartbeat or 60.0
        self.send_heartbeat = server.config.heartbeat > 0
        self.heartbeat = heartbeat_frame(self.heartbeat_interval)  # encoded once
        self.max_hold = server.config.max_hold
        self._subscribers: dict[str, Subscribers] = {}
        self._streams: dict[Exchange, None] = {}
        self.streams_behind = 0  # streams over their bound (Stream.behind)
        self._behind_checks = Deadlines(self.loop, self._check_behind, BEHIND_RECHECK / 2)
        self._heartbeat: Handle | None = None
        self.dropped_slow = 0
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
        self._behind_checks.close()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None

    # -- holding and releasing ---------------------------------------------------------

    def hold(self, ex: Exchange, deferral: AnyDeferral) -> None:
        server = self.server
        if self.max_hold and time.monotonic() - ex.started > self.max_hold:
            server._end(ex)  # a chain of stages that outlived its welcome
            return
        if server._draining:  # stopping: a response that would wait ends now instead
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
            ex.stage_due = self._stages.add(ex, delay, deferral.resume, delay)
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
        self._streams[ex] = None
        if self._heartbeat is None:
            self._heartbeat = self.loop.call_later(self.heartbeat_interval, self._beat)
        # Events published between the view's replay and now are in the hub already,
        # unless so many came that the oldest are gone: the client hears of that.
        events, gap = hub.since(deferral.channels, deferral.cursor, deferral.lost_mark)
        if gap:  # once told, only later losses are news (``events`` has all still kept)
            if deferral.told_gap:
                deferral.lost_mark = hub.lost_mark(deferral.channels)
            else:
                self._say_gap(ex, deferral, hub.lost_mark(deferral.channels))
        self._write_events(ex, deferral, events)

    def _stage_due(self, ex: Exchange, resume: Any, delay: float) -> None:
        """A stage's time has come: run it, unless its client has not taken the earlier
        parts yet (more than ``max_pending`` of them unsent).  Then the stage waits for
        it, checking again after another delay: a chain of stages to a slow reader holds
        that much at most (and the next part), and goes on at the reader's pace; one that
        reads nothing is cut by the write timeout, since nothing is written meanwhile."""
        if self._lib.evbuffer_get_length(ex.outbuf) > self.max_pending:
            self.stages_delayed += 1
            again = max(delay, STAGE_RECHECK_MIN)
            ex.stage_due = self._stages.add(ex, again, resume, delay)
            return
        self._resume(ex, resume)

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
            self._streams.pop(ex, None)
            if type(hold) is Stream and hold.behind:
                self._behind_no_more(ex, hold)
            if not self._streams and self._heartbeat is not None:
                self._heartbeat.cancel()  # no stream left: no timer left either
                self._heartbeat = None

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
        # Written straight into each stream's output buffer, framed here once: one C
        # call per stream, and consecutive events share the buffer's blocks (each one
        # handed to evhttp_send_reply_chunk took blocks of its own: a slow reader of
        # small events held many times its byte count).  A stream's first chunk went
        # through evhttp, which set the connection writing.
        chunk = chunked(frame)  # HTTP/1.1; HTTP/1.0 streams get it raw
        chunk_size = len(chunk)
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
                if hold.behind:  # it catches up from the history, in order (_check_behind)
                    if lost is None:
                        lost = hub.let_go_mark(event.channel)
                    if lost > max(ex.cursor, hold.lost_mark):
                        self._drop_slow(ex)  # fallen a history behind: it never can
                    continue
                if pending(ex.outbuf) > limit + hold.backlog:
                    self._fall_behind(ex, hold)
                    continue
                ex.cursor = event_id
                if ex.protocol == "HTTP/1.1":
                    add(ex.outbuf, chunk, chunk_size)
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
                self._say_gap(ex, hold, through)
            elif type(hold) is ChannelWait:
                hold.missed = True

    def _write(self, ex: Exchange, frame: bytes) -> bool:
        """One frame to a held stream (a gap, a heartbeat), as a stage's part is
        written: never through evhttp_send_reply_chunk, whose re-armed write timeout a
        heartbeat each interval would keep from ever cutting a client that reads
        nothing.  False if not written: the stream is (or falls) behind."""
        hold = ex.hold
        assert type(hold) is Stream
        if hold.behind:
            return False
        if self._lib.evbuffer_get_length(ex.outbuf) > self.max_pending + hold.backlog:
            self._fall_behind(ex, hold)
            return False
        self.server._send_part(ex, frame)
        return True

    def _say_gap(self, ex: Exchange, stream: Stream, through: int) -> None:
        """Tell a stream that events up to ``through`` are lost: now, or, behind, as it
        catches up, before the first event after them (a gap it was never told of would
        have it cut, as fallen a history behind)."""
        if through <= stream.lost_mark:
            return  # told already (as it caught up past it)
        stream.lost_mark = through
        if not self._write(ex, gap_frame(ex.cursor, stream.channels)):
            stream.unsaid_gap = max(stream.unsaid_gap, through)

    def _write_events(
        self, ex: Exchange, stream: Stream, events: list[Event], complete: bool = True
    ) -> None:
        """``events``, newer than its cursor and in order, to a stream while it is under
        its bound; past that it falls (or stays) behind, and takes the rest later.
        ``complete``: they are all there is, so a stream behind that takes them all has
        caught up."""
        pending, limit = self._lib.evbuffer_get_length, self.max_pending + stream.backlog
        for event in events:
            if pending(ex.outbuf) > limit:
                self._fall_behind(ex, stream)
                return
            if stream.unsaid_gap and event.id > stream.unsaid_gap:
                self._say_unsaid_gap(ex, stream)
            self.server._send_part(ex, event.frame)
            ex.cursor = event.id
        if not complete:
            return
        if stream.unsaid_gap:
            self._say_unsaid_gap(ex, stream)
        if stream.behind:  # caught up: events reach it as they come again
            self._behind_no_more(ex, stream)

    def _say_unsaid_gap(self, ex: Exchange, stream: Stream) -> None:
        stream.unsaid_gap = 0
        self.server._send_part(ex, gap_frame(ex.cursor, stream.channels))

    def _fall_behind(self, ex: Exchange, stream: Stream) -> None:
        if not stream.behind:
            stream.behind = True
            self.streams_behind += 1
            stream.recheck = self._behind_checks.add(ex, BEHIND_RECHECK, BEHIND_RECHECK)

    def _behind_no_more(self, ex: Exchange, stream: Stream) -> None:
        stream.behind = False
        self.streams_behind -= 1
        if stream.recheck is not None:
            self._behind_checks.discard(stream.recheck, ex)
            stream.recheck = None

    def _check_behind(self, ex: Exchange, waited: float) -> None:
        """A stream behind: once it has taken half its bound it catches up from the
        history, unless it has fallen a history behind (an event it has not had was let
        go; the fan-out finds most of those first): that one is cut as a slow reader.
        One that takes nothing is cut by the write timeout."""
        stream = ex.hold
        assert type(stream) is Stream
        stream.recheck = None
        if self._lib.evbuffer_get_length(ex.outbuf) > self.max_pending // 2 + stream.backlog:
            wait = min(2 * waited, BEHIND_RECHECK_MAX)
            stream.recheck = self._behind_checks.add(ex, wait, wait)
            return
        events, fallen, gap, complete = hub.catch_up(
            stream.channels, ex.cursor, stream.lost_mark, self.max_pending
        )
        if fallen:
            self._drop_slow(ex)
            return
        if gap:  # a broker's: told in its place, whether or not its news came yet
            stream.lost_mark = gap
            stream.unsaid_gap = max(stream.unsaid_gap, gap)
        self._write_events(ex, stream, events, complete)
        if stream.behind:
            stream.recheck = self._behind_checks.add(ex, BEHIND_RECHECK, BEHIND_RECHECK)

    def _drop_slow(self, ex: Exchange) -> None:
        self.dropped_slow += 1
        self.server._abort(ex)

    def _beat(self) -> None:
        self._heartbeat = None
        too_old = time.monotonic() - self.max_hold if self.max_hold else None
        for ex in list(self._streams):
            if too_old is not None and ex.started < too_old:
                self._end_stream(ex)
            elif self.send_heartbeat and not self._lib.evbuffer_get_length(ex.outbuf):
                self._write(ex, self.heartbeat)  # (a stream with bytes to send is not idle)
        if self._streams:
            self._heartbeat = self.loop.call_later(self.heartbeat_interval, self._beat)

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
            self._end_stream(ex)
        elif type(deferral) is ChannelWait:
            self.release(ex)
            self._wake(ex, deferral, deferral.ready or None, deferral.after, {})
        else:
            self.server._end(ex)

    def _end_stream(self, ex: Exchange) -> None:
        self.server._send_chunk(ex, jittered_retry())
        self.server._end(ex)

    def stats(self) -> dict[str, Any]:
        return {
            "streams": len(self._streams),
            "channels": {name: len(subs) for name, subs in sorted(self._subscribers.items())},
            "events_published": hub.published,
            "streams_behind": self.streams_behind,
            "dropped_slow": self.dropped_slow,
            "stages_delayed": self.stages_delayed,
        }

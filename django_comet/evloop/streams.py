"""Held SSE streams: every event of their channels written in order, within a bound.

Loop thread only.  Events are written into each stream's output buffer as the fan-out
(holding.py) passes them, the SSE frame encoded once for all.  A stream whose unsent
output is over ``max_pending_output`` falls behind: it is written nothing more until it
has taken half of that, then it catches up from the channels' history, a bound's worth
at a time.  One that falls a whole history behind (an event it has not had is let go)
is cut as a slow reader (and counted).  So a burst larger than the bound (a broker's
catch-up, a loop publishing in a view under ``--threads 0``) reaches every client that
reads, and nothing is ever buffered without bound.  Gaps (events lost to a broker's
outage, or let go before a stream could have them) are told in order with the events,
and one timer beats for all streams.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .deadlines import Deadlines
from .deferral import Stream
from .frames import gap_frame, heartbeat_frame, jittered_retry
from .hub import Event, hub

if TYPE_CHECKING:
    from .exchange import Exchange
    from .loop import Handle
    from .server import Server


# How soon a stream that fell behind is looked at, to see whether it has taken half of
# its bound (then it catches up: 25 MiB/s at most at the default bound).  Each look that
# finds it has not doubles the wait, up to BEHIND_RECHECK_MAX: a slow reader is followed
# closely, and one that reads nothing costs next to nothing until the write timeout.
BEHIND_RECHECK = 0.02
BEHIND_RECHECK_MAX = 0.64


class Streams:
    def __init__(self, server: Server):
        self.server = server
        self.loop = server.loop
        self._lib = server._lib
        self.max_pending = server.config.max_pending_output
        self.max_hold = server.config.max_hold
        # One timer for all streams: heartbeat events, and the end of streams held
        # longer than max_hold (swept every minute when heartbeats are off).
        self.heartbeat_interval = server.config.heartbeat or 60.0
        self.send_heartbeat = server.config.heartbeat > 0
        self.heartbeat = heartbeat_frame(self.heartbeat_interval)  # encoded once
        self._heartbeat: Handle | None = None
        self._streams: dict[Exchange, None] = {}
        self.behind = 0  # streams over their bound (Stream.behind)
        self._behind_checks = Deadlines(self.loop, self._check_behind, BEHIND_RECHECK / 2)
        self.dropped_slow = 0

    def __len__(self) -> int:
        return len(self._streams)

    def close(self) -> None:
        self._behind_checks.close()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None

    def start(self, ex: Exchange, stream: Stream) -> None:
        """A stream held (its exchange subscribed to its channels): events published
        between the view's replay and now, and those of a replay too large for its
        first content, are in the hub already, unless so many came that some are gone:
        the client hears of that (past its first content, any loss is news)."""
        self._streams[ex] = None
        if self._heartbeat is None:
            self._heartbeat = self.loop.call_later(self.heartbeat_interval, self._beat)
        events, gap = hub.since(stream.channels, stream.cursor, stream.lost_mark)
        if gap:  # (``events`` has all still kept)
            self.say_gap(ex, stream, hub.lost_mark(stream.channels))
        self.write_events(ex, stream, events)

    def stop(self, ex: Exchange, stream: Stream) -> None:
        """A stream no longer held (it ended, or its client left)."""
        self._streams.pop(ex, None)
        if stream.behind:
            self._behind_no_more(ex, stream)
        if not self._streams and self._heartbeat is not None:
            self._heartbeat.cancel()  # no stream left: no timer left either
            self._heartbeat = None

    def write(self, ex: Exchange, frame: bytes) -> bool:
        """One frame to a held stream (a gap, a heartbeat), as a stage's part is
        written: never through evhttp_send_reply_chunk, whose re-armed write timeout a
        heartbeat each interval would keep from ever cutting a client that reads
        nothing.  False if not written: the stream is (or falls) behind."""
        hold = ex.hold
        assert type(hold) is Stream
        if hold.behind:
            return False
        if self._lib.evbuffer_get_length(ex.outbuf) > self.max_pending + hold.backlog:
            self.fall_behind(ex, hold)
            return False
        self.server._send_part(ex, frame)
        return True

    def say_gap(self, ex: Exchange, stream: Stream, through: int) -> None:
        """Tell a stream that events up to ``through`` are lost: now, or, behind, as it
        catches up, before the first event after them (a gap it was never told of would
        have it cut, as fallen a history behind)."""
        if through <= stream.lost_mark:
            return  # told already (as it caught up past it)
        stream.lost_mark = through
        if stream.gap_told_at == ex.cursor and through <= stream.gap_told_through:
            return  # its last gap event told of it (a run of losses known then)
        if self.write(ex, gap_frame(ex.cursor, stream.channels)):
            self._told_gap(ex, stream, through)
        else:
            stream.unsaid_gap = max(stream.unsaid_gap, through)

    @staticmethod
    def _told_gap(ex: Exchange, stream: Stream, through: int) -> None:
        stream.gap_told_at = ex.cursor
        stream.gap_told_through = max(through, hub.last_id, hub.heard_id)

    def write_events(
        self, ex: Exchange, stream: Stream, events: list[Event], complete: bool = True
    ) -> None:
        """``events``, newer than its cursor and in order, to a stream while it is under
        its bound; past that it falls (or stays) behind, and takes the rest later.
        ``complete``: they are all there is, so a stream behind that takes them all has
        caught up."""
        pending, limit = self._lib.evbuffer_get_length, self.max_pending + stream.backlog
        for event in events:
            if pending(ex.outbuf) > limit:
                self.fall_behind(ex, stream)
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
        through, stream.unsaid_gap = stream.unsaid_gap, 0
        if stream.gap_told_at != ex.cursor or through > stream.gap_told_through:
            self._told_gap(ex, stream, through)
            self.server._send_part(ex, gap_frame(ex.cursor, stream.channels))

    def fall_behind(self, ex: Exchange, stream: Stream) -> None:
        if not stream.behind:
            stream.behind = True
            self.behind += 1
            stream.recheck = self._behind_checks.add(ex, BEHIND_RECHECK, BEHIND_RECHECK)

    def _behind_no_more(self, ex: Exchange, stream: Stream) -> None:
        stream.behind = False
        self.behind -= 1
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
            self.drop_slow(ex)
            return
        if gap:  # a broker's: told in its place, whether or not its news came yet
            stream.lost_mark = gap
            stream.unsaid_gap = max(stream.unsaid_gap, gap)
        self.write_events(ex, stream, events, complete)
        if stream.behind:
            stream.recheck = self._behind_checks.add(ex, BEHIND_RECHECK, BEHIND_RECHECK)

    def drop_slow(self, ex: Exchange) -> None:
        self.dropped_slow += 1
        self.server._abort(ex)

    def _beat(self) -> None:
        self._heartbeat = None
        too_old = time.monotonic() - self.max_hold if self.max_hold else None
        for ex in list(self._streams):
            if too_old is not None and ex.started < too_old:
                self.end(ex)
            elif self.send_heartbeat and not self._lib.evbuffer_get_length(ex.outbuf):
                self.write(ex, self.heartbeat)  # (a stream with bytes to send is not idle)
        if self._streams:
            self._heartbeat = self.loop.call_later(self.heartbeat_interval, self._beat)

    def end(self, ex: Exchange) -> None:
        self.server._send_chunk(ex, jittered_retry())
        self.server._end(ex)

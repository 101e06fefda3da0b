"""The loop-thread side of a response sent in pieces: files by descriptor, streamed and
held responses chunk by chunk, their clean end or their cut.  Mixed into ``Server``, as
``Producer`` (the worker side) is; the head and whole replies are ``whole_replies.py``'s.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from . import libevent_ctypes as ev
from .connections import shutdown_socket
from .deferral import AnyDeferral
from .frames import chunked
from .request import REQUEST_CHUNKED, RequestStruct
from .start_response import carries_body
from .whole_replies import SMALL_BODY, SMALL_CHUNK, WholeReplies

if TYPE_CHECKING:
    from .exchange import Exchange
    from .files import Descriptor
    from .holding import Holder
    from .loop import Loop
    from .producer import DrainGate
    from .start_response import StartResponse
    from .workers import ThreadPool

logger = logging.getLogger("django_comet.server")


class Responder(WholeReplies):
    """Mixed into ``Server``; every method here runs on the loop thread."""

    holder: Holder
    held: int
    loop: Loop
    _exchanges: dict[int, Exchange]
    _let_go: int
    _pool: ThreadPool | None
    _resuming = False  # --threads 0: a stage runs in the loop thread right now
    _close_cb: Any
    _drained_cb: Any
    _file_sent_cb: Any
    # Methods of Producer.
    _run_stage: Callable[..., None]
    _pump: Callable[[Exchange], None]
    _stop_pump: Callable[[Exchange], None]

    def _reply_file(
        self, ex: Exchange, start: StartResponse, file: Descriptor, offset: int, count: int
    ) -> None:
        """Send ``count`` bytes of ``file`` from ``offset``: libevent queues the range
        and the kernel copies it to the socket as the client reads.  The exchange lives
        until the last byte left, so a vanished client, the access log and a graceful
        stop see it as they see a stream."""
        if ex.dead:
            file.close()
            return self._drop(ex)
        segment = None
        if carries_body(ex.method, start.code):
            flags = ev.EVBUF_FS_CLOSE_ON_FREE | ev.EVBUF_FS_DISABLE_LOCKING
            segment = self._lib.evbuffer_file_segment_new(file.fd, offset, count, flags)
            if not segment:
                file.close()
                logger.error("%s %s: libevent could not map the file", ex.method, ex.path)
                return self._reply_error(ex)
            file.release()  # the segment closes it when freed
        else:
            file.close()
        if carries_body("GET", start.code):
            start.length = count  # the file's (file_range checked it against the app's)
        ex.state = "streaming"
        if not self._begin_chunked(ex, start, [], keep_length=True):
            if segment is not None:
                self._lib.evbuffer_file_segment_free(segment)  # closes the fd
            return
        if segment is None:
            return self._end(ex)
        added = self._lib.evbuffer_add_file_segment(self._buf, segment, 0, count)
        self._lib.evbuffer_file_segment_free(segment)  # the buffer holds it (and the fd) now
        if added != 0:
            logger.error("%s %s: libevent could not queue the file", ex.method, ex.path)
            return self._abort(ex)
        ex.sent = count
        self._lib.evhttp_send_reply_chunk_with_cb(ex.req, self._buf, self._file_sent_cb, ex.key)
        self._stop_reading(ex)
        self._check_handed_over(ex)

    def _on_file_sent(self, _evcon: int, key: int) -> None:
        ex = self._exchanges.get(key)
        if ex is not None and not ex.dead and ex.req is not None:
            self._end(ex)

    def _begin_chunked(
        self,
        ex: Exchange,
        start: StartResponse,
        chunks: list[bytes],
        *,
        keep_length: bool,
        then_drain: bool = False,
    ) -> bool:
        """Send the head and first chunk; False (and released) if the client is gone."""
        assert ex.req is not None
        r = RequestStruct.from_address(ex.req)
        if not r.evcon:
            ex.dead = True
            self._drop(ex)
            return False
        self._lib.evhttp_connection_set_closecb(r.evcon, self._close_cb, ex.key)
        self._add_headers(r, start, start.length if keep_length else None)
        if (
            ex.method == "HEAD"
            and (r.major, r.minor) >= (1, 1)
            and not (keep_length and start.length is not None)
            and carries_body("GET", start.code)
        ):
            # The framing a GET would get (RFC 9112 6.1 allows it; evhttp adds none to a
            # HEAD's): seeing none, Node's http client closed its keep-alive connection.
            self._lib.evhttp_add_header(r.output_headers, b"Transfer-Encoding", b"chunked")
        if (
            (r.major, r.minor) < (1, 1)
            and not (keep_length and start.length is not None)
            and not (start.close or self._draining)  # (said so already)
            and carries_body(ex.method, start.code)  # (a HEAD's, a 304's: none goes out)
        ):
            # HTTP/1.0 has no chunked coding: a body of unknown length ends with the
            # connection.  (evhttp would otherwise answer a keep-alive 1.0 request with a
            # wrong "Content-Length: 0".)
            self._say_close(r)
        ex.code = start.code
        if keep_length and carries_body(ex.method, start.code):
            ex.limit = start.length
        self._lib.evhttp_send_reply_start(ex.req, start.code, start.reason)
        if not ex.deferred:
            self._stop_reading(ex)
        if chunks:
            self._send_chunk(ex, b"".join(chunks), then_drain=then_drain, flush=then_drain)
        return True

    def _start_stream(self, ex: Exchange, start: StartResponse, chunks: list[bytes]) -> None:
        if ex.dead:
            return self._drop(ex)
        ex.state = "streaming"
        # With --threads 0 the loop thread asks the body for more once this has left
        # (Producer._pump): written at once, or awaited.
        inline = self._pool is None
        self._begin_chunked(ex, start, chunks, keep_length=True, then_drain=inline)

    def _start_deferred(
        self, ex: Exchange, start: StartResponse, chunks: list[bytes], deferral: AnyDeferral
    ) -> None:
        if ex.dead:
            return self._drop(ex)
        ex.deferred = True  # from its first chunk on: it goes on reading (_stop_reading)
        self.held += 1
        # Later stages add content, so the first stage's length is not the body's.
        if not self._begin_chunked(ex, start, chunks, keep_length=False):
            return
        if not carries_body(ex.method, start.code):
            # The head is all a HEAD, a 204 or a 304 gets: no stages, no stream (evhttp
            # would refuse their chunks and leave them in the shared buffer).
            return self._end(ex)
        self._hold(ex, deferral)

    def _resume(self, ex: Exchange, resume: Callable[..., Iterable[bytes]], *args: Any) -> None:
        """A held exchange's wait is over: run its next stage."""
        ex.stage_due = None
        ex.state = "app"
        if self._pool is not None:
            self._pool.submit(self._run_stage, ex, resume, args)
        elif self._resuming:
            # A wait over at once (its events in the history) asked for by a stage run
            # here: its stage runs from the loop, not deeper in this stack, where a chain
            # of them recursed until RecursionError.
            self.loop.call_soon(self._run_stage, ex, resume, args)
        else:
            self._resuming = True
            try:
                self._run_stage(ex, resume, args)
            finally:
                self._resuming = False

    def _stage_done(self, ex: Exchange, chunks: list[bytes], deferral: AnyDeferral | None) -> None:
        if ex.dead:
            return self._drop(ex)
        if chunks:
            self._send_part(ex, b"".join(chunks))
        if deferral is not None:  # (stopping, it ends as its kind of wait does: Holder.hold)
            self._hold(ex, deferral)
        else:
            self._end(ex)

    def _hold(self, ex: Exchange, deferral: AnyDeferral) -> None:
        """Hold the response until its deferral says; a deferral the server cannot
        hold (one its application built wrong) cuts it rather than leave it held."""
        try:
            self.holder.hold(ex, deferral)
        except Exception:
            logger.exception("%s %s: could not hold the response; cutting it", ex.method, ex.path)
            self._abort(ex)

    def _pause_stream(self, ex: Exchange, data: bytes, gate: DrainGate) -> None:
        """Send the chunk that took a streamed body past the write high-water mark; its
        drain lets the worker waiting at ``gate`` go on (``_on_drained``).  If it cannot
        go out (the client left, the body reached its Content-Length), the body ends
        here."""
        ex.pump = gate
        try:
            sent = self._send_chunk(ex, data)
            if not sent and not ex.dead and ex.req is not None:
                self._end(ex)  # closes the connection if the body was cut short
        except BaseException:
            # Its worker must not wait for a drain that never comes, nor its client for
            # bytes that never come.
            self._stop_pump(ex)
            self._abort(ex)
            raise
        if not sent:
            self._stop_pump(ex)

    def _give_up(self, ex: Exchange, gate: DrainGate, crowded: bool = False) -> None:
        """A paused body holding a view thread (no spare was left) has waited for its
        client ``COMET_TIMEOUT`` in all, or ``crowded``: while requests waited for a
        thread and none took one.  Cut it, unless its bytes have left meanwhile (decided
        here, where the drain is: its worker goes on then)."""
        if ex.pump is not gate:
            return
        why = (
            "fell behind while requests waited for a thread"
            if crowded
            else f"was {self.config.timeout:g} s behind in all"
        )
        logger.warning(
            "%s %s: its client %s, with no view thread to spare; cutting the response",
            ex.method,
            ex.path,
            why,
        )
        self._stop_pump(ex)
        self._abort(ex)

    def _send_chunk(
        self, ex: Exchange, data: bytes, *, then_drain: bool = False, flush: bool = False
    ) -> bool:
        """Hand ``data`` to evhttp as the next chunk; False if none of it can go.
        ``then_drain``: ``_on_drained`` is to be called once it has left (``--threads 0``
        pumping a body), unless ``flush`` writes all of it to the socket at once."""
        # The buffer is shared by every response, and evhttp leaves in it what it would
        # not send (a HEAD's or a 304's body, a gone client's): never hand such bytes over.
        if ex.dead or ex.req is None or not carries_body(ex.method, ex.code):
            return False
        if ex.limit is not None and ex.sent + len(data) > ex.limit:
            # Bytes past the Content-Length would be read as the next response.
            if not ex.close_at_end:
                logger.error(
                    "%s %s: the body runs past its Content-Length %d; cut there, closing",
                    ex.method,
                    ex.path,
                    ex.limit,
                )
                ex.close_at_end = True
            data = data[: ex.limit - ex.sent]
            if not data:
                return False
        lib = self._lib
        size = len(data)
        chunking = ex.limit is None and ex.protocol == "HTTP/1.1"
        drained_cb = then_drain or (
            ex.pump is not None and ex.pending > self.config.write_high_water
        )
        if size <= SMALL_CHUNK and flush and self._write_at_once(ex, data, chunking):
            return True
        if size <= SMALL_CHUNK and not drained_cb:
            # Straight into the connection's output buffer, framed here, as held
            # responses' parts are: small items share its blocks.  Handed to evhttp,
            # each took a block of its own, 1 KiB or more: a body of small items to a
            # client that reads slowly held a thousand times its unsent bytes.
            bev = self._bufferevent_of(ex)
            if not bev:
                return False
            ex.sent += size
            if chunking:
                data = chunked(data)
                ex.framing += len(data) - size
            lib.bufferevent_write(bev, data, len(data))
            return True
        ex.sent += size
        if chunking:
            ex.framing += len(b"%x" % size) + 4  # evhttp's: the size line, the CRLF after
        self._hand_over(ex, data, drained_cb)
        if flush and ex.awaiting_drain and self._flush(ex):
            ex.awaiting_drain = False  # (then evhttp has nothing to write, nor to call)
            ex.pending = 0
        return True

    def _bufferevent_of(self, ex: Exchange) -> int:
        """The bufferevent of the exchange's connection; 0 once the connection is gone."""
        if ex.conn:
            return ex.conn
        assert ex.req is not None
        evcon = RequestStruct.from_address(ex.req).evcon
        return self._lib.evhttp_connection_get_bufferevent(evcon) if evcon else 0

    def _write_at_once(self, ex: Exchange, data: bytes, chunking: bool) -> bool:
        """A small item of a body pumped with ``--threads 0``, written to the socket by
        this thread, with no call into libevent but a look at the output, when nothing
        is queued before it: one system call.  What the socket does not take goes to
        evhttp, with ``_on_drained`` to call once it has left (then the pump goes on).
        False: something is queued (the item goes after it, the usual way)."""
        lib = self._lib
        bev = self._bufferevent_of(ex)
        if not bev:
            return False
        if lib.evbuffer_get_length(lib.bufferevent_get_output(bev)):
            return False
        framed = chunked(data) if chunking else data
        try:
            written = os.write(lib.bufferevent_getfd(bev), framed)
        except OSError:  # (full, or the client gone: libevent finds out and says so)
            written = 0
        ex.sent += len(data)
        ex.framing += len(framed) - len(data)
        if written == len(framed):
            ex.awaiting_drain = False
            ex.pending = 0
            return True
        # The rest, already framed, through evhttp (which frames what the request says
        # is chunked: not this), to be told once it has left.
        assert ex.req is not None
        r = RequestStruct.from_address(ex.req)
        bits = r.bits
        r.bits = bits & ~REQUEST_CHUNKED
        try:
            self._hand_over(ex, framed[written:], True)
        finally:
            r.bits = bits
        return True

    def _hand_over(self, ex: Exchange, data: bytes, drained_cb: bool) -> None:
        """``data`` to evhttp as the response's next piece (framed by evhttp when the
        response is chunked); with ``drained_cb``, ``_on_drained`` is called once the
        connection's output has emptied: the stream pauses on it."""
        lib = self._lib
        lib.evbuffer_add(self._buf, data, len(data))
        if drained_cb:
            lib.evhttp_send_reply_chunk_with_cb(ex.req, self._buf, self._drained_cb, ex.key)
        else:
            lib.evhttp_send_reply_chunk(ex.req, self._buf)
        if not ex.deferred:
            self._stop_reading(ex)
        refused = self._check_handed_over(ex)
        ex.awaiting_drain = drained_cb and not refused

    def _flush(self, ex: Exchange) -> bool:
        """Write what the connection's output holds to its socket now; whether all of it
        went.  What the socket does not take (its buffer is full) libevent writes once
        it can, as always."""
        lib = self._lib
        bev = self._bufferevent_of(ex)
        if not bev:
            return False
        out = lib.bufferevent_get_output(bev)
        # (Its front is frozen to any writer but the bufferevent's own: thawed for this
        # one, as in _abort.  Frozen, evbuffer_write wrote nothing once libevent had.)
        lib.evbuffer_unfreeze(out, 1)
        try:
            lib.evbuffer_write(out, lib.bufferevent_getfd(bev))
        finally:
            lib.evbuffer_freeze(out, 1)
        return not lib.evbuffer_get_length(out)

    def _send_part(self, ex: Exchange, data: bytes) -> None:
        """A held response's next part (a stage's content, a stream's frame, a long-poll's
        answer), written as fan-out writes events: straight into its connection's output
        buffer.
        evhttp_send_reply_chunk re-arms the write timeout, so a chain of stages (or a
        stream's heartbeats) to a client that reads nothing was never cut by it, and
        piled its output up until COMET_MAX_HOLD."""
        if ex.outbuf is None or ex.req is None or not data:
            self._send_chunk(ex, data)
            return
        framed = chunked(data) if ex.protocol == "HTTP/1.1" else data
        self._lib.evbuffer_add(ex.outbuf, framed, len(framed))
        ex.sent += len(data)
        ex.framing += len(framed) - len(data)

    def _check_handed_over(self, ex: Exchange) -> bool:
        """The shared buffer must be empty after each hand-over: bytes evhttp refused
        would otherwise go out in the next response, to whichever client that is.
        Whether it refused some."""
        left = self._lib.evbuffer_get_length(self._buf)
        if left:
            self._lib.evbuffer_drain(self._buf, left)
            logger.error("%s %s: evhttp refused %d bytes; dropped", ex.method, ex.path, left)
        return bool(left)

    def _on_drained(self, _evcon: int, key: int) -> None:
        ex = self._exchanges.get(key)
        if ex is None or not ex.awaiting_drain:
            # evhttp leaves its callback set: it is called again whenever the output
            # empties after other writes (small chunks, items written at once).
            return
        ex.awaiting_drain = False
        if ex.pump is None:
            return  # (the first part of a body that write() began: the app goes on)
        ex.pending = 0
        if isinstance(ex.pump, tuple):  # (--threads 0)
            self._pump(ex)
        else:  # a paused body: its worker goes on
            gate, ex.pump = ex.pump, None
            gate.open(True)

    def _end(self, ex: Exchange) -> None:
        """The last chunk: a clean end of the response."""
        if ex.dead or ex.req is None:  # (ended already: a body that went on past its end)
            return self._drop(ex)
        if ex.limit is not None and ex.sent < ex.limit:
            # Kept open, the client would wait for the missing bytes (or read the next
            # response as them): close once what was sent has left, so that it sees a
            # body cut short.
            logger.error(
                "%s %s: the body ended %d bytes short of its Content-Length; closing",
                ex.method,
                ex.path,
                ex.limit - ex.sent,
            )
            ex.close_at_end = True
        self.holder.release(ex)
        self._restore_read_timeout(ex)
        req = ex.req
        assert req is not None
        if ex.close_at_end or self._draining:  # evhttp decides from the headers
            self._say_close(RequestStruct.from_address(req))
        # Finished first: when the output is already flushed, evhttp frees the request,
        # and the connection if it is to close, inside this call; the close callback
        # must then find nothing of ours left to release.
        ex.req = None
        self._finish(ex, req if self._unsent(ex) > SMALL_BODY else None)
        # A chunked one's last chunk is written with reading on again: not reading after
        # it.  Any other not before the call: a response already out when it returns has
        # evhttp reading the next request by then.
        last_chunk = (
            ex.limit is None and ex.protocol == "HTTP/1.1" and carries_body(ex.method, ex.code)
        )
        if not last_chunk:
            self._stop_reading(ex)
        self._lib.evhttp_send_reply_end(req)
        if last_chunk:
            self._stop_reading(ex)

    def _unsent(self, ex: Exchange) -> int:
        """Bytes of the response still in its connection's output buffer.  What fits in
        the socket's buffers leaves at once, so the keep-alive deadline may run from now
        without a call from evhttp when it is out (a publish ends thousands of long-polls
        at once)."""
        lib = self._lib
        if ex.outbuf is not None:
            unsent: int = lib.evbuffer_get_length(ex.outbuf)
        elif ex.conn:
            unsent = lib.evbuffer_get_length(lib.bufferevent_get_output(ex.conn))
        else:
            unsent = 0
        return unsent

    def _abort(self, ex: Exchange) -> None:
        """Cut the connection so the client sees an error, never a clean end.  What is
        queued for it goes to the socket first, as much as the socket takes now, so
        that the client sees the response cut short rather than no response at all.
        libevent notices the shut-down socket by reading (on again: ``_stop_reading``
        may have turned it off, and with nothing left to write nothing else would
        notice; a held one's cap on its input too, which suspends reading once its
        client has sent that much) and the close callback releases the exchange."""
        if ex.dead or ex.req is None:
            return self._drop(ex)
        if ex.state == "aborting":
            return  # (cut already: write() raising ClientGone after a cut asks again)
        ex.code = ex.code or 500
        evcon = RequestStruct.from_address(ex.req).evcon
        if not evcon:  # the client left already
            ex.dead = True
            return self._drop(ex)
        ex.state = "aborting"  # no worker owns it now: the close callback releases it
        self.holder.release(ex)
        bev = self._lib.evhttp_connection_get_bufferevent(evcon)
        if ex.deferred:
            self._lib.bufferevent_setwatermark(bev, ev.EV_READ, 0, 0)  # (Holder.hold)
        self._lib.bufferevent_enable(bev, ev.EV_READ)
        fd = self._lib.bufferevent_getfd(bev)
        if fd >= 0:
            # A socket bufferevent's output is drained by its own writes only: its front
            # is frozen to anyone else (evbuffer_write fails), so thawed for this one.
            out = self._lib.bufferevent_get_output(bev)
            self._lib.evbuffer_unfreeze(out, 1)
            # Let go of here as much as the close lets go of what is left (the socket
            # may take megabytes: libevent's own writes take 16 KiB a pass).
            self._let_go += max(0, self._lib.evbuffer_write(out, fd))
            self._lib.evbuffer_freeze(out, 1)
        shutdown_socket(fd)

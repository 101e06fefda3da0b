"""The worker-thread side of the server: run the application, iterate its response, and
hand each piece to the loop thread (``Server._to_loop``).  With ``--threads 0`` the same
code runs in the loop thread and hands over by a direct call.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .content_coding import without_content_coding
from .deferral import ANNOUNCED, began, claim, claim_announced
from .files import Descriptor, FileWrapper
from .interrupt import StopNow
from .start_response import AppError, StartResponse, carries_body

if TYPE_CHECKING:
    from .config import ServerConfig
    from .exchange import Exchange
    from .server import WSGIApp
    from .workers import ThreadPool

logger = logging.getLogger("django_comet.server")


def _client(ex: Exchange) -> dict[str, str]:
    """A request's error record names its client, as its access record does."""
    return {"remote_addr": ex.remote}


_END = object()  # a body's end, from next()

# Seconds between a paused body's worker's looks at whether its exchange is still on.
GATE_SLICE = 0.25

# A held response's part (the first response of a deferral, each stage's content) is
# read whole before it goes out, as one chunk: past this, it is cut as an app error (an
# endless generator returned as a stage grew memory without bound, holding its thread).
HELD_PART_LIMIT = 16 * 1024 * 1024

# Seconds a paused body holding a view thread (no spare left) waits for its client while
# requests wait and no thread takes one, before it is cut.
CROWDED_WAIT = 1.0

# What a streamed item adds to the connection's buffer beside its bytes (a chunk's size
# line and CRLF), counted in its unsent bytes: a body of tiny items holds its bound too.
CHUNK_FRAMING = 8

# --threads 0: bytes of a lazy body pumped in a row, each item written to its socket at
# once, before the loop thread waits for them to leave and serves the others meanwhile;
# an item counts at least PUMP_ITEM_COST (its system call and its Python: 65,536 items
# of a byte each held the loop for a second).
PUMP_BUDGET = 64 * 1024
PUMP_ITEM_COST = 256

# Iterators of bodies whose every item is there already: iterating them never waits.
_ALL_THERE: tuple[type, ...] = (type(iter([])), type(iter(())))


class Producer:
    """Mixed into ``Server``; every method here may run on a worker thread and touches
    libevent only through ``_to_loop``."""

    app: WSGIApp
    config: ServerConfig
    _pool: ThreadPool | None
    _to_loop: Callable[..., None]
    _in_app: bool  # see interrupt.py
    # Loop-thread methods of Server that results are handed to.
    _reply_whole: Callable[..., None]
    _reply_error: Callable[..., None]
    _reply_file: Callable[..., None]
    _sends_files: bool
    _start_stream: Callable[..., None]
    _start_deferred: Callable[..., None]
    _stage_done: Callable[..., None]
    _send_chunk: Callable[..., bool]
    _pause_stream: Callable[..., None]
    _give_up: Callable[..., None]
    _end: Callable[..., None]
    _abort: Callable[..., None]
    _drop: Callable[..., None]

    def _run_app(self, ex: Exchange) -> None:
        if ex.dead:  # its client left while it waited for a thread, or the server stopped
            self._to_loop(self._drop, ex)  # (no view runs: its answer could go nowhere)
            return
        start = StartResponse(functools.partial(self._send_written, ex, threading.get_ident()))
        self._in_app = True
        try:
            result = self.app(ex.environ, start)
        except StopNow:
            raise
        except ClientGone:  # from write(): the response is over already
            self._in_app = False
            self._to_loop(self._abort, ex)
            return
        except BaseException:  # SystemExit from a view too: an app error
            self._in_app = False
            logger.exception(
                "Error running WSGI application for %s %s", ex.method, ex.path, extra=_client(ex)
            )
            # (Once write() has sent the head, the client must see the response cut.)
            self._to_loop(self._abort if start.headers_sent else self._reply_error, ex)
            return
        finally:
            self._in_app = False
        self._produce(ex, start, result, first=True)

    def _send_written(self, ex: Exchange, thread: int, start: StartResponse, data: bytes) -> None:
        """write() (PEP 3333): the first sends the head, and the bytes go out while the
        app goes on, as a streamed body's items do: paused in the app's thread while
        more than ``write_high_water`` bytes are unsent (with ``--threads 0``, queued:
        they leave once the app hands the loop thread back).  Raises ClientGone once
        the response is over (its client left, it was cut), so that the app stops.

        Only from the thread running the app (and its body): from another, the bytes
        would race the app's own, and with ``--threads 0`` reach libevent from outside
        the loop thread."""
        if threading.get_ident() != thread:
            raise AppError("write() called from a thread other than the application's")
        if start.over:
            raise ClientGone(ex)
        in_app, self._in_app = self._in_app, False  # the server's own work (interrupt.py)
        try:
            if not start.headers_sent:
                start.headers_sent = True
                # What the body yielded before (write() inside its generator) goes first.
                chunks, start.written = start.written, []
                self._to_loop(self._start_stream, ex, start, chunks)
            if data and carries_body(ex.method, start.code) and not self._pass_on(ex, data):
                start.over = True
                raise ClientGone(ex)
        finally:
            self._in_app = in_app

    def _produce(
        self, ex: Exchange, start: StartResponse, result: Iterable[bytes], first: bool
    ) -> None:
        """Iterate one stage's output and hand it to the loop; always close the result."""
        deferral = None
        announced = None  # a deferral claimed from the environ (deferral.py)
        streaming = False
        pumped = False  # --threads 0: the loop thread goes on iterating it, then closes it
        try:
            # (A list carries no attribute; an app's object may fail even at being asked.)
            deferral = None if type(result) is list else claim(result)
            if type(result) is FileWrapper and first and self._sends_files:
                file_range = self._file_range(start, result)
                if file_range is not None:
                    start.headers_sent = True
                    self._to_loop(self._reply_file, ex, start, *file_range)
                    return  # closing the result closes the app's file: the range has its own
            size = sum(map(len, start.written))
            after_writes: list[bytes] = []  # an item yielded after write() sent the head
            self._in_app = True
            try:
                iterator = iter(result)
                # A body that is all there (a list, as Django's HttpResponse gives) goes
                # out whole when small; any other may wait before its next item (a
                # generator: rows of a query, events), and what it gave must not wait
                # with it (PEP 3333, "Buffering and Streaming"): it streams from its
                # first bytes.
                limit = 0 if type(iterator) not in _ALL_THERE else self.config.stream_threshold
                for data in iterator:
                    if not isinstance(data, bytes):
                        raise AppError(
                            f"response iterable yielded {type(data).__name__}, not bytes"
                        )
                    if start.headers_sent:  # write() began the stream: the rest follows
                        after_writes.append(data)
                        break
                    if data:
                        if not start.written:  # none yet, or an error page replaced them
                            size = 0
                        start.written.append(data)
                        size += len(data)
                    if deferral is None and first:
                        # Hidden by a middleware's iterable, announced by the response.
                        if ANNOUNCED in ex.environ:
                            deferral = announced = claim_announced(ex.environ)
                        if deferral is None and size > limit:
                            streaming = True
                            break
                    elif announced is not None and not began(ex.environ, announced):
                        deferral = announced = None  # a dropped response's: this one streams
                        if size > limit:
                            streaming = True
                            break
                    if deferral is not None or not first:  # a held response's part
                        if ex.dead:
                            break  # its client left: the rest would go nowhere
                        if size > HELD_PART_LIMIT:
                            raise AppError(
                                f"a held response's part (a deferred first response, or a "
                                f"stage's) is read whole before it goes out, and this one "
                                f"passed {HELD_PART_LIMIT >> 20} MiB: return a finite response"
                            )
            finally:
                self._in_app = False
            if announced is not None and not began(ex.environ, announced):
                deferral = None  # its response was dropped for another: not this one's
            if first and start.status is None:
                raise AppError("the application returned without calling start_response()")
            if start.over:  # write() raised ClientGone, and the app went on: it is over
                return  # (the body is closed below)
            chunks, start.written = start.written, []
            if start.headers_sent and first:  # by write()
                streaming = True
                iterator = itertools.chain(after_writes, iterator)
            elif streaming:
                start.headers_sent = True
                self._to_loop(self._start_stream, ex, start, chunks)
            if streaming:
                pumped = self._stream_rest(ex, start, result, iterator)
            elif not first:
                self._to_loop(self._stage_done, ex, chunks, deferral)
            elif deferral is not None:
                chunks = without_content_coding(start, chunks)
                start.headers_sent = True
                self._to_loop(self._start_deferred, ex, start, chunks, deferral)
            else:
                self._to_loop(self._reply_whole, ex, start, chunks)
        except StopNow:
            raise
        except ClientGone:  # from write(), inside the body: the response is over already
            self._to_loop(self._abort, ex)
        except BaseException:
            logger.exception(
                "Error in WSGI response for %s %s", ex.method, ex.path, extra=_client(ex)
            )
            if start.headers_sent or not first:
                self._to_loop(self._abort, ex)
            else:
                self._to_loop(self._reply_error, ex)
        finally:
            if not pumped and type(result) is not list:  # (a list has no close())
                self._close_body(ex, result)
        if pumped and self._pool is None and not ex.awaiting_drain:
            self._pump(ex)  # (else once the first part has left: Responder._on_drained)

    @staticmethod
    def _file_range(
        start: StartResponse, wrapper: FileWrapper
    ) -> tuple[Descriptor, int, int] | None:
        """The file to send by descriptor, when the response is nothing but a regular file."""
        if start.status is None or start.written or start.headers_sent:
            return None
        return wrapper.file_range(start.length)

    def _stream_rest(
        self,
        ex: Exchange,
        start: StartResponse,
        result: Iterable[bytes],
        iterator: Iterator[bytes],
    ) -> bool:
        """Pass the rest of a large or lazy body chunk by chunk, pausing while more than
        ``write_high_water`` bytes are unsent, so that a slow client never makes the
        server buffer the whole body.  True: the body is left open, paused (``ex.pump``)
        or, with ``--threads 0``, for the loop thread to pump (``_pump``)."""
        if not carries_body(ex.method, start.code):
            # None of it would go out, so it would never drain: leave it unread.
            self._to_loop(self._end, ex)
            return False
        if self._pool is None:
            ex.pump = (iterator, result)
            return True
        self._stream_on(ex, iterator)
        return False

    def _stream_on(self, ex: Exchange, iterator: Iterator[bytes]) -> None:
        """Worker: pass chunks, pausing while more than ``write_high_water`` bytes are
        unsent, so that a slow client never makes the server hold the whole body.

        The body pauses in this thread, the one that ran the view: a Django body goes on
        with the view's database connection, translation and time zone, which are the
        thread's (resumed in another, a ``QuerySet.iterator()`` found its connection
        closed by the requests its first thread had served meanwhile).  A spare thread
        runs views in its place while it waits (``ThreadPool.stand_in``); with none
        left, it holds a view thread, and is cut once its client has kept it waiting
        the write timeout in all (bytes that keep leaving, however slowly, keep
        libevent's own write timeout from firing: a few such clients would hold every
        view thread).  A spare also takes its place while views wait with no thread
        free, as a generator may wait between items as long as it likes
        (``ThreadPool.in_body``)."""
        assert self._pool is not None
        with self._pool.in_body():
            for data in iterator:
                if not isinstance(data, bytes):
                    raise AppError(f"response iterable yielded {type(data).__name__}, not bytes")
                if not self._pass_on(ex, data):
                    return
        self._to_loop(self._end, ex)

    def _pass_on(self, ex: Exchange, data: bytes) -> bool:
        """Hand the next piece of a streamed body to the loop thread; on a worker,
        pausing while more than ``write_high_water`` bytes are unsent (with ``--threads
        0``, the loop thread pumping the body pauses it: ``_pump``).  False: the body is
        not to go on."""
        if ex.dead:
            return False
        if not data:
            return True
        ex.pending += len(data) + CHUNK_FRAMING
        if self._pool is None:
            self._send_chunk(ex, data)
            return not ex.dead
        if ex.pending > self.config.write_high_water:
            gate = DrainGate()
            if not self._pool.stand_in() and ex.holding_until is None:
                # Waiting without a spare: a view thread's, until then in all.
                ex.holding_until = time.monotonic() + self.config.timeout
            self._to_loop(self._pause_stream, ex, data, gate)
            return self._wait_at(gate, ex, ex.holding_until)
        self._to_loop(self._send_chunk, ex, data)
        return True

    def _wait_at(self, gate: DrainGate, ex: Exchange, until: float | None) -> bool:
        """Worker: whether the paused body goes on.  Waits in slices, so that a server
        that stopped (it marks every exchange dead, whether or not its worker had got to
        its gate) lets its worker go to close the body.  Past ``until``, the loop is
        asked to cut the response, unless the bytes left meanwhile (``_give_up``)."""
        gave_up = False
        while not gate.wait(GATE_SLICE):
            if ex.dead:
                return False
            if until is None or gave_up:
                continue
            assert self._pool is not None
            if self._pool.stand_in():  # a spare came free: it takes this thread's place
                until = ex.holding_until = None
                continue
            crowded = self._pool.stalled(CROWDED_WAIT)
            if crowded or time.monotonic() > until:
                # Its view thread is wanted: requests wait, and no thread has taken one
                # for a while (each new slow reader past the spares stalled every view
                # for COMET_TIMEOUT).  Not while other threads get through them: a
                # client downloading at its pace is not cut for a request queued.
                gave_up = True
                self._to_loop(self._give_up, ex, gate, crowded)
        return gate.go_on

    def _pump(self, ex: Exchange) -> None:
        """Loop thread (``--threads 0``): iterate a streamed body until more than
        ``write_high_water`` bytes are unsent; ``Responder._on_drained`` calls again once
        they have left.

        A lazy body (any but a list's or a tuple's) may wait between items, and what it
        gave must not wait with it (PEP 3333, "Buffering and Streaming"): each item is
        written to the socket before the next is asked for, or, when the socket takes
        less than all of it (a slow client, or more than ``PUMP_BUDGET`` bytes pumped
        in a row, where the loop's other connections get their turn), the next is asked
        for once the rest has left.  The body is closed when it ends, fails or its
        client leaves."""
        assert isinstance(ex.pump, tuple)
        iterator = ex.pump[0]
        lazy = type(iterator) not in _ALL_THERE
        budget = PUMP_BUDGET
        paused = False
        try:
            while True:
                self._in_app = True
                try:
                    data = next(iterator, _END)
                finally:
                    self._in_app = False
                if data is _END:
                    self._end(ex)
                    break
                if ex.dead:
                    break
                if not isinstance(data, bytes):
                    raise AppError(f"response iterable yielded {type(data).__name__}, not bytes")
                if not data:
                    continue
                ex.pending += len(data) + CHUNK_FRAMING
                budget -= max(len(data), PUMP_ITEM_COST)
                if lazy:
                    sent = self._send_chunk(ex, data, then_drain=True, flush=budget > 0)
                else:
                    sent = self._send_chunk(ex, data)
                if not sent:  # gone, or past its Content-Length
                    if not ex.dead:
                        self._end(ex)
                    break
                if ex.awaiting_drain:
                    paused = True  # the rest waits in the iterator, not in memory
                    return
        except StopNow:
            raise
        except ClientGone:  # from write(), inside the body: the response is over already
            self._abort(ex)
        except BaseException:  # even SystemExit from the app: the client must not wait
            logger.exception(
                "Error in WSGI response for %s %s", ex.method, ex.path, extra=_client(ex)
            )
            self._abort(ex)
        finally:
            if not paused:
                self._stop_pump(ex)

    def _stop_pump(self, ex: Exchange) -> None:
        """Loop thread: a paused body is not to go on: closed here (``--threads 0``),
        or its worker told to stop (and close it, in its own thread)."""
        pump, ex.pump = ex.pump, None
        if isinstance(pump, tuple):
            self._close_body(ex, pump[1])
        elif pump is not None:
            pump.open(False)

    def _close_body(self, ex: Exchange, result: Iterable[bytes]) -> None:
        """Call the response's close(), as PEP 3333 requires whatever happened."""
        try:
            close = getattr(result, "close", None)
            if close is not None:
                self._in_app = True
                try:
                    close()
                finally:
                    self._in_app = False
        except StopNow:
            raise
        except BaseException:
            logger.exception(
                "Error closing WSGI response for %s %s", ex.method, ex.path, extra=_client(ex)
            )

    def _run_stage(
        self, ex: Exchange, resume: Callable[..., Iterable[bytes]], args: tuple[Any, ...]
    ) -> None:
        if ex.dead:  # its client left while the stage waited for a thread: no view runs
            self._to_loop(self._stage_done, ex, [], None)
            return
        self._in_app = True
        try:
            result = resume(*args)
        except StopNow:
            raise
        except BaseException:
            self._in_app = False
            logger.exception(
                "Error in deferred stage of %s %s", ex.method, ex.path, extra=_client(ex)
            )
            self._to_loop(self._abort, ex)
            return
        finally:
            self._in_app = False
        self._produce(ex, StartResponse(), result, first=False)


class ClientGone(ConnectionError):
    """Raised by write() once its response is over: the client left, or the response
    was cut (the server stopping, a client too slow); the app has nobody to write to."""

    def __init__(self, ex: Exchange):
        super().__init__(f"{ex.method} {ex.path}: the response is over (client gone or cut)")


class DrainGate:
    """Where a worker waits while its streamed body is paused, until the loop thread
    lets it go on (the unsent bytes have left) or tells it to stop."""

    __slots__ = ("_event", "go_on")

    def __init__(self) -> None:
        self._event = threading.Event()
        self.go_on = False

    def wait(self, timeout: float) -> bool:
        """Whether the gate opened (either way: see ``go_on``) within ``timeout``."""
        return self._event.wait(timeout)

    def open(self, go_on: bool) -> None:
        self.go_on = go_on
        self._event.set()

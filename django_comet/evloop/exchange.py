"""An ``Exchange``: one request and its response, as the server tracks it.

Its life: ``app`` (running the application) -> ``held`` (waiting on a deferral, headers
sent) or ``streaming`` (a worker produces chunks) -> ``done``; or, cut by the server after
its head went out (an app error, a stop), ``aborting`` until its connection closes.  A
client that disconnects marks it ``dead``: its next stage is forgotten at once and its
request freed; a worker that comes back with output for a dead exchange drops it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .deadlines import Due

if TYPE_CHECKING:
    from .producer import DrainGate


class Exchange:
    __slots__ = (
        "awaiting_drain",
        "bev",
        "body_size",
        "close_at_end",
        "code",
        "conn",
        "cursor",
        "dead",
        "deferred",
        "ending",
        "environ",
        "framing",
        "hold",
        "holding_until",
        "keep_alive",
        "key",
        "limit",
        "method",
        "outbuf",
        "path",
        "pending",
        "protocol",
        "pump",
        "remote",
        "req",
        "sent",
        "stage_due",
        "started",
        "state",
    )

    def __init__(self, key: int, req: int, environ: dict[str, Any]):
        self.key = key
        self.req: int | None = req  # None once libevent freed it or we handed it back
        self.environ = environ
        self.method: str = environ["REQUEST_METHOD"]
        self.path: str = environ["RAW_URI"]
        self.protocol: str = environ["SERVER_PROTOCOL"]
        self.remote: str = environ["REMOTE_ADDR"]  # (the client's, past trusted proxies)
        self.started = time.monotonic()
        self.code = 0
        self.sent = 0  # body bytes, as the access log counts them
        self.body_size = 0  # its request's body, for Server.release_let_go
        self.framing = 0  # the chunked framing written around them (see Server._on_close)
        self.state = "app"
        self.dead = False
        self.stage_due: Due | None = None  # held for a time: the tick of its next stage
        # Set while its read timeout is lifted: from its arrival with a thread pool, once
        # held with --threads 0 (see Server._restore_read_timeout).
        self.bev: int | None = None
        self.pending = 0  # streaming: bytes handed to the loop and not yet flushed
        # streaming: a chunk went to evhttp with Responder._on_drained to call once the
        # connection's output is empty (evhttp keeps that callback set afterwards)
        self.awaiting_drain = False
        # A streamed body paused while its unsent bytes leave: its rest, for the loop
        # thread to pump (--threads 0), or where its worker waits to go on.
        self.pump: tuple[Iterator[bytes], Iterable[bytes]] | DrainGate | None = None
        # Paused with no spare thread to stand in: its worker holds a view thread until
        # then in all (Producer._pass_on).
        self.holding_until: float | None = None
        self.deferred = False  # counted in Server.held until done
        # Given its last answer (the server stopping, COMET_MAX_HOLD): a wait its last
        # stage asks for is not held but ends the response (Holder.hold).
        self.ending = False
        self.hold: Any = None  # the ChannelWait or Stream it is subscribed for
        self.cursor = 0  # newest event id it was sent (streams) or waits past (long-polls)
        self.outbuf: int | None = None  # held: the connection's output evbuffer
        # Its connection closes after it: its shed headers asked to, or its body ran past
        # or short of its Content-Length.
        self.close_at_end = False
        self.limit: int | None = None  # a streamed body's Content-Length: not a byte more
        self.conn = 0  # its connection's key in the ConnectionGuard (0: not tracked)
        # An HTTP/1.1 request that did not ask to close: its connection stays open after
        # a whole reply unless the reply closes it (WholeReplies._write_whole).
        self.keep_alive = False

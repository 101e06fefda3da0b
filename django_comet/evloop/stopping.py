"""Stopping the server: the stop signals, and the drain that lets responses in flight
finish within the grace period before the loop stops (mixed into ``Server``)."""

from __future__ import annotations

import functools
import logging
import signal
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

from .interrupt import StopNow, StopRequests, stop_signals
from .listen import remove_unix_socket

if TYPE_CHECKING:
    import socket

    from .config import ServerConfig
    from .connections import ConnectionGuard
    from .exchange import Exchange
    from .holding import Holder
    from .loop import Loop
    from .workers import ThreadPool

logger = logging.getLogger("django_comet.server")

# Seconds the stop waits for unsent output that does not shrink (a client not reading).
FLUSH_PATIENCE = 1.0

_NOT_TAKEN: Any = object()  # (SIGALRM's handler before ours: None when not Python's)


class Stopping:
    """Mixed into ``Server``: loop thread, but for the ``--threads 0`` signal handlers."""

    config: ServerConfig
    loop: Loop
    sock: socket.socket
    guard: ConnectionGuard
    holder: Holder
    _lib: Any
    _pool: ThreadPool | None
    _http: int
    _bound: Any
    _listener: Any
    _listen_fd: int
    _own_path: str
    _own_id: Any
    _own_timers: dict[str, Any]
    _exchanges: dict[int, Exchange]
    _draining: bool
    _drain_check: Any
    _handling_signals: bool
    _stop_requests: StopRequests
    _in_app: bool
    _alarm_before: Any = _NOT_TAKEN
    _timer_before: tuple[float, float, float] | None = None

    def handle_signals(self, *, worker: bool = False) -> None:
        """Main thread: stop on SIGINT, SIGTERM or SIGHUP from now on.  Call it before
        announcing the server (a banner, a readiness probe): a signal sent between the
        two would find the default action, and kill the process before it removed its
        socket file.  A pre-forked ``worker`` ignores SIGINT and SIGHUP, and SIGTERMs
        after the first: Ctrl-C reaches the whole process group, and the parent turns
        it into one SIGTERM per worker (two signals would cut)."""
        if self._handling_signals:
            return
        self._handling_signals = True
        if worker:
            self.loop.add_signal_handler(signal.SIGTERM, self._drain_once)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # (the parent's, as SIGINT's)
        elif self._pool is None:  # views run in the loop thread: see interrupt.py
            for signum in stop_signals():
                signal.signal(signum, self._on_stop_signal)
            self._alarm_before = signal.signal(signal.SIGALRM, self._on_grace_over)
        else:
            for signum in stop_signals():
                self.loop.add_signal_handler(signum, functools.partial(self._on_stop, signum))

    def _on_stop(self, signum: int) -> None:
        if self._stop_requests.new(signum):  # (not the same again: interrupt.py)
            self.shutdown()

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        """Main thread, ``--threads 0``: stop as with a thread pool; a view that holds the
        loop thread is cut short (``StopNow``) at a second signal, or once the grace
        period is over (and half a second: by then a loop that runs has stopped).  No
        lock is taken here: a second signal may run this inside the first."""
        if not self._stop_requests.new(signum):  # the same request again (interrupt.py)
            return
        self.loop.call_soon(self.shutdown)
        if self._stop_requests.count == 1:
            before = signal.setitimer(signal.ITIMER_REAL, self.config.grace + 0.5)
            self._timer_before = (*before, time.monotonic())
        elif self._in_app:
            raise StopNow("a second stop signal came while a view ran in the loop thread")

    def _on_grace_over(self, _signum: int, _frame: FrameType | None) -> None:
        # (Only the timer a stop signal set: not one of a program running the server.)
        if self._in_app and self._timer_before is not None:
            raise StopNow("the grace period is over, and a view held the loop thread")

    def give_back_alarm(self) -> None:
        """Main thread, ``--threads 0``, once stopped: SIGALRM's handler and the real
        timer back as they were (a program that ran the server in-process goes on with
        its own; ours kept the server alive, and a program's repeating timer was left
        firing once)."""
        if self._alarm_before is _NOT_TAKEN:
            return
        before, self._alarm_before = self._alarm_before, _NOT_TAKEN
        timer, self._timer_before = self._timer_before, None
        if timer is not None:  # ours is set (a stop signal came): cancel it first
            signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL if before is None else before)
        if timer is not None:
            delay, interval, set_at = timer
            if delay or interval:  # what it had left (come already: as soon as may be)
                left = max(delay - (time.monotonic() - set_at), 1e-6) if delay else 0.0
                signal.setitimer(signal.ITIMER_REAL, left, interval)

    def _drain_once(self) -> None:
        """A worker's SIGTERM.  One sent to the whole process group (systemd's default,
        ``kill -- -PGID``) reaches it twice, directly and forwarded by the parent: only
        the first counts.  The parent cuts a drain that takes too long (SIGKILL)."""
        if not self._draining:
            self.shutdown()

    def shutdown(self, grace: float | None = None, what: str = "Stopping") -> None:
        """Loop thread: stop accepting, end held responses, let in-flight ones finish
        within ``grace`` seconds (``config.grace`` by default; each response from now on
        closes its keep-alive connection), then stop the loop."""
        if self._draining:
            logger.warning("Second stop request: closing now.")
            self.loop.stop()
            return
        self._draining = True
        grace = self.config.grace if grace is None else grace
        logger.warning(
            "%s: no new connections; responses in flight have up to %g s%s.",
            what,
            grace,
            " (a second Ctrl-C stops at once)" if what == "Stopping" else "",
        )
        self._lib.evconnlistener_disable(self._listener)
        bound, self._bound = self._bound, None
        self.sock.detach()

        def close_listener() -> None:  # pre-forked siblings share the socket: see Loop
            if self._http:  # else evhttp_free did
                self._lib.evhttp_del_accept_socket(self._http, bound)  # closes the fd too
                self._listen_fd = -1

        self._own_timers["closing"] = self.loop.close_unwatched(close_listener)
        if self._own_path:
            remove_unix_socket(self._own_path, self._own_id)
        self.holder.end_all()
        deadline = time.monotonic() + grace
        flushing = [float("inf"), time.monotonic()]  # unsent bytes, when they last fell

        def flushed(now: float) -> bool:
            """Held responses end at once, but their last bytes may still be in libevent's
            buffers: wait while they keep leaving, not for clients that stopped reading."""
            unsent = self.guard.unsent()
            if unsent < flushing[0]:  # fewer than at the last look: some have left
                flushing[1] = now
            flushing[0] = unsent
            if unsent and now - flushing[1] > FLUSH_PATIENCE:
                logger.warning("Not waiting for %d bytes to clients that stopped reading.", unsent)
                return True
            return not unsent

        def check() -> None:
            now = time.monotonic()
            if now >= deadline:
                if self._exchanges:
                    logger.warning(
                        "Grace period over: cutting %d response(s).", len(self._exchanges)
                    )
                self.loop.stop()
            elif not self._exchanges and flushed(now):
                self.loop.stop()
            else:
                self._drain_check = self.loop.call_later(0.05, check, background=True)

        check()

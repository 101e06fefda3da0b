"""A small event loop over a libevent ``event_base``: timers, fd watchers, a thread-safe
wake-up and signal delivery while the loop sleeps inside C.

Threading: every method runs on the loop thread except ``call_soon_threadsafe`` (any
thread) and ``let_catch_up`` (any other thread).  libevent is built without threads
support here (``libevent_pthreads`` is not everywhere), so other threads never call into
it: they queue a callable and write a byte into the wake-up pipe, whose read end the loop
watches.
"""

from __future__ import annotations

import collections
import ctypes
import itertools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from . import libevent_ctypes as ev

logger = logging.getLogger("django_comet.server")


# Longer delays are taken as this (about three years): a C long of seconds would wrap.
MAX_DELAY = 1e8

# The longest a view thread waits for the loop to catch up (Loop.let_catch_up): only a
# loop stuck in one long callback makes it wait that long.
CATCH_UP_WAIT = 0.05

# The most callables run at the end of one pass (``call_after_pass``: ``--threads 0``'s
# views); the rest in the next, which does not sleep, so that timers (a stop's drain, the
# stages due) and sockets get a pass between each such batch and the next.
AFTER_PASS_BATCH = 64


def timeval_of(seconds: float) -> ev.timeval:
    seconds = min(seconds, MAX_DELAY)
    whole = int(seconds)
    return ev.timeval(whole, int((seconds - whole) * 1_000_000))


class Handle:
    """A registered libevent event (a timer or an fd watcher); ``cancel()`` releases it."""

    __slots__ = ("_event", "_key", "_loop", "args", "background", "callback")

    def __init__(
        self,
        loop: Loop,
        event: int,
        key: int,
        callback: Callable[..., Any],
        args: tuple[Any, ...],
        background: bool,
    ):
        self._loop = loop
        self._event: int | None = event
        self._key = key
        self.callback = callback
        self.args = args
        self.background = background  # the loop's or a service's own, not a request's

    @property
    def active(self) -> bool:
        return self._event is not None

    def cancel(self) -> None:
        """Stop and free the event.  Safe to call twice, and from inside its callback."""
        if self._event is not None:
            self._loop._release(self)


class Loop:
    def __init__(self, *, changelist: bool = False) -> None:
        self._lib = ev.load()
        self._blocking = ev.blocking_lib()
        self._base: int = self._new_base(changelist)
        self._handles: dict[int, Handle] = {}
        self._background = 0  # how many of them are background handles
        self._keys = itertools.count(1)
        self._trampoline = ev.event_callback_fn(self._dispatch)  # referenced while C may call
        self._ready: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._after_pass: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        # Made active by the first call_after_pass of a pass: it runs them at the end of
        # that pass, in libevent (see call_after_pass).
        self._end_of_pass_cb = ev.event_callback_fn(self._at_end_of_pass)
        self._end_of_pass = self._lib.event_new(self._base, -1, 0, self._end_of_pass_cb, None)
        if not self._end_of_pass:
            raise OSError("event_new() failed")
        self._end_of_pass_due = False
        self._at_once = ev.timeval(0, 0)
        self._woken = False
        self._woken_at = 0.0  # when the first callable still queued was queued
        self._ran = 0  # queued callables taken to run so far
        self._caught_up = threading.Condition(threading.Lock())  # notified after each run
        self._catching_up = 0  # threads waiting in let_catch_up
        self._running = False
        self._wake_r, self._wake_w = os.pipe()
        # Held by a wake-up's write and by close(): a thread calling in late (a view
        # that outlived the stop, a broker's helper) must not write to the descriptor
        # once closed, nor to another that took its number since.  Re-entrant: a signal
        # handler (--threads 0) calls in from the loop thread, perhaps while it holds it.
        self._wake_lock = threading.RLock()
        self._closed = False
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.add_reader(self._wake_r, self._on_wake, background=True)
        self._stopping = False
        self._fatal: BaseException | None = None
        self.thread_id: int | None = None

    def _new_base(self, changelist: bool) -> int:
        # By default libevent times timeouts with the kernel's coarse clock, which moves
        # once per tick (every 4 ms at HZ=250): every timer would be up to a tick late.
        # And it counts a timeout from the time it read when the loop woke: after a long
        # run of callbacks that is stale, and every timer armed during the run would be
        # due at once (1,000 staged responses served one after another would all want
        # their next stage at the same instant, and again at every stage).
        #
        # With epoll, the ``changelist`` folds the watch changes a pass makes to a socket
        # into one epoll_ctl: a keep-alive exchange made six, now two (a third more bare
        # WSGI requests per second).  Its hazard: a descriptor closed in the pass that
        # stopped watching it, before the removal reaches epoll, while another descriptor
        # keeps the socket open (a forked child's copy: multiprocessing's fork, a view
        # that forks; pre-forked siblings' listening socket), stays in epoll, which
        # reports it for as long as the copy lives, and the loop spins.  libevent closes a
        # connection that way.  So only the server turns it on, when its connection guard
        # holds the last reference on every connection and drops it once a pass has begun
        # since it disabled it (ConnectionGuard); its listener and our watchers close with
        # ``close_unwatched``.
        flags = ev.EVENT_BASE_FLAG_PRECISE_TIMER | ev.EVENT_BASE_FLAG_NO_CACHE_TIME
        if changelist:
            flags |= ev.EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST
        config = self._lib.event_config_new()
        if not config:
            raise OSError("event_config_new() failed")
        try:
            self._lib.event_config_set_flag(config, flags)
            base = self._lib.event_base_new_with_config(config)
        finally:
            self._lib.event_config_free(config)
        if not base:
            raise OSError("event_base_new_with_config() failed")
        return int(base)

    # -- registration (loop thread) -----------------------------------------------------

    def _register(
        self,
        fd: int,
        what: int,
        callback: Callable[..., Any],
        background: bool,
        args: tuple[Any, ...] = (),
    ) -> Handle:
        key = next(self._keys)
        event = self._lib.event_new(self._base, fd, what, self._trampoline, key)
        if not event:
            raise OSError("event_new() failed")
        handle = Handle(self, event, key, callback, args, background)
        self._handles[key] = handle
        self._background += background
        return handle

    def _release(self, handle: Handle) -> None:
        self._lib.event_free(handle._event)  # event_free also deletes a pending event
        handle._event = None
        del self._handles[handle._key]
        self._background -= handle.background

    def call_later(
        self, delay: float, callback: Callable[..., Any], *args: Any, background: bool = False
    ) -> Handle:
        """Run ``callback(*args)`` once after ``delay`` seconds from now.  A ``background``
        timer is the server's or a service's own (a sweep, a broker's), not a request's.
        (Arguments rather than a partial: a held staged response keeps its timer, and a
        partial with its bound method took 0.2 KiB more.)"""
        when = timeval_of(delay)  # first: a delay it refuses must not leave an event behind
        handle = self._register(-1, ev.EV_TIMEOUT, callback, background, args)
        self._lib.event_add(handle._event, ctypes.byref(when))
        return handle

    def add_reader(
        self, fd: int, callback: Callable[[], Any], *, background: bool = False
    ) -> Handle:
        """Run ``callback()`` each time ``fd`` is readable, until cancelled.  Close ``fd``
        after cancelling through ``close_unwatched``, never at once."""
        handle = self._register(fd, ev.EV_READ | ev.EV_PERSIST, callback, background)
        self._lib.event_add(handle._event, None)
        return handle

    def close_unwatched(self, close: Callable[[], Any]) -> Handle:
        """Call ``close()``, which closes a descriptor no longer watched, once that removal
        has reached the kernel: on the next pass (see _new_base)."""
        return self.call_later(0, close, background=True)

    def _dispatch(self, fd: int, what: int, key: int) -> None:
        """The one C-to-Python trampoline for every timer and watcher."""
        handle = self._handles.get(key)
        if handle is None:
            return
        if what & ev.EV_TIMEOUT:
            self._release(handle)  # one-shot timer: free before running, cancel() is a no-op
        self._run(handle.callback, handle.args)

    def _run(self, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            callback(*args)
        except BaseException as exc:
            self.failed(exc, callback)

    def failed(self, exc: BaseException, callback: Callable[..., Any]) -> None:
        """A callback from C raised: raised into C it would be printed and lost.  Log it
        and keep serving, but let KeyboardInterrupt/SystemExit stop the loop and re-raise
        from run()."""
        if isinstance(exc, Exception):
            logger.error("Unhandled error in event loop callback %r", callback, exc_info=exc)
        else:
            self._fatal = exc
            self._lib.event_base_loopbreak(self._base)

    def guarded(self, callback: Callable[..., None]) -> Callable[..., None]:
        """``callback`` for libevent to call directly (not through ``_dispatch``), run as
        the loop's own callbacks are (``_run``): an error is logged, and a BaseException
        (KeyboardInterrupt, SystemExit, StopNow) stops the loop and is re-raised from
        ``run()``, where ctypes would print it and drop it."""
        return lambda *args: self._run(callback, args)

    # -- cross-thread wake-up ----------------------------------------------------------

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> None:
        """Any thread: run ``callback(*args)`` on the loop thread soon, in call order.
        Once the loop is closed, dropped: it would never run, and what it holds (a file
        on its way out) would be kept until the loop is collected."""
        if self._closed:
            return
        self._ready.append((callback, args))
        if self._woken:
            if self._closed:  # closed between the check above and the append
                self._ready.clear()
            return
        with self._wake_lock:
            if self._closed:
                self._ready.clear()
                return
            self._woken = True
            self._woken_at = time.monotonic()
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass  # the pipe is full, so the loop is going to wake anyway

    call_soon = call_soon_threadsafe

    def call_after_pass(self, callback: Callable[..., Any], *args: Any) -> int:
        """Loop thread: run ``callback(*args)`` once libevent's current pass is over,
        with the others queued in it, in call order.  ``--threads 0`` runs its views so:
        all the requests a pass read, then all their views, made Django about 15% faster
        (bench/hello) than each view in the middle of libevent's work, most likely
        because the view's code stays warm in the CPU's caches.

        They run in libevent's pass, from an event made active behind every other that
        the pass has: before the pass hands its changes of what is watched to epoll.  A
        request read, its view run and its answer written then make one change to its
        socket (stop reading, start writing), not two.  One queued by them runs at the
        end of the next pass; after a ``stop()``, when the loop runs again (never, once
        closed).  Returns how many wait now (``after_pass_waiting``)."""
        if self._closed:
            return 0  # (as call_soon after close: dropped)
        waiting = self._after_pass
        waiting.append((callback, args))
        if not self._end_of_pass_due:
            self._end_of_pass_due = True
            self._lib.event_active(self._end_of_pass, 0, 0)
        return len(waiting)

    @property
    def after_pass_waiting(self) -> int:
        """Callables queued to run after the current pass."""
        return len(self._after_pass)

    def _at_end_of_pass(self, _fd: int, _what: int, _arg: Any) -> None:
        # Still due while the batch runs: what it queues waits for the next pass.
        # (The batch's loop and _run in place: a frame each was a tenth of a bare WSGI
        # request's Python calls.)
        try:
            batch = self._after_pass
            if len(batch) > AFTER_PASS_BATCH:  # the rest after a pass that does not sleep
                batch, self._after_pass = batch[:AFTER_PASS_BATCH], batch[AFTER_PASS_BATCH:]
            else:
                self._after_pass = []
            for callback, args in batch:
                try:
                    callback(*args)
                except BaseException as exc:  # (as _run)
                    self.failed(exc, callback)
                if self._fatal is not None:
                    break  # stopping: run() raises it
        except BaseException as exc:
            self.failed(exc, self._at_end_of_pass)
        if self._after_pass and not self._closed:
            # More than a batch, or queued by it: at the end of the next pass.  A timer
            # due at once does it: libevent makes timers active after the sockets that
            # a pass found ready.
            self._lib.event_add(self._end_of_pass, ctypes.byref(self._at_once))
        else:
            self._end_of_pass_due = False

    def _on_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        # Clear the flag before draining: a callable queued from now on writes a new byte.
        # Run only what was queued by now, so that busy producers cannot keep the loop
        # from its sockets; later arrivals have woken it again.
        self._woken = False
        ready = self._ready
        for _ in range(len(ready)):
            callback, args = ready.popleft()
            self._ran += 1  # (taken: let_catch_up counts what is still queued)
            self._run(callback, args)
            if self._fatal is not None:
                break  # stopping: run() raises it
        if self._catching_up:
            self._tell_caught_up()

    def _tell_caught_up(self) -> None:
        with self._caught_up:
            self._caught_up.notify_all()

    def let_catch_up(self) -> None:
        """Any other thread, between two pieces of work: if what was queued for the loop
        has waited longer than the interpreter's switch interval, wait until the loop has
        run it.

        The GIL has no priorities: a loop thread that needs it back (to run a callback)
        queues up behind every busy view thread, a switch interval (5 ms) each, and with
        eight threads running views it got its turn every 40-70 ms.  Answers already
        computed waited that long to be sent, then went out in bunches of hundreds (1,000
        staged responses started at once had their next stages 100-190 ms late).  View
        threads that let the loop catch up before they take the next request keep that
        wait to about one switch interval."""
        if (
            not self._woken
            or not self._running
            or time.monotonic() - self._woken_at < sys.getswitchinterval()
        ):
            return
        with self._caught_up:
            through = self._ran + len(self._ready)  # everything queued by now
            self._catching_up += 1
            try:
                self._caught_up.wait_for(
                    lambda: self._ran >= through or not self._running, CATCH_UP_WAIT
                )
            finally:
                self._catching_up -= 1

    # -- running -----------------------------------------------------------------------

    def add_signal_handler(self, signum: int, callback: Callable[[], Any]) -> None:
        """Run ``callback`` on the loop thread when ``signum`` arrives, even while libevent
        sleeps in epoll: the C-level handler writes into the wake-up pipe, and the Python
        handler runs as soon as the loop is back in Python."""
        signal.signal(signum, lambda *_: self.call_soon(callback))

    def run(self) -> None:
        """Run until ``stop()``; re-raise a KeyboardInterrupt/SystemExit from a callback.

        The loop waits for events with the GIL released (``blocking_lib``), so that view
        threads run meanwhile.  But then each callback libevent makes must take the GIL
        back, and while view threads are busy every take waits its turn behind them: a
        pass with many callbacks waited once for each.  So after the pass that woke it,
        the loop runs passes that do not wait and keep the GIL (``EVLOOP_NONBLOCK``
        through ``lib``: libevent goes on until a pass finds nothing to do), and only
        then goes back to sleep.  The interpreter still hands the GIL to a waiting view
        thread every switch interval."""
        self.thread_id = threading.get_ident()
        in_main = self.thread_id == threading.main_thread().ident
        previous_wakeup = signal.set_wakeup_fd(self._wake_w) if in_main else None
        # Python's own Ctrl-C (no handler of the server's: an embedding program) raises
        # KeyboardInterrupt where the next bytecode runs, which in the loop thread is the
        # first line of a callback from C, outside any try: ctypes prints it and the loop
        # goes on.  Stop the loop instead, and raise it from here.
        default_sigint = in_main and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        if default_sigint:
            signal.signal(signal.SIGINT, self._on_sigint)
        base, keeping_gil, releasing_gil = self._base, self._lib, self._blocking
        sleeping = True
        self._running = True
        try:
            while not self._stopping:
                if sleeping:  # until something happens, then one pass
                    releasing_gil.event_base_loop(base, ev.EVLOOP_ONCE | ev.EVLOOP_NO_EXIT_ON_EMPTY)
                else:  # passes until one finds nothing to do
                    keeping_gil.event_base_loop(
                        base, ev.EVLOOP_NONBLOCK | ev.EVLOOP_NO_EXIT_ON_EMPTY
                    )
                sleeping = not sleeping
                if self._fatal is not None:
                    fatal, self._fatal = self._fatal, None
                    raise fatal
        finally:
            self._running = False
            if self._catching_up:
                self._tell_caught_up()  # (it will run nothing more for now)
            self._stopping = False
            if in_main:
                signal.set_wakeup_fd(previous_wakeup if previous_wakeup is not None else -1)
            if default_sigint:
                signal.signal(signal.SIGINT, signal.default_int_handler)

    def _on_sigint(self, _signum: int, _frame: Any) -> None:
        self.failed(KeyboardInterrupt(), self._on_sigint)

    def stop(self) -> None:
        """Loop thread: return from ``run()`` after the current callback."""
        self._stopping = True
        self._lib.event_base_loopbreak(self._base)

    def close(self) -> None:
        """Free every event, then the base (events before their base).  Callables still
        queued never run: dropping them releases what they hold (a file on its way out
        closes its descriptor)."""
        with self._wake_lock:  # a thread calling in late writes to no descriptor from now
            if self._closed:
                return
            self._closed = self._woken = True
        self._ready.clear()
        self._after_pass.clear()
        for handle in list(self._handles.values()):
            handle.cancel()
        self._lib.event_free(self._end_of_pass)
        self._lib.event_base_free(self._base)
        self._base = 0
        os.close(self._wake_r)
        os.close(self._wake_w)

    @property
    def base(self) -> int:
        return self._base

    @property
    def pending_handles(self) -> int:
        """Timers and watchers registered right now (the wake-up pipe counts as one)."""
        return len(self._handles)

    @property
    def foreground_handles(self) -> int:
        """Those of them that are not background handles: the requests' own."""
        return len(self._handles) - self._background

"""The signals that stop a server, and stopping one whose loop thread is inside a view
(``--threads 0``).

There the loop runs the views itself: a view that blocks (a slow query, a sleep) keeps
the loop from the stop a signal asks for, from its grace period's end, and from a second
signal's "stop now".  Python runs signal handlers in the main thread (the loop's),
between two bytecodes of whatever it runs, a view's included.  So the server notes when
the application's code runs (``Server._in_app``: a view, its body's iteration, its
``close()``), and a handler that finds it running there raises ``StopNow`` into it: at a
second stop signal, or at a SIGALRM set for the end of the grace period.  Never into the
server's own code, which may be between two libevent calls.

``StopNow`` passes every ``except BaseException`` of the server (producer.py) up to the
loop, which stops; a callback libevent makes straight into Python (not through
``Loop._run``) is wrapped to hand it to the loop too (``Loop.guarded``): ctypes would
print it and drop it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Any

# A terminal that closes (an ssh session lost) sends SIGHUP: a stop like the others,
# which removes what the server made (its Unix socket file, the workers' figures), but
# under the autoreloader, whose parent kills the serving process at once (README).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopRequests:
    """The first stop signal asks for a graceful stop, and a second for a stop at once,
    unless it is the same SIGTERM or SIGHUP again: GNU ``timeout`` sends its signal to
    the process and then to the process group, which the process is in, and the second,
    taken as "stop now", cut what the first had let finish.  (systemd, Docker and
    Kubernetes follow a SIGTERM with SIGKILL once their stop timeout is over, not with
    another SIGTERM.)  A second Ctrl-C (SIGINT) always asks to stop at once."""

    def __init__(self) -> None:
        self.count = 0
        self._last = 0

    def new(self, signum: int) -> bool:
        """Whether ``signum`` is a new stop request (then counted)."""
        again = self.count > 0 and signum == self._last and signum != signal.SIGINT
        self._last = signum
        if again:
            return False
        self.count += 1
        return True


def stop_signals() -> tuple[int, ...]:
    """STOP_SIGNALS but those the process was started ignoring, left ignored as
    runserver leaves them: ``nohup`` ignores SIGHUP, so that the server outlives the
    terminal; a shell's background job ignores SIGINT (Ctrl-C is the foreground's)."""
    return tuple(s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN)


# The signals sent to the process as a whole that the server handles or should see.
_LEFT_TO_THE_MAIN_THREAD = {*STOP_SIGNALS, signal.SIGALRM, signal.SIGQUIT, signal.SIGCHLD}


def start_without_signals(thread: threading.Thread) -> None:
    """Start ``thread`` with the process's signals blocked in it (a thread takes the
    mask of the one that starts it), so that the kernel delivers them to the main
    thread.  Python runs handlers only there: one delivered to another thread waited
    for the main thread's next bytecode, and with ``--threads 0`` a view blocked there
    (waiting on a lock) was neither stopped nor cut until its wait ended.  For the
    server's own threads only: a process started from such a thread would inherit the
    mask, and ignore SIGTERM (never the view threads)."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _LEFT_TO_THE_MAIN_THREAD)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


class StopNow(BaseException):
    """Raised into a view running in the loop thread: the server stops at once."""


# Seconds the interpreter's exit may spend joining threads once the server has stopped.
EXIT_WAIT = 2.0


class StopWhileStarting:
    """Main thread.  As PID 1 (a container's main process), a signal left to its
    default action is ignored: a stop sent before the server handles signals itself
    (while Django's checks run, while a database does not answer) waited for SIGKILL.
    From now until ``done()``, a stop signal ends the start, with exit status 0."""

    def __init__(self) -> None:
        self._taken: list[int] = []
        if os.getpid() == 1 and threading.current_thread() is threading.main_thread():
            self._taken = [s for s in stop_signals() if signal.getsignal(s) is signal.SIG_DFL]
        for signum in self._taken:
            signal.signal(signum, self._stop)

    @staticmethod
    def _stop(_signum: int, _frame: Any) -> None:
        raise SystemExit(0)

    def done(self) -> None:
        """The server's own handlers come next: the defaults back until then."""
        for signum in self._taken:
            signal.signal(signum, signal.SIG_DFL)
        self._taken = []


class ExitGuard:
    """Made before a server starts (before it handles signals), armed once it has
    stopped: then the process's exit, whenever the program makes it, ends within
    ``EXIT_WAIT`` even if a thread started while the server ran still runs a view there
    and is one the exit joins (asgiref runs an async view's coroutine in such a thread,
    which a grace period cannot end: the process stayed up until the view returned).
    A watchdog, started as the exit begins, ends the process then, naming those
    threads.  Threads there before the server (the program's own) or started after it
    stopped are not its business, and a program that goes on after the server is not
    touched until it exits."""

    def __init__(self) -> None:
        # (Thread objects, not idents: the system gives a new thread an ended one's.)
        self._before = set(threading.enumerate())
        main = threading.current_thread() is threading.main_thread()
        self._handlers = {s: signal.getsignal(s) for s in stop_signals()} if main else {}
        self._watched: list[threading.Thread] = []
        self._status = 0

    def arm(self, status: int) -> None:
        """The server has stopped: its stop signals' handlers are the program's again
        (a second Ctrl-C ends a stuck exit), and the threads it started that the exit
        would join are watched, with ``status`` for the watchdog's exit."""
        for signum, handler in self._handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._watched = [t for t in _joined_at_exit() if t not in self._before]
        if not self._watched:
            return
        self._status = status
        try:
            # Run as the exit begins, before the interpreter joins threads (where
            # concurrent.futures waits for its workers): threading runs these in the
            # reverse order of their registration, and concurrent.futures' came first.
            threading._register_atexit(self._start_watchdog)  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):  # (exiting already: start it now)
            self._start_watchdog()

    def _start_watchdog(self) -> None:
        watchdog = threading.Thread(target=self._end_if_still_running, name="comet-exit")
        watchdog.daemon = True
        watchdog.start()

    def _end_if_still_running(self) -> None:
        threading.Event().wait(EXIT_WAIT)
        left = [t for t in self._watched if t.is_alive()]
        if not left:
            return
        names = ", ".join(t.name for t in left)
        message = (
            f"Exiting without waiting for {len(left)} thread(s) still running "
            f"({names}: an async view, or a thread a view started)\n"
        )
        with contextlib.suppress(OSError):
            os.write(2, message.encode())
        # What the project's log handlers buffer (a MemoryHandler) is written out, for a
        # bounded time: one stuck on a stream nobody reads must not keep the process.
        flushing = threading.Thread(target=_shut_logging_down, daemon=True)
        flushing.start()
        flushing.join(EXIT_WAIT)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(self._status)


def _joined_at_exit() -> list[threading.Thread]:
    """The live threads the interpreter's exit waits for, but this one and the main
    thread: those not daemon, and every ``concurrent.futures`` worker, daemon or not (a
    thread takes its daemon flag from the one that starts it: asgiref's, started from
    a view thread, are daemon threads)."""
    joined = [t for t in threading.enumerate() if not t.daemon]
    futures = sys.modules.get("concurrent.futures.thread")
    joined += getattr(futures, "_threads_queues", {}).keys()
    current, main = threading.current_thread(), threading.main_thread()
    return [t for t in dict.fromkeys(joined) if t.is_alive() and t not in (current, main)]


def _shut_logging_down() -> None:
    with contextlib.suppress(Exception):
        logging.shutdown()

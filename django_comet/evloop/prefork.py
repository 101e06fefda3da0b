"""Pre-forked workers sharing one listening socket.

The parent binds, forks ``count`` children and supervises them: a child that dies is
replaced (with a growing pause if children keep dying at once); SIGTERM or SIGINT is
forwarded to every child, which drains gracefully, and the parent exits 0 when they are
gone (killing stragglers after the grace period).  A parent that dies without that
(SIGKILL, a crash) takes its workers with it: they get SIGTERM from the kernel (Linux).
Nothing of libevent exists in the parent, so every child builds its own event base
after the fork.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import NoReturn

from .interrupt import STOP_SIGNALS, StopRequests, stop_signals
from .logwriter import exit_if_stuck

logger = logging.getLogger("django_comet.server")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
STABLE_SECONDS = 10.0  # a worker that lived this long did not die of starting
# A worker's exit status for "could not start" (gunicorn's): the server stops, since
# its replacements would fail the same way for ever while the server looked up.
BOOT_FAILED = 3


class Supervisor:
    def __init__(
        self,
        count: int,
        child_main: Callable[[int], None],
        grace: float,
        on_stop: Callable[[], None] | None = None,
    ):
        self.count = count
        self.child_main = child_main
        self.grace = grace
        self.on_stop = on_stop  # e.g. close the parent's copy of the listening socket
        self.children: dict[int, int] = {}  # pid -> worker number
        self._born: dict[int, float] = {}  # pid -> when it was forked
        self._stopping = False
        self._stop_requests = StopRequests()
        self.boot_failed = False  # a worker could not start: the server stopped for it
        self._handled: tuple[int, ...] = ()  # the stop signals taken over (not ignored)

    def handle_signals(self) -> None:
        """Take the stop signals over: call this before the server is announced, since
        a stop signal from then on must stop it (the default action killed the parent,
        leaving its workers to the kernel's SIGTERM and its files behind)."""
        if not self._handled:  # (again: ignored by now, since taken over)
            self._handled = stop_signals()
        for signum in self._handled:
            signal.signal(signum, self._on_stop)

    def run(self) -> int:
        self.handle_signals()
        for number in range(self.count):
            self._spawn(number)  # none once stopping
        pause = 0.0
        while self.children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            if pid not in self.children:
                continue
            number = self.children.pop(pid)
            lived = time.monotonic() - self._born.pop(pid)
            if self._stopping:
                continue
            if os.waitstatus_to_exitcode(status) == BOOT_FAILED:
                logger.error("Worker %d could not start; stopping the server.", number)
                self.boot_failed = True
                self._on_stop(signal.SIGTERM, None)
                continue
            logger.warning(
                "Worker %d (pid %d) died (%s); starting another.", number, pid, _describe(status)
            )
            pause = restart_pause(pause, lived)
            self._sleep_unless_stopped(pause)
            if not self._stopping:
                self._spawn(number)
        return 0

    def _sleep_unless_stopped(self, seconds: float) -> None:
        """A restart's pause, cut short by a stop (time.sleep resumes after a handler)."""
        until = time.monotonic() + seconds
        while not self._stopping and (left := until - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))

    def _spawn(self, number: int) -> None:
        """Fork worker ``number``, unless stopping.  The stop signals wait (blocked)
        from the check to the new pid's entry in ``children``: the stop handler, run in
        between, would not forward the stop to that worker (it would serve until the
        SIGKILL), and after it the parent's socket is closed (a worker forked then
        fails on it).  The child inherits the block: see _child."""
        parent = os.getpid()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            if self._stopping:
                return
            pid = os.fork()
            if pid == 0:
                self._child(number, parent, mask)  # never returns
            self.children[pid] = number
            self._born[pid] = time.monotonic()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _child(self, number: int, parent: int, mask: set[int | signal.Signals]) -> NoReturn:
        """In the new worker, with the stop signals still blocked: the parent's
        handlers (the stop handler of this Supervisor's copy) must never run here.
        Unblocked once the worker's own handling is in place, so that a stop sent in
        the meantime, pending, ends the worker then (the default action: it serves
        nothing yet); the server's handlers take over when it serves."""
        code = 0
        try:
            for signum in self._handled:  # (one ignored, by nohup, stays so)
                signal.signal(signum, signal.SIG_DFL)
            stop_when_orphaned(parent)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            self.child_main(number)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            logger.exception("Worker %d failed", number)
            code = 1
        finally:
            exit_if_stuck(code)
            logging.shutdown()  # (what waits to be logged: no atexit after os._exit)
            os._exit(code)

    def _on_stop(self, signum: int, frame: object) -> None:
        if not self._stop_requests.new(signum):  # the same request again (interrupt.py)
            return
        if self._stopping:  # second signal: no more patience
            logger.warning("Second stop request: killing the workers.")
            for pid in list(self.children):
                _kill(pid, signal.SIGKILL)
            return
        self._stopping = True
        for pid in list(self.children):
            _kill(pid, signal.SIGTERM)
        if self.on_stop is not None:
            self.on_stop()
        signal.signal(signal.SIGALRM, self._kill_stragglers)
        signal.setitimer(signal.ITIMER_REAL, self.grace + 5)

    def _kill_stragglers(self, signum: int, frame: object) -> None:
        if self.children:
            logger.warning(
                "%d worker(s) still running %g s after the stop: killing them.",
                len(self.children),
                self.grace + 5,
            )
        for pid in list(self.children):
            _kill(pid, signal.SIGKILL)


def stop_when_orphaned(parent: int) -> None:
    """Have the kernel send this worker SIGTERM (a graceful stop) when its parent dies:
    a parent killed outright would otherwise leave its workers serving on, holding the
    address.  Linux only (prctl PR_SET_PDEATHSIG); elsewhere orphans stay."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    if prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # it died before that took effect
        os.kill(os.getpid(), signal.SIGTERM)


def parent_gone(parent: int) -> bool:
    """Whether this worker's parent is dead or dying.  Its pid may still be the one
    getppid() gives for a while: the kernel's SIGTERM (PR_SET_PDEATHSIG) comes when the
    thread that forked exits, and the children go to one of the parent's threads still
    exiting (its log writer) before they go to init."""
    if os.getppid() != parent:
        return True
    try:
        with open(f"/proc/{parent}/stat") as stat:
            state = stat.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False  # (no /proc: getppid() has the last word)
    return state in ("Z", "X")  # a zombie: its main thread is gone


def restart_pause(previous: float, lived: float) -> float:
    """Seconds to wait before replacing a worker that died after ``lived`` seconds:
    workers that keep dying on start are restarted ever more slowly (0.1 s doubling up
    to 5 s apart, so that they cannot spin the CPU); one that had served a while is
    replaced at once."""
    if lived > STABLE_SECONDS:
        return 0.0
    return min(max(previous * 2, 0.1), 5.0)


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"

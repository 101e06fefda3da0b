"""Log lines written by a thread of their own: the loop thread never waits on stderr.

A server's stderr may be a pipe that nobody reads for a while (Docker's blocking log
mode, a stalled journald, ``| less``).  Written from the loop thread, the access log's
next line then stopped every connection, and the stop signals with them (their
handlers run in the loop thread).  ``StderrHandler`` takes the records and a
daemon thread writes them; while the pipe stays full, at most ``MAX_WAITING`` records
wait, the others are counted and dropped, and the count is logged once the writer
can go on.  Where the project's logging configuration has handlers for the server's
records (a console handler on the root logger, say), ``ForwardingHandler`` hands them
to those from such a thread, with the same bound.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import logging
import os
import select
import sys
import threading
import time
import weakref
from collections.abc import Iterable

from .interrupt import start_without_signals

LOG_FORMAT, LOG_DATE_FORMAT = "[%(asctime)s] %(message)s", "%d/%b/%Y %H:%M:%S"  # runserver's
MAX_WAITING = 10_000  # log records held while stderr is not read (about 1 KiB each)
FLUSH_WAIT = 2.0  # seconds a flush (at exit) waits for the writer, at most

_exceptions = logging.Formatter()


class BackgroundHandler(logging.Handler):
    """Hands each record to a thread of its own, which ``_deliver``s what waits."""

    writes_to_stderr = False  # (stuck when another writer to stderr found it stuck)

    def __init__(self, max_waiting: int = MAX_WAITING):
        super().__init__()
        self.max_waiting = max_waiting
        self._start()

    def _start(self) -> None:
        # (Again in a forked child: the writer thread did not come along, and the lock
        # may have been held by some thread of the parent's at the fork.)
        self._pid = os.getpid()
        self._waiting: collections.deque[logging.LogRecord] = collections.deque()
        # (Re-entrant: a signal handler that logs may run while this thread holds it.)
        self._changed = threading.Condition(threading.RLock())
        self._writing = False
        self._idle = False  # the writer waits for records (to be woken)
        self._dropped = 0
        # What an app wrote to wsgi.errors, when this writer writes it too (ErrorStream):
        # bounded on its own, so that an app's tracebacks never crowd out the log.
        self._waiting_raw = 0
        self._dropped_raw = 0
        self._closed = False
        self._gave_up = False  # a flush found stderr stuck: the next ones do not wait
        # Started with the first record: a process that forks its workers before it
        # logs anything (runcomet --workers) forks with no thread of this one's.
        self._started = False

    def emit(self, record: logging.LogRecord) -> None:
        if self._pid != os.getpid():
            self._start()
        try:
            record = self._kept(record)
        except Exception:
            self.handleError(record)
            return
        if self._closed:  # (at exit, after logging.shutdown(): no writer any more)
            self._write_now(record)
            return
        raw = record.name == _RAW
        with self._changed:
            if raw and self._waiting_raw >= self.max_waiting:
                self._dropped_raw += 1
                return
            if not raw and len(self._waiting) - self._waiting_raw >= self.max_waiting:
                self._dropped += 1
                return
            self._waiting.append(record)
            self._waiting_raw += raw
            if not self._started:
                writer = threading.Thread(target=self._write, name="comet-log", daemon=True)
                try:
                    start_without_signals(writer)
                except RuntimeError:  # no thread to be had (a memory limit): written here
                    self._waiting.pop()
                    self._waiting_raw -= raw
                    self._write_now(record)
                    return
                self._started = True
            elif self._idle:  # (else it takes this one with the others: no wake-up each)
                self._changed.notify_all()

    def _write(self) -> None:
        """All the records waiting, in one write each time (a busy server's access log:
        one system call, and one hand-over of the interpreter, for many lines)."""
        while True:
            with self._changed:
                self._idle = True
                self._changed.wait_for(lambda: self._waiting or self._closed)
                self._idle = False
                if not self._waiting:
                    return
                records = list(self._waiting)
                self._waiting.clear()
                self._waiting_raw = 0
                dropped, self._dropped = self._dropped, 0
                dropped_raw, self._dropped_raw = self._dropped_raw, 0
                self._writing = True
            try:
                if dropped_raw:
                    records.insert(0, _dropped_record(dropped_raw, "wsgi.errors write(s)"))
                if dropped:
                    records.insert(0, _dropped_record(dropped))
                self._deliver(records)
            except Exception:  # (a stderr closed: nowhere to say so either)
                pass
            with self._changed:
                self._writing = False
                self._changed.notify_all()

    def _kept(self, record: logging.LogRecord) -> logging.LogRecord:
        """What waits for the thread: a copy (other handlers may see the record after
        this one), as text now: its arguments may change, or hold a request, by the
        time the writer gets to it."""
        record = copy.copy(record)
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = record.exc_text or _exceptions.formatException(record.exc_info)
            record.exc_info = None  # (its frames hold everything they saw)
        return record

    def _deliver(self, records: list[logging.LogRecord]) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        """Closed (by ``logging.shutdown()``, or a ``dictConfig`` replacing every
        handler): it then delivers each record at once, in the caller's thread."""
        return self._closed

    def _write_now(self, record: logging.LogRecord) -> None:
        try:
            self._deliver([record])
        except Exception:
            pass

    def flush(self) -> None:
        """Wait (``FLUSH_WAIT`` at most: stderr may never be read again) until what
        was logged has been written; once it was found stuck, not again."""
        self._flush_until(time.monotonic() + FLUSH_WAIT)

    def _flush_until(self, deadline: float) -> None:
        global _stderr_stuck_in
        if self._pid != os.getpid() or self._gave_up:
            return
        if self.writes_to_stderr and _stderr_stuck_in == self._pid:
            self._gave_up = True  # (the log's writer and wsgi.errors': one wait, not two)
            return
        with self._changed:
            while self._waiting or self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._gave_up = True
                    if self.writes_to_stderr:
                        _stderr_stuck_in = self._pid
                    break
                self._changed.wait(left)

    def close(self) -> None:
        self.flush()
        if self._pid == os.getpid():
            with self._changed:
                self._closed = True
                self._changed.notify_all()
        super().close()


_RAW = "wsgi.errors"  # the name of the records that carry what an app wrote there


class StderrHandler(BackgroundHandler):
    """Hands each record to a thread that writes it to stderr (and what an app wrote to
    ``wsgi.errors``, given to it by ``ErrorStream``, as it was written)."""

    writes_to_stderr = True

    def _deliver(self, records: list[logging.LogRecord]) -> None:
        _write_text("".join(r.msg if r.name == _RAW else self.format(r) + "\n" for r in records))


class _RawStderrHandler(BackgroundHandler):
    """Hands the text of each record to a thread that writes it to stderr as it is."""

    writes_to_stderr = True

    def _deliver(self, records: list[logging.LogRecord]) -> None:
        # (What is not the app's text is this handler's count of dropped records.)
        _write_text("".join(r.msg if r.name == _RAW else f"{r.msg}\n" for r in records))


class ErrorStream:
    """``wsgi.errors``: what the app writes goes to stderr as it was written, from a
    writer thread, with a bound like the log's: a stderr nobody reads stopped every view
    thread that wrote a traceback there (Bottle does, Falcon too), and with
    ``--threads 0`` the loop.  Where the server's log goes to stderr (``log``), its
    writer writes this too, in the same queue: a request's access line comes after the
    traceback it wrote here, not between two parts of it."""

    def __init__(self, log: StderrHandler | None = None) -> None:
        self._writer: BackgroundHandler = log or _RawStderrHandler()

    def write(self, text: str) -> int:
        if not isinstance(text, str):  # (a text stream, PEP 3333 says)
            raise TypeError(f"wsgi.errors takes str, not {type(text).__name__}")
        if text:  # (emit: not through the log's filters, which are for its records)
            self._writer.emit(logging.makeLogRecord({"name": _RAW, "msg": text}))
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        """Nothing to wait for: waiting here on a stderr nobody reads is what this
        stream is for not doing (the writer's thread writes what it has at once)."""


_error_stream: ErrorStream | None = None


def error_stream() -> ErrorStream:
    """The process's ``wsgi.errors`` (one, as stderr is), written by the log's writer
    where the log goes to stderr (its first request comes after the log is set up)."""
    global _error_stream
    if _error_stream is None:
        _error_stream = ErrorStream(_stderr_log)
    return _error_stream


_stderr_log: StderrHandler | None = None  # the server's log, where it goes to stderr


class ForwardingHandler(BackgroundHandler):
    """Hands each record to a thread that passes it on to ``handlers`` (each one that
    takes its level), then, if ``parent`` is given, to the handlers above it (as
    propagation does)."""

    def __init__(self, handlers: list[logging.Handler], parent: logging.Logger | None):
        self.handlers, self.parent = handlers, parent
        super().__init__()
        _forwarders.add(self)

    def _kept(self, record: logging.LogRecord) -> logging.LogRecord:
        """The record as it came (a copy): the project's handlers may want all of it,
        ``exc_info`` included (Django's AdminEmailHandler mails its traceback).  Every
        server record has a ``remote_addr`` ("-" where no request is concerned), so
        that a format that shows the access log's does not fail on the others."""
        record = copy.copy(record)
        if not hasattr(record, "remote_addr"):
            record.remote_addr = "-"
        return record

    def writes_to_a_full_stream(self) -> bool:
        """Whether one of the handlers it hands records to (its own, or above it) writes
        to a stream that takes nothing now (a pipe nobody reads)."""
        handlers = list(self.handlers)
        logger = self.parent
        while logger is not None:
            handlers += logger.handlers
            logger = logger.parent if logger.propagate else None
        for handler in handlers:
            try:
                fd = handler.stream.fileno()  # type: ignore[attr-defined]
                _, writable, _ = select.select([], [fd], [], 0)
            except Exception:  # (no stream, no descriptor: a file, a socket of its own)
                continue
            if not writable:
                return True
        return False

    def _deliver(self, records: list[logging.LogRecord]) -> None:
        for record in records:
            for handler in self.handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)
            if self.parent is not None:
                self.parent.callHandlers(record)


# The process (its pid) in which a flush found stderr stuck: the other writers to it
# do not wait for it again.
_stderr_stuck_in: int | None = None

_forwarders: weakref.WeakSet[ForwardingHandler] = weakref.WeakSet()


def flush_all() -> None:
    """Wait (``FLUSH_WAIT`` in all) until what this process logged is written: by the
    log's writer to stderr, and by each thread handing records to the project's
    handlers (a logger under ``django_comet`` that LOGGING gave handlers has its own)."""
    deadline = time.monotonic() + FLUSH_WAIT
    # The forwarders first: what they hand on may go to the log's writer to stderr (a
    # logger that LOGGING configured and that propagates).
    for writer in [*list(_forwarders), _stderr_log]:
        if writer is not None:
            writer._flush_until(deadline)


def exit_if_stuck(status: int) -> None:
    """At the end: end the process now (``os._exit``) when a thread handing records to
    the project's handlers is stuck in one of them on a stream nobody reads (a console
    handler on a full pipe), after ``FLUSH_WAIT`` for it: ``logging.shutdown()`` would
    wait for ever for that handler's lock, and the interpreter's exit for stderr's.
    Else return, for the exit to take its course (a handler that is only slow, mailing
    or shipping its records, is waited for, and atexit's functions run)."""
    stuck = False
    deadline = time.monotonic() + FLUSH_WAIT  # one wait for all of them, not one each
    for forwarder in list(_forwarders):
        if forwarder._pid == os.getpid():
            forwarder._flush_until(deadline)
            stuck = stuck or (forwarder._gave_up and forwarder.writes_to_a_full_stream())
    if stuck:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(status)


def handle_in_background(logger: logging.Logger) -> None:
    """Have ``logger``'s records reach the handlers they reach now (its own, and its
    ancestors' while it propagates) from a thread of their own: a console handler on a
    stderr that nobody reads must not stop the loop thread."""
    if any(isinstance(handler, BackgroundHandler) for handler in logger.handlers):
        return
    forwarding = ForwardingHandler(
        list(logger.handlers), logger.parent if logger.propagate else None
    )
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.addHandler(forwarding)
    logger.propagate = False


def forward_in_background(top: logging.Logger) -> None:
    """``top`` and the loggers under it: each with handlers of its own (a project's
    logging configuration gave them) hands its records to them from a thread of its
    own, and so does ``top`` if its records reach any handler above it."""
    prefix = top.name + "."
    for name, each in list(logging.root.manager.loggerDict.items()):
        if name.startswith(prefix) and isinstance(each, logging.Logger) and each.handlers:
            handle_in_background(each)
    if top.hasHandlers():
        handle_in_background(top)


# Held by the writer threads only, while they write: the log's and wsgi.errors' writes
# to a full pipe go out in parts, and the other's lines came between two parts.
_writing_to_stderr = threading.Lock()


def _new_lock_in_child() -> None:  # (a writer of the parent's may have held it at the fork)
    global _writing_to_stderr
    _writing_to_stderr = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)


def _write_text(text: str) -> None:
    """To stderr's descriptor, with no lock of Python's held while it waits (but this
    module's own): the interpreter takes stderr's own to flush it at exit, and
    logging.shutdown() each handler's (a writer stuck in a write holding one hung the
    exit)."""
    with _writing_to_stderr:
        stream = sys.stderr
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # (not a file: a test's capture)
            stream.write(text)
            stream.flush()
            return
        data = text.encode(getattr(stream, "encoding", None) or "utf-8", "backslashreplace")
        while data:
            data = data[os.write(fd, data) :]


def _dropped_record(count: int, what: str = "log line(s)") -> logging.LogRecord:
    record = logging.LogRecord(
        "django_comet",
        logging.WARNING,
        __file__,
        0,
        f"{count} {what} dropped: stderr was not read meanwhile",
        None,
        None,
    )
    record.remote_addr = "-"  # (as on every server record: ForwardingHandler._kept)
    return record


def log_to_stderr(logger: logging.Logger, fmt: str, datefmt: str | None = None) -> StderrHandler:
    """``logger``'s records to stderr, written by a thread of their own."""
    global _stderr_log
    handler = _stderr_log = StderrHandler()
    handler.setFormatter(logging.Formatter(fmt, datefmt))
    logger.addHandler(handler)
    return handler

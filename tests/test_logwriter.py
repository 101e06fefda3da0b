"""The server's log lines go to stderr from a thread of their own (logwriter.py)."""

import logging
import os
import threading

from django_comet.evloop import logwriter
from django_comet.evloop.logwriter import StderrHandler

from .processes import wait_until


def written_past_a_stall(monkeypatch, then) -> list[str]:
    """stderr is a pipe nobody reads: a record larger than it holds stalls the writer
    of a StderrHandler with room for two records (of each kind); ``then(handler,
    logger)`` logs more meanwhile.  The lines written once the pipe is read (after the
    large one, whose length stands for it)."""
    read_end, write_end = os.pipe()
    stderr = os.fdopen(write_end, "w")
    monkeypatch.setattr("sys.stderr", stderr)
    handler = StderrHandler(max_waiting=2)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.Logger("logwriter-test")
    logger.addHandler(handler)
    try:
        logger.warning("%s", "x" * 200_000)  # more than a pipe holds: the writer waits
        wait_until(lambda: handler._writing)
        then(handler, logger)
        read = []
        reader = threading.Thread(target=lambda: read.append(_read_all(read_end)))
        reader.start()
        handler.close()  # (what waits is written first)
        stderr.close()
        reader.join(10)
        lines = read[0].decode().splitlines()
        return [len(lines[0]), *lines[1:]]
    finally:
        os.close(read_end)


def test_lines_past_the_bound_while_stderr_is_not_read_are_counted_and_said(monkeypatch):
    def five_lines(handler, logger):  # two wait, three are dropped
        for n in range(5):
            logger.warning("line %d", n)

    assert written_past_a_stall(monkeypatch, five_lines) == [
        200_000,
        "3 log line(s) dropped: stderr was not read meanwhile",
        "line 0",
        "line 1",
    ]


def test_wsgi_errors_through_the_logs_writer_have_a_bound_of_their_own(monkeypatch):
    """With one queue for both, an app writing tracebacks to wsgi.errors while stderr
    was not read crowded the server's own records out, and was counted as log lines
    (found by a diff review)."""

    def five_writes_and_a_line(handler, logger):
        errors = logwriter.ErrorStream(handler)
        for n in range(5):  # two wait, three are dropped
            errors.write(f"app {n}\n")
        logger.warning("the server's")

    assert written_past_a_stall(monkeypatch, five_writes_and_a_line) == [
        200_000,
        "3 wsgi.errors write(s) dropped: stderr was not read meanwhile",
        "app 0",
        "app 1",
        "the server's",
    ]


def test_a_records_arguments_are_taken_as_text_when_it_is_logged(monkeypatch, capfd):
    """The writer formats later: a record must not see what its arguments became since,
    nor hold on to them (a request, a traceback's frames)."""
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.Logger("logwriter-test")
    logger.addHandler(handler)
    seen = ["before"]
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("state: %s", seen)
    seen[0] = "after"
    handler.close()
    err = capfd.readouterr().err
    assert "state: ['before']" in err
    assert "ValueError: boom" in err


def test_other_handlers_see_the_record_as_it_was_logged():
    """The handler makes text of a copy: a handler after it (LOGGING's, on the same
    logger) still gets the arguments and the exception."""
    seen = []
    capture = logging.Handler()
    capture.emit = seen.append
    logger = logging.Logger("logwriter-test")
    logger.addHandler(StderrHandler())
    logger.addHandler(capture)
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("state: %s", "arg")
    assert seen[0].args == ("arg",)
    assert seen[0].exc_info[0] is ValueError


def test_a_flush_that_found_stderr_stuck_does_not_wait_again(monkeypatch):
    """logging.shutdown() flushes each handler, then closes it, which flushes too: the
    exit waited twice for a stderr nobody read."""
    monkeypatch.setattr(logwriter, "FLUSH_WAIT", 0.05)
    monkeypatch.setattr(logwriter, "_stderr_stuck_in", None)  # (put back afterwards)
    read_end, write_end = os.pipe()
    stderr = os.fdopen(write_end, "w")
    monkeypatch.setattr("sys.stderr", stderr)
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    try:
        handler.emit(logging.makeLogRecord({"msg": "x" * 200_000}))  # more than a pipe holds
        wait_until(lambda: handler._writing)
        handler.flush()  # gives up
        waits = []
        monkeypatch.setattr(handler._changed, "wait", lambda *a: waits.append(a))
        handler.close()
        assert waits == []
    finally:
        os.close(read_end)  # (the writer's write fails, and it goes)
        wait_until(lambda: not handler._writing)  # (before its descriptor is reused)
        stderr.close()


def test_the_writers_to_a_stuck_stderr_wait_for_it_once_in_all(monkeypatch):
    """The log's writer and wsgi.errors' write to the same stderr: at exit, each waited
    its 2 s for it."""
    monkeypatch.setattr(logwriter, "FLUSH_WAIT", 0.05)
    monkeypatch.setattr(logwriter, "_stderr_stuck_in", None)  # (put back afterwards)
    read_end, write_end = os.pipe()
    stderr = os.fdopen(write_end, "w")
    monkeypatch.setattr("sys.stderr", stderr)
    log = StderrHandler()
    errors = logwriter.ErrorStream()
    try:
        log.emit(logging.makeLogRecord({"msg": "x" * 200_000}))  # more than a pipe holds
        errors.write("y" * 200_000)
        wait_until(lambda: log._writing and errors._writer._writing)
        log.flush()  # gives up
        waits = []
        monkeypatch.setattr(errors._writer._changed, "wait", lambda *a: waits.append(a))
        errors._writer.flush()
        assert waits == []
    finally:
        os.close(read_end)  # (the writers' writes fail, and they go)
        # (Gone before the descriptor is reused: a writer that waited for the other
        # would write into the next test's pipe.)
        wait_until(lambda: not (log._writing or errors._writer._writing))
        stderr.close()


def test_the_log_and_wsgi_errors_never_write_into_each_others_text(monkeypatch):
    """Each writes its text to a full pipe in parts, as the pipe takes it: the log's
    lines came between two parts of an app's traceback."""
    read_end, write_end = os.pipe()
    stderr = os.fdopen(write_end, "w")
    monkeypatch.setattr("sys.stderr", stderr)
    log = StderrHandler()
    log.setFormatter(logging.Formatter("%(message)s"))
    errors = logwriter.ErrorStream()
    try:
        errors.write("E" * 300_000 + "\n")  # more than a pipe holds: written in parts
        wait_until(lambda: errors._writer._writing)
        log.emit(logging.makeLogRecord({"msg": "a line of the log's"}))
        wait_until(lambda: log._writing)  # (waiting to write, too)
        read = b""
        while read.count(b"\n") < 2:
            read += os.read(read_end, 4096)  # (the pipe takes more in small steps)
        lines = read.decode().splitlines()
        assert sorted(lines) == ["E" * 300_000, "a line of the log's"], [
            (line[:20], len(line)) for line in lines
        ]
    finally:
        os.close(read_end)
        stderr.close()


def test_a_record_is_written_at_once_when_no_writer_thread_can_start(monkeypatch, capfd):
    """Under a memory limit the writer's thread may not start: the record is written
    in the logging thread instead. The error went to the code that logged, and a stop
    signal's handler, logging "Stopping", failed: the server never stopped (found by a
    diff review, under ulimit -v)."""

    def no_thread(thread):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(logwriter, "start_without_signals", no_thread)
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.handle(logging.makeLogRecord({"msg": "Stopping"}))
    handler.handle(logging.makeLogRecord({"msg": "Stopped"}))
    assert capfd.readouterr().err == "Stopping\nStopped\n"
    handler.close()


def test_a_record_logged_after_the_handler_closed_is_written_at_once(capfd):
    """At exit, after logging.shutdown(): no writer thread waits any more."""
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.close()
    handler.handle(logging.makeLogRecord({"msg": "late line"}))
    assert capfd.readouterr().err == "late line\n"


def _read_all(fd):
    out = b""
    while chunk := os.read(fd, 65536):
        out += chunk
    return out

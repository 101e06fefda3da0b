"""The server's log lines go to stderr from a thread of their own (logwriter.py)."""

import logging
import os
import threading

from django_comet.evloop.logwriter import StderrHandler

from .processes import wait_until


def test_lines_past_the_bound_while_stderr_is_not_read_are_counted_and_said(monkeypatch):
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
        for n in range(5):  # two wait, three are dropped
            logger.warning("line %d", n)
        read = []
        reader = threading.Thread(target=lambda: read.append(_read_all(read_end)))
        reader.start()
        handler.close()  # (what waits is written first)
        stderr.close()
        reader.join(10)
        lines = read[0].decode().splitlines()
        assert [len(lines[0]), *lines[1:]] == [
            200_000,
            "3 log line(s) dropped: stderr was not read meanwhile",
            "line 0",
            "line 1",
        ]
    finally:
        os.close(read_end)


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


def _read_all(fd):
    out = b""
    while chunk := os.read(fd, 65536):
        out += chunk
    return out

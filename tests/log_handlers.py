"""Logging handlers of a project's: one that reads exc_info (as Django's AdminEmailHandler),
one that is slow."""

import logging
import time


class ExceptionTypes(logging.Handler):
    """Writes the type of each record's exception (its exc_info), one per line."""

    def __init__(self, filename):
        super().__init__()
        self.filename = filename

    def emit(self, record):
        kind = type(record.exc_info[1]).__name__ if record.exc_info else "-"
        with open(self.filename, "a") as out:
            out.write(f"{record.name} {kind}\n")


class Slow(logging.Handler):
    """A handler that takes its time with each record (mailing it, shipping it), then
    appends its message to a file."""

    def __init__(self, filename, seconds):
        super().__init__()
        self.filename, self.seconds = filename, seconds

    def emit(self, record):
        time.sleep(self.seconds)
        with open(self.filename, "a") as out:
            out.write(record.getMessage() + "\n")

"""A logging handler of a project's, as Django's AdminEmailHandler: it reads exc_info."""

import logging


class ExceptionTypes(logging.Handler):
    """Writes the type of each record's exception (its exc_info), one per line."""

    def __init__(self, filename):
        super().__init__()
        self.filename = filename

    def emit(self, record):
        kind = type(record.exc_info[1]).__name__ if record.exc_info else "-"
        with open(self.filename, "a") as out:
            out.write(f"{record.name} {kind}\n")

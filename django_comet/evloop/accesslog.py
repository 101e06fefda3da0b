"""The access log: one line per request (logger ``django_comet.access``).

``"METHOD target PROTOCOL" status bytes duration`` and, for a response that did not
end cleanly, ``(cut by the server)`` or ``(client gone)``; a request refused before any
app saw it gets ``"METHOD target" status - (refused)``.  The target is between quotes:
a quote or a backslash in it is escaped (as Apache does), and so are C1 controls (it is
decoded as latin-1), so that a client cannot forge the fields of its own line; a
refused target may hold what a served one cannot (control characters: a terminal's
escapes; bytes over 0x7f), escaped too, and is cut to ``LOGGED_TARGET`` characters.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("django_comet.access")

LOGGED_TARGET = 200  # characters of a refused request's target in its log line
_LOGGED_AS = {ord('"'): '\\"', ord("\\"): "\\\\"} | {c: f"\\x{c:02x}" for c in range(0x80, 0xA0)}
_REFUSED_AS = _LOGGED_AS | {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0x100)]}


def enabled() -> bool:
    return logger.isEnabledFor(logging.INFO)


def served(
    method: str,
    path: str,
    protocol: str,
    code: int,
    sent: int,
    ms: float,
    how: str,
    remote_addr: str = "-",
) -> None:
    """``how``: "" for a clean end, else what ended it ("cut by the server", ...).
    ``remote_addr`` (the client's address, past trusted proxies) is not in the line, as
    in runserver's, but in the record, for a ``LOGGING`` format's ``%(remote_addr)s``."""
    logger.info(
        '"%s %s %s" %s %d %.1fms%s',
        method,
        path.translate(_LOGGED_AS),
        protocol,
        code or "-",
        sent,
        ms,
        f" ({how})" if how else "",
        extra={"remote_addr": remote_addr},
    )


def refused(method: str, target: str, status: int, remote_addr: str = "-") -> None:
    """``remote_addr``: the peer's (no header of a refused request is believed)."""
    target = target.translate(_REFUSED_AS)  # (then cut: an escape is 4 characters)
    if len(target) > LOGGED_TARGET:
        target = target[:LOGGED_TARGET] + "..."
    logger.info(
        '"%s %s" %d - (refused)',
        method,
        target,
        status,
        extra={"remote_addr": remote_addr},
    )

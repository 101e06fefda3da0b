"""The open-files limit: every connection the server holds is a file descriptor.

A shell's soft limit (1,024 on most systems) capped a server at about that many held
connections, while the hard limit allows far more (524,288 on a systemd system).  The
server raises its soft limit to the hard one at startup, as Go's runtime does, and says
so when even that is below ``COMET_MAX_CONNECTIONS``.  (A process it starts inherits
the raised limit; one that calls ``select()`` on a descriptor over 1,023 fails, as it
would in any server holding that many.)
"""

from __future__ import annotations

import logging

try:
    import resource
except ImportError:  # (not on Windows)
    resource = None  # type: ignore[assignment]

logger = logging.getLogger("django_comet.server")

HIGHEST = 1 << 20  # Linux refuses more than fs.nr_open (1,048,576 by default)


def raise_open_files_limit(wanted: int) -> int:
    """Raise the soft limit to the hard one (up to ``HIGHEST``); log when the limit is
    below ``wanted`` connections (0: no bound of the server's).  Returns the limit."""
    if resource is None:
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = HIGHEST if hard == resource.RLIM_INFINITY else min(hard, HIGHEST)
    if soft != resource.RLIM_INFINITY and soft < ceiling:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
            soft = ceiling
        except (OSError, ValueError):  # (macOS refuses more than its own OPEN_MAX)
            pass
    if soft != resource.RLIM_INFINITY and wanted and soft < wanted:
        logger.warning(
            "Open files are limited to %d (ulimit -n, hard limit %s): that many "
            "connections at most, fewer than COMET_MAX_CONNECTIONS (%d). Raise it "
            "(systemd: LimitNOFILE=).",
            soft,
            "unlimited" if hard == resource.RLIM_INFINITY else hard,
            wanted,
        )
    return soft

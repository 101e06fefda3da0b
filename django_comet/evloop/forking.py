"""A process forked from a serving one (by a view: os.fork, multiprocessing's "fork"
start method) lets go of the server's sockets first thing.

A child that kept the listening socket would keep the port after the server exits (it
could not start again: "port in use") and take connections nobody answers; one that
kept a client's connection would hold it open after the server closed it, and a client
reading to the end would wait for as long as the child lives.  (subprocess closes them
itself: it executes a new program, with close_fds.)  Pre-forked workers are forked
before they serve, and keep the listening socket they share.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

Descriptors = Callable[[], Iterable[int]]

_sources: list[Descriptors] = []


def close_in_children(descriptors: Descriptors) -> None:
    """Until ``forget(descriptors)``, a forked child closes what ``descriptors()`` names."""
    _sources.append(descriptors)


def forget(descriptors: Descriptors) -> None:
    if descriptors in _sources:
        _sources.remove(descriptors)


def _in_child() -> None:
    # The one thread a child has reads the descriptors (from libevent's structures, for
    # the connections): the loop thread, the only one that may touch libevent, is not
    # in the child, and the child never runs the loop.
    sources = list(_sources)
    _sources.clear()  # the child serves nothing
    for descriptors in sources:
        for fd in descriptors():
            try:
                os.close(fd)
            except OSError:
                pass


if hasattr(os, "register_at_fork"):  # (not on Windows)
    os.register_at_fork(after_in_child=_in_child)

"""The deferral protocol: how a response iterable says "more later".

A WSGI application's result may carry a ``comet_deferral`` attribute.  A server that
understands it (this one) sets ``claimed`` before iterating, so the iterable yields only
the content of the current stage; the server sends that as a chunk, keeps the
connection, waits (``delay`` seconds), then calls ``resume()`` on a worker thread.  The
iterable ``resume()`` returns is the next stage: its content is the next chunk and it may
carry a deferral of its own.  A server that knows nothing of this just iterates, and the
iterable is expected to block through its stages by itself.

This module defines the protocol only; ``django_comet.deferred`` implements it for Django.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

ATTRIBUTE = "comet_deferral"


class Deferral:
    __slots__ = ("claimed", "delay", "resume")

    def __init__(self, resume: Callable[[], Iterable[bytes]], *, delay: float):
        if delay < 0:
            raise ValueError("a deferral's delay cannot be negative")
        self.delay = delay
        self.resume = resume
        self.claimed = False


def claim(result: Any) -> Deferral | None:
    """Server side: take the deferral a response iterable carries, if any."""
    deferral = getattr(result, ATTRIBUTE, None)
    if isinstance(deferral, Deferral):
        deferral.claimed = True
        return deferral
    return None

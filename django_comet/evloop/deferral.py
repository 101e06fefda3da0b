"""The deferral protocol: how a response iterable says "more later".

A WSGI application's result may carry a ``comet_deferral`` attribute holding one of:

- ``Deferral``: after ``delay`` seconds, call ``resume()`` (on a view thread, not always the
  view's; the loop thread's with ``--threads 0``) for the next stage (the 2007 staged response);
- ``ChannelWait``: when an event newer than ``after`` exists on one of ``channels`` (at
  once if the hub's history has one), or after ``timeout`` seconds, call
  ``resume(event_or_None)`` for the next stage (long-poll);
- ``Stream``: stay open and write the SSE frame of every event on ``channels`` newer
  than ``cursor`` as a chunk, until the client leaves or the server stops.

A server that understands it (this one) sets ``claimed`` before iterating, so the
iterable yields only the content of the current stage; the server sends that as a chunk
and keeps the connection.  A WSGI middleware may return an iterable of its own around
the application's (Sentry's and New Relic's do), which hides the attribute: so the
response also ``announce``s its deferral in the request's environ whenever its content
is taken (to be iterated, or wrapped by a middleware), and a server that found no
attribute claims it from there once it has the first item, before it asks for the next
(the content checks ``claimed`` only after its first part, and ``withdraw``s it then,
claimed or not: a middleware that collects the body has taken more, and the environ
must not keep it).  The content marks when it ``begin``s: one announced whose content
has not begun by the iterable's second item, or its end, belongs to a response taken,
then dropped for another (a middleware's own), and the server lets it go.

The iterable ``resume()`` returns is the next stage: its content is the next chunk and
it may carry a deferral of its own.  A server that knows nothing of this just iterates,
and the iterable blocks through its stages by itself.

This module defines the protocol only; ``django_comet.deferred`` and ``django_comet.sse``
implement it for Django.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from .hub import hub

ATTRIBUTE = "comet_deferral"
ANNOUNCED = "comet.deferral"  # the environ key of a deferral announced (see above)
STARTED = "comet.deferral.started"  # ... and of its content, once that started
MAX_SECONDS = 1e7  # about 115 days: a longer delay or timeout is a mistake


class Deferral:
    __slots__ = ("claimed", "delay", "resume")

    def __init__(self, resume: Callable[[], Iterable[bytes]], *, delay: float):
        if not isinstance(delay, int | float) or not 0 <= delay <= MAX_SECONDS:  # NaN too
            raise ValueError(f"a deferral's delay must be 0 to {MAX_SECONDS:g} s, not {delay!r}")
        self.delay = delay
        self.resume = resume
        self.claimed = False


class ChannelWait:
    """With ``render`` instead of ``resume``, no stage runs: the server answers in the
    loop thread with ``render(events, after)`` (bytes, the rest of the body), or
    ``render(events, after, gap=True)`` when some events newer than ``after`` are gone
    from the history (``gap``: the view's replay found so), and ends the response;
    waiters with the same cursor share one rendering per event."""

    __slots__ = (
        "after",
        "channels",
        "claimed",
        "due",
        "gap",
        "lost_mark",
        "missed",
        "ready",
        "render",
        "resume",
        "timeout",
    )

    def __init__(
        self,
        resume: Callable[[Any], Iterable[bytes]] | None,
        *,
        channels: list[str],
        after: int,
        timeout: float,
        ready: list[Any] | None = None,
        render: Callable[..., bytes] | None = None,
        gap: bool = False,
    ):
        if not isinstance(timeout, int | float) or not 0 < timeout <= MAX_SECONDS:  # NaN too
            raise ValueError(
                f"a channel wait's timeout must be over 0, up to {MAX_SECONDS:g} s: {timeout!r}"
            )
        if (resume is None) == (render is None):
            raise ValueError("a channel wait needs either resume or render")
        self.render = render
        self.gap = gap
        self.resume = resume
        self.channels = list(dict.fromkeys(channels))  # a channel named twice counts once
        self.after = after
        self.timeout = timeout
        self.ready = ready or None  # events already known to be newer: answer at once
        self.claimed = False
        self.lost_mark = hub.lost_mark(self.channels)  # losses after this are news
        # Set by the server when events after ``after`` were lost while it waited (a
        # broker's gap): its answer says so, with the events that come after them.
        self.missed = False
        self.due: Any = None  # set by the server: where its timeout waits (Deadlines)


class Stream:
    __slots__ = (
        "backlog",
        "behind",
        "channels",
        "claimed",
        "cursor",
        "gap_told_at",
        "gap_told_through",
        "lost_mark",
        "recheck",
        "unsaid_gap",
    )

    def __init__(self, channels: list[str], cursor: int, *, lost_mark: int | None = None):
        self.channels = list(dict.fromkeys(channels))
        self.cursor = cursor  # the newest event id already in the response's first content
        # Losses after this are news: the hub's mark when the view read its replay (its
        # first content told of the losses before, if they concerned it).
        self.lost_mark = hub.lost_mark(self.channels) if lost_mark is None else lost_mark
        self.claimed = False
        # Set by the server: bytes of the first content (a replay) still unsent when the
        # stream was held, allowed on top of the bound on unsent output, so that a slow
        # link catching up on a large replay is not cut at the next event, every time.
        self.backlog = 0
        # Set by the server while the stream is over that bound: it is written nothing
        # until it has taken half of it, then catches up from the history (holding.py).
        self.behind = False
        # Set by the server: the newest id of events lost that a stream behind is to be
        # told of as it catches up, before the first event after them (0: none).
        self.unsaid_gap = 0
        # Set by the server when it writes the stream a gap event: the stream's cursor,
        # and the newest id published then, as far as this process knew.  A loss of an
        # event no newer, with no event written since, is a loss that gap event told
        # of (a process far behind comes to a run of them); a newer one is news (the
        # client reloaded its state since).
        self.gap_told_at = -1
        self.gap_told_through = 0
        self.recheck: Any = None  # set by the server while behind: its next look (Deadlines)


AnyDeferral = Deferral | ChannelWait | Stream


_claiming = False  # a server that claims deferrals runs in this process
_told_hidden = False


def claiming() -> None:
    """Server side: say that a server claiming deferrals runs in this process."""
    global _claiming
    _claiming = True


def blocking_through(what: str) -> None:
    """Held-response side: ``what`` is about to block its thread through its stages,
    since no server claimed it.  Where one runs, something hid the response from it:
    said once, with what to do."""
    global _told_hidden
    if _claiming and not _told_hidden:
        _told_hidden = True
        logging.getLogger("django_comet.server").warning(
            "%s waits in its view thread: the server never saw its response (a WSGI "
            "middleware around the application returned another iterable in its place?). "
            "Return the application's response as it is, or copy its %s attribute; "
            "said once",
            what,
            ATTRIBUTE,
        )


def claim(result: Any) -> AnyDeferral | None:
    """Server side: take the deferral a response iterable carries, if any."""
    deferral = getattr(result, ATTRIBUTE, None)
    if isinstance(deferral, (Deferral, ChannelWait, Stream)):
        deferral.claimed = True
        return deferral
    return None


def announce(environ: dict[str, Any] | None, deferral: AnyDeferral) -> None:
    """Held-response side: as the iterable starts, before its first item."""
    if environ is not None:
        environ[ANNOUNCED] = deferral


def begin(environ: dict[str, Any] | None, deferral: AnyDeferral) -> None:
    """Held-response side, as the content starts: the announcement is this content's."""
    if environ is not None and environ.get(ANNOUNCED) is deferral:
        environ[STARTED] = deferral


def withdraw(environ: dict[str, Any] | None, deferral: AnyDeferral) -> None:
    """Held-response side, once the first item was taken and ``claimed`` read: too late
    for a server to claim it now."""
    if environ is not None and environ.get(ANNOUNCED) is deferral:
        del environ[ANNOUNCED]
        environ.pop(STARTED, None)


def claim_announced(environ: dict[str, Any]) -> AnyDeferral | None:
    """Server side, after the first item of an iterable that carried no deferral: take
    the one its content announced, if any.  Left in the environ: once the iterable is
    done, one still there was never withdrawn, and so its content never ran (its
    response was taken, then dropped: ``began`` lets it go)."""
    deferral = environ.get(ANNOUNCED)
    if isinstance(deferral, (Deferral, ChannelWait, Stream)) and not deferral.claimed:
        deferral.claimed = True
        return deferral
    return None


def began(environ: dict[str, Any], deferral: AnyDeferral) -> bool:
    """Server side, at an iterable's second item or end, of a deferral claimed from the
    environ: whether its content began (or ran, and withdrew it); if not, it belongs to
    a response that was dropped, and is let go."""
    if environ.get(ANNOUNCED) is not deferral or environ.get(STARTED) is deferral:
        return True
    del environ[ANNOUNCED]
    deferral.claimed = False
    return False

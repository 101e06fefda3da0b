"""When the server takes new connections: accepting pauses while accept() fails (out of
file descriptors) and while views fall behind, so that a wave of connections is taken
as fast as the views get through it (mixed into ``Server``)."""

from __future__ import annotations

import errno
import logging
import os
from typing import TYPE_CHECKING, Any

from .libc import c_errno

if TYPE_CHECKING:
    from .loop import Loop
    from .workers import ThreadPool

logger = logging.getLogger("django_comet.server")

# Requests waiting for a view thread (with --threads 0, for the loop thread) beyond which
# new connections wait in the kernel's listen backlog, and below which they are accepted
# again (checked every few ms): a wave of connections is taken as fast as the views get
# through it, not all at once, so the heap is not grown for thousands of requests in
# flight (and left with holes after), nor views run for clients long gone.
VIEW_BACKLOG_HIGH = 64
VIEW_BACKLOG_LOW = 16
VIEW_BACKLOG_CHECK = 0.005


class Admission:
    """Mixed into ``Server``; loop thread."""

    loop: Loop
    _lib: Any
    _pool: ThreadPool | None
    _listener: Any
    _bound: Any
    _draining: bool
    _own_timers: dict[str, Any]
    _pauses: set[str]
    _accepted_this_pass: int
    accept_pauses: int
    backlog_pauses: int

    def _on_accept_error(self, listener: int, _arg: Any) -> None:
        """accept() failed (EMFILE: out of file descriptors, ENFILE, ENOBUFS): pause
        accepting for a moment instead of spinning on a listening socket that stays
        readable; connections already open go on being served."""
        err = c_errno()
        self.accept_pauses += 1
        logger.warning(
            "accept() failed (%s); pausing new connections for 0.5 s",
            f"{errno.errorcode.get(err, err)}: {os.strerror(err)}" if err else "errno ?",
        )
        self._accepting(False, "accept-error")
        if "accept-error" not in self._own_timers:
            self._own_timers["accept-error"] = self.loop.call_later(
                0.5, self._resume_after_accept_error, background=True
            )

    def _resume_after_accept_error(self) -> None:
        del self._own_timers["accept-error"]
        self._accepting(True, "accept-error")

    def _accepting(self, on: bool, reason: str = "connections") -> None:
        """Pause or resume accepting; accepting resumes when no reason to pause is left."""
        if on:
            self._pauses.discard(reason)
        else:
            self._pauses.add(reason)
        if self._draining or self._bound is None:
            return
        if self._pauses:
            self._lib.evconnlistener_disable(self._listener)
        else:
            self._lib.evconnlistener_enable(self._listener)

    def _accepted_for_the_loop(self) -> None:
        """``--threads 0``, a connection accepted.  While the loop runs views, a wave of
        connections builds up in the listen backlog, and libevent's listener takes all
        of it in one go (it accepts until none is left): the requests they bring count
        as views waiting before they are read."""
        if not self._accepted_this_pass:
            self.loop.call_after_pass(self._forget_accepted)
        self._accepted_this_pass += 1
        if self._accepted_this_pass + self.loop.after_pass_waiting > VIEW_BACKLOG_HIGH:
            self._pause_for_views()

    def _forget_accepted(self) -> None:
        self._accepted_this_pass = 0  # (their requests are read, or on their way)

    def _pause_for_views(self) -> None:
        if "views" in self._pauses:
            return
        self.backlog_pauses += 1
        self._accepting(False, "views")
        self._own_timers["views"] = self.loop.call_later(
            VIEW_BACKLOG_CHECK, self._accept_when_views_caught_up, background=True
        )

    def _views_waiting(self) -> int:
        """Requests whose views have yet to start: queued for a view thread, or with
        ``--threads 0`` for the loop thread, after its pass (a batch at a time)."""
        return self._pool.backlog if self._pool is not None else self.loop.after_pass_waiting

    def _accept_when_views_caught_up(self) -> None:
        del self._own_timers["views"]
        if self._draining:  # accepting is over: nothing to resume
            return
        if self._views_waiting() <= VIEW_BACKLOG_LOW:
            self._accepting(True, "views")
        else:
            self._own_timers["views"] = self.loop.call_later(
                VIEW_BACKLOG_CHECK, self._accept_when_views_caught_up, background=True
            )

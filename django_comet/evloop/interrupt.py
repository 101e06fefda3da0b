"""Stopping a server whose loop thread is inside a view (``--threads 0``).

There the loop runs the views itself: a view that blocks (a slow query, a sleep) keeps
the loop from the stop a signal asks for, from its grace period's end, and from a second
signal's "stop now".  Python runs signal handlers in the main thread (the loop's),
between two bytecodes of whatever it runs, a view's included.  So the server notes when
the application's code runs (``Server._in_app``: a view, its body's iteration, its
``close()``), and a handler that finds it running there raises ``StopNow`` into it: at a
second stop signal, or at a SIGALRM set for the end of the grace period.  Never into the
server's own code, which may be between two libevent calls.

``StopNow`` passes every ``except BaseException`` of the server (producer.py) up to the
loop, which stops; a callback libevent makes straight into Python (not through
``Loop._run``) is wrapped to hand it to the loop too (``Loop.guarded``): ctypes would
print it and drop it.
"""

from __future__ import annotations


class StopNow(BaseException):
    """Raised into a view running in the loop thread: the server stops at once."""

"""The thread pool's spares standing in for threads streaming bodies (ThreadPool.in_body),
in-process as tests/test_loop.py tests the pool: submit() relieves a thread at once, so
the pool's size right after it tells (no sleeps, no timings).  Over real sockets:
tests/test_wsgi_streaming.py."""

import logging
import threading

from django_comet.evloop.workers import ThreadPool

from .processes import wait_until


def _streamer(pool, streaming, release, before=None):
    def streams():
        if before is not None:
            before()
        with pool.in_body():
            streaming.set()
            assert release.wait(10)

    return streams


def test_a_body_that_begins_while_calls_wait_gets_a_spare_at_once():
    """in_body() relieves its thread when calls wait already: no submit() comes to do
    it, and the waiting call would wait for the body's end."""
    pool = ThreadPool(1, spares=1)
    go, streaming, release, served = (threading.Event() for _ in range(4))
    try:
        pool.submit(_streamer(pool, streaming, release, before=lambda: go.wait(10)))
        pool.submit(served.set)  # queued while the one thread runs the view: no body yet
        go.set()
        assert streaming.wait(10)
        assert served.wait(10)  # by the spare, while the body goes on
        assert not release.is_set() and pool.size == 2
    finally:
        release.set()
        pool.shutdown(10)


def test_a_thread_relieved_once_is_not_relieved_again():
    """A spare stands in for a streaming thread once; with that spare busy too, a call
    waits rather than take a second spare for the same thread (which would also leak
    it: the thread gives one back when it leaves)."""
    pool = ThreadPool(1, spares=2)
    streaming, release, busy, free = (threading.Event() for _ in range(4))
    try:
        pool.submit(_streamer(pool, streaming, release))
        assert streaming.wait(10)
        pool.submit(lambda: (busy.set(), free.wait(10)))
        assert busy.wait(10) and pool.size == 2  # the spare took it
        pool.submit(lambda: None)
        assert pool.size == 2  # nobody left to relieve: it waits
    finally:
        release.set()
        free.set()
        pool.shutdown(10)


def test_a_body_over_is_no_longer_relieved():
    """A thread whose body is over is no longer taken for one streaming: a call
    waiting behind a slow view must not start a spare."""
    pool = ThreadPool(1, spares=1)
    streaming, release, busy, free = (threading.Event() for _ in range(4))
    try:
        release.set()
        pool.submit(_streamer(pool, streaming, release))  # a body, over at once
        assert streaming.wait(10)
        pool.submit(lambda: (busy.set(), free.wait(10)))  # then a slow view
        assert busy.wait(10)
        pool.submit(lambda: None)
        assert pool.size == 1
    finally:
        free.set()
        pool.shutdown(10)


def test_a_spare_goes_back_when_the_thread_it_relieved_leaves():
    """The thread a spare relieved leaves the pool after its body, and gives the spare
    back: the next body that waits gets one again."""
    pool = ThreadPool(1, spares=1)
    try:
        for _ in range(2):
            streaming, release, served = (threading.Event() for _ in range(3))
            pool.submit(_streamer(pool, streaming, release))
            assert streaming.wait(10)
            pool.submit(served.set)
            assert served.wait(10)  # by a spare, the second time too
            release.set()
            wait_until(lambda: pool.size == 1)
    finally:
        pool.shutdown(10)


def test_bodies_holding_every_thread_are_said_once_a_minute(caplog):
    """The warning that requests wait behind streaming bodies is logged once a minute,
    not at each request that comes."""
    caplog.set_level(logging.WARNING, "django_comet.server")
    pool = ThreadPool(1, spares=0)
    streaming, release = threading.Event(), threading.Event()
    try:
        pool.submit(_streamer(pool, streaming, release))
        assert streaming.wait(10)
        for _ in range(3):
            pool.submit(lambda: None)
        said = [r for r in caplog.records if "Requests wait for a view thread" in r.getMessage()]
        assert len(said) == 1, said
    finally:
        release.set()
        pool.shutdown(10)


def test_calls_queued_while_a_thread_was_counted_free_still_relieve_a_body():
    """Two calls come while one thread is counted free (idle, about to take one):
    neither submit() relieves, so the thread that takes the first must, for the second
    (ThreadPool._work), which would otherwise wait behind a slow view and a body."""
    park, parked, go = threading.Event(), threading.Event(), threading.Event()

    def hook():  # the free thread stops on its way to its next call, counted idle
        if park.is_set() and not go.is_set():
            parked.set()
            go.wait(10)

    pool = ThreadPool(2, spares=1, before_each=hook)
    streaming, release, free, served = (threading.Event() for _ in range(4))
    try:
        pool.submit(_streamer(pool, streaming, release))
        assert streaming.wait(10)
        park.set()
        pool.submit(lambda: None)  # taken by the other thread, which then parks
        assert parked.wait(10)
        pool.submit(lambda: free.wait(10))  # a slow view, for the parked thread
        pool.submit(served.set)
        go.set()
        assert served.wait(5)  # by a spare, while the view and the body go on
        assert not free.is_set() and not release.is_set()
    finally:
        go.set()
        free.set()
        release.set()
        pool.shutdown(10)

"""The event loop: timers, cancellation, thread-safe wake-up, signals while in C."""

import os
import signal
import sys
import threading
import time

import pytest

from django_comet.evloop.files import Descriptor
from django_comet.evloop.loop import AFTER_PASS_BATCH, Loop
from django_comet.evloop.workers import ThreadPool

from .processes import wait_until


@pytest.fixture
def loop():
    loop = Loop()
    yield loop
    loop.close()


def test_timers_fire_in_order_and_cancel(loop):
    fired = []
    loop.call_later(0.02, lambda: fired.append("b"))
    cancelled = loop.call_later(0.01, lambda: fired.append("never"))
    loop.call_later(0.0, lambda: fired.append("a"))
    cancelled.cancel()
    cancelled.cancel()  # twice is harmless
    loop.call_later(0.05, loop.stop)
    loop.run()
    assert fired == ["a", "b"]
    assert loop.pending_handles == 1  # only the wake-up watcher is left
    assert loop.foreground_handles == 0  # which is the loop's own


def test_a_timer_counts_from_when_it_is_armed_not_from_when_the_loop_woke(loop):
    """libevent caches the time when the loop wakes; a timer armed at the end of a long
    callback must still count from its own arming, or timers armed in one busy pass
    fall due together (and staged responses would clump at every stage)."""
    fired = []

    def long_callback():
        loop.call_later(0.3, lambda: fired.append("armed first, 0.3 s"))
        time.sleep(0.2)  # a long callback (a view run in the loop thread)
        loop.call_later(0.15, lambda: fired.append("armed 0.2 s later, 0.15 s"))
        loop.call_later(0.6, loop.stop)

    loop.call_soon(long_callback)
    loop.run()
    # From the wake-up time the second would be due first (0.15 < 0.3); from its own
    # arming it is due 0.05 s after the first.
    assert fired == ["armed first, 0.3 s", "armed 0.2 s later, 0.15 s"]


def timerfds() -> set[int]:
    return {
        int(fd)
        for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")  # (listdir's own descriptor is gone)
        and os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[timerfd]"
    }


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="Linux's /proc")
def test_timers_are_finer_than_the_kernel_tick():
    """libevent's default clock for timeouts is the coarse one, which moves once per
    kernel tick (4 ms at HZ=250), so a chain of 1 ms timers would take 4 ms a link; the
    loop asks for the precise clock, for which libevent's epoll backend times its waits
    with a timerfd of its own (rather than epoll_wait's milliseconds)."""
    before = timerfds()
    loop = Loop()
    try:
        assert len(timerfds() - before) == 1
    finally:
        loop.close()
    assert timerfds() == before


def test_call_soon_threadsafe_from_many_threads(loop):
    got = []

    def producer(n):
        for i in range(100):
            loop.call_soon_threadsafe(got.append, (n, i))

    threads = [threading.Thread(target=producer, args=(n,)) for n in range(4)]
    loop.call_soon(lambda: [t.start() for t in threads])

    def check():
        if len(got) == 400:
            loop.stop()
        else:
            loop.call_later(0.01, check)

    loop.call_later(0.01, check)
    loop.run()
    for t in threads:
        t.join()
    assert sorted(got) == sorted((n, i) for n in range(4) for i in range(100))
    for n in range(4):  # per-thread order is kept
        assert [i for m, i in got if m == n] == list(range(100))


@pytest.fixture
def tiny_switch_interval():
    """Everything queued for the loop is older than the switch interval at once."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


def test_a_thread_lets_the_loop_run_what_it_queued_before_going_on(loop, tiny_switch_interval):
    """A view thread that queued an answer for a loop busy elsewhere waits, before its
    next request, until the loop has run it (Loop.let_catch_up)."""
    order = []
    loop_busy, loop_free = threading.Event(), threading.Event()

    def busy_callback():  # the loop is held up in a callback...
        loop_busy.set()
        loop_free.wait(10)

    def view_thread():
        loop_busy.wait(10)
        loop.call_soon_threadsafe(order.append, "answer sent")  # ...when an answer comes
        loop_free.set()
        loop.let_catch_up()
        order.append("next request taken")
        loop.call_soon_threadsafe(loop.stop)

    thread = threading.Thread(target=view_thread)
    thread.start()
    loop.call_soon(busy_callback)
    loop.call_later(10, loop.stop)  # (should the thread fail)
    loop.run()
    thread.join(10)
    assert order == ["answer sent", "next request taken"]


def test_a_loop_that_is_not_running_is_not_waited_for(loop, tiny_switch_interval):
    waits = []

    class Watched(threading.Condition):
        def wait(self, timeout=None):
            waits.append(timeout)
            return super().wait(timeout)

    loop._caught_up = Watched(threading.Lock())
    loop.call_soon_threadsafe(print)  # queued, and no loop running to run it
    loop.let_catch_up()
    assert waits == []


def test_callback_errors_are_logged_and_the_loop_goes_on(loop, caplog):
    def bad():
        raise RuntimeError("callback failure")

    loop.call_soon(bad)
    loop.call_later(0.01, loop.stop)
    loop.run()
    assert "callback failure" in caplog.text


def test_keyboard_interrupt_in_a_callback_leaves_run(loop):
    def interrupt():
        raise KeyboardInterrupt

    loop.call_soon(interrupt)
    with pytest.raises(KeyboardInterrupt):
        loop.run()


def test_signal_wakes_the_loop_sleeping_in_c(loop):
    got = []
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        loop.add_signal_handler(signal.SIGUSR1, lambda: (got.append("usr1"), loop.stop()))
        # Sent from another thread while the loop thread sleeps in epoll_wait with no timer.
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        loop.run()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert got == ["usr1"]


def test_calls_after_a_pass_run_once_its_other_callbacks_have(loop):
    """Two readers ready in one pass: what each queues after the pass runs once both
    have run, in call order."""
    pipes = [os.pipe() for _ in range(2)]
    ran, after = [], []

    def note(name):
        after.append((name, sorted(ran)))
        if len(after) == 2:
            loop.stop()

    def reader(name, fd):
        os.read(fd, 10)
        ran.append(name)
        loop.call_after_pass(note, name)

    watchers = [
        loop.add_reader(r, lambda name=name, r=r: reader(name, r))
        for name, (r, _) in zip(("a", "b"), pipes, strict=True)
    ]
    for _, w in pipes:
        os.write(w, b"x")
    loop.run()
    for watcher in watchers:
        watcher.cancel()
    for r, w in pipes:
        os.close(r)
        os.close(w)
    assert after == [(ran[0], ["a", "b"]), (ran[1], ["a", "b"])]


def test_reader_watcher(loop):
    r, w = os.pipe()
    got = []

    def on_read():
        got.append(os.read(r, 10))
        watcher.cancel()
        loop.stop()

    watcher = loop.add_reader(r, on_read)
    os.write(w, b"hi")
    loop.run()
    os.close(r)
    os.close(w)
    assert got == [b"hi"]
    assert not watcher.active


def test_closing_the_loop_drops_queued_calls_and_closes_the_files_they_carry(tmp_path):
    loop = Loop()
    fd = os.open(tmp_path / "queued", os.O_CREAT | os.O_RDONLY)
    loop.call_soon_threadsafe(lambda file: file.release(), Descriptor(fd))
    loop.close()  # before the loop ever ran the call
    with pytest.raises(OSError):
        os.fstat(fd)


def test_a_call_queued_as_the_loop_closes_is_dropped_too(tmp_path):
    """Another thread passes the closed check, the loop closes, then the thread
    appends: the call stayed queued on the closed loop, its file kept open."""
    loop = Loop()
    loop.call_soon_threadsafe(lambda: None)  # the loop is woken: no lock taken below
    fd = os.open(tmp_path / "queued", os.O_CREAT | os.O_RDONLY)

    class ClosingAsItAppends(type(loop._ready)):
        def append(self, item):
            loop.close()  # the loop thread, between the caller's check and its append
            super().append(item)

    loop._ready = ClosingAsItAppends()
    loop.call_soon_threadsafe(lambda file: file.release(), Descriptor(fd))
    assert not loop._ready
    with pytest.raises(OSError):
        os.fstat(fd)


def test_epolls_changelist_is_for_a_server_that_tracks_its_connections():
    """The changelist is safe only when every watched descriptor closes a pass after its
    watch was removed: the server's connection guard sees to that (tests/
    test_forked_children.py), so a loop has it only when the server asks."""
    from django_comet.evloop import libevent_ctypes as ev
    from django_comet.evloop.config import ServerConfig
    from django_comet.evloop.server import Server

    method = ev.lib().event_base_get_method
    plain = Loop()
    try:
        assert method(plain.base) == b"epoll"
    finally:
        plain.close()
    server = Server(lambda environ, start_response: [], ServerConfig(port=0, access_log=False))
    try:
        assert server.guard.tracking
        assert method(server.loop.base) == b"epoll (with changelist)"
    finally:
        server.close()


def test_a_thread_pool_calls_its_hook_before_each_call():
    done = threading.Event()
    order = []
    pool = ThreadPool(1, before_each=lambda: order.append("hook"))
    try:
        for n in range(3):
            pool.submit(order.append, n)
        pool.submit(done.set)
        assert done.wait(10)
    finally:
        pool.shutdown(10)
    assert order[:7] == ["hook", 0, "hook", 1, "hook", 2, "hook"]


def test_a_thread_pool_stands_in_spares_then_retires_them():
    """A call about to wait on a client gets a spare thread in its place, while spares
    are left; its thread leaves once the call is over, and the spare goes back.  A
    thread leaving the pool calls on_exit (runcomet closes its database connections)."""
    left = []
    pool = ThreadPool(1, spares=1, on_exit=lambda: left.append(threading.current_thread()))
    release, answers = threading.Event(), []
    first = []

    asked = threading.Event()

    def waits_on_a_client():
        first.append(threading.current_thread())
        answers.append(pool.stand_in())
        answers.append(pool.stand_in())  # (again in the same call: the same spare)
        asked.set()
        release.wait(10)

    try:
        pool.submit(waits_on_a_client)
        done = threading.Event()
        pool.submit(done.set)
        assert done.wait(10)  # served by the spare while the first call waits
        assert asked.wait(10) and answers == [True, True]
        wait_until(lambda: pool.size == 2)
        second = threading.Event()
        pool.submit(lambda: (answers.append(pool.stand_in()), second.set()))
        assert second.wait(10)
        assert answers[-1] is False  # no spare left: it would wait holding its place
        release.set()
        wait_until(lambda: pool.size == 1)  # the first thread retired
        wait_until(lambda: left == first)  # (it calls on_exit once out of the pool)
        spare = pool._threads[0]
    finally:
        release.set()
        pool.shutdown(10)
    assert left == [*first, spare]  # and at shutdown, each thread


def test_a_thread_pool_relieves_threads_streaming_bodies_while_calls_wait():
    """A thread streaming a body (a generator that may wait between items) gets a spare
    in its place once a call waits with no thread free, and leaves once its body is
    over; with no thread streaming, or one free, no spare starts."""
    pool = ThreadPool(1, spares=2)
    release, streaming = threading.Event(), threading.Event()

    def streams():
        with pool.in_body():
            streaming.set()
            release.wait(10)

    try:
        done = threading.Event()
        pool.submit(done.set)
        assert done.wait(10) and pool.size == 1  # a thread was free: no spare
        pool.submit(streams)
        assert streaming.wait(10)
        done = threading.Event()
        pool.submit(done.set)
        assert done.wait(10)  # served by the spare while the body goes on
        assert pool.size == 2
        release.set()
        wait_until(lambda: pool.size == 1)  # the streaming thread left
        done = threading.Event()
        pool.submit(done.set)
        assert done.wait(10) and pool.size == 1
    finally:
        release.set()
        pool.shutdown(10)


def test_a_spare_that_cannot_start_leaves_the_pool_as_it_was(monkeypatch):
    pool = ThreadPool(1, spares=2)
    answers = []
    done = threading.Event()
    try:

        def refuse(self):
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(threading.Thread, "start", refuse)
        pool.submit(lambda: (answers.append(pool.stand_in()), done.set()))
        assert done.wait(10)
        monkeypatch.undo()
        assert answers == [False] and pool.size == 1
    finally:
        pool.shutdown(10)  # (it raised: a thread never started was joined)


def test_what_runs_after_a_pass_runs_a_batch_at_a_time():
    """--threads 0 runs the views of the requests a pass read after it: a wave of them
    ran back to back, and no timer (a stop's drain) nor socket had a turn meanwhile."""
    loop = Loop()
    order = []

    def a_wave():
        for n in range(AFTER_PASS_BATCH * 2 + 1):
            loop.call_after_pass(order.append, n)
        loop.call_soon(order.append, "between")  # the next pass's
        loop.call_soon(loop.call_after_pass, loop.stop)  # after the wave

    try:
        loop.call_soon(a_wave)
        loop.run()
    finally:
        loop.close()
    assert order[AFTER_PASS_BATCH] == "between"
    assert [n for n in order if n != "between"] == list(range(AFTER_PASS_BATCH * 2 + 1))


def test_what_runs_after_a_pass_runs_before_the_next_pass_of_any_kind(loop):
    """It runs inside the pass that queued it, before that pass's changes of what is
    watched reach epoll: a request's view writing its answer then turns the socket from
    reading to writing in one change.  Here the pass is one of those that follow a
    wake-up without sleeping, which used to run another pass first."""
    order = []
    readable_r, readable_w = os.pipe()

    def read_it():
        os.read(readable_r, 1)
        watcher.cancel()
        loop.call_later(0, order.append, "the next pass")
        loop.call_after_pass(order.append, "after its pass")
        loop.call_later(0, loop.stop)

    watcher = loop.add_reader(readable_r, read_it)
    try:
        # The wake-up's pass makes the pipe readable: a pass that does not sleep finds it.
        loop.call_soon(os.write, readable_w, b"x")
        loop.run()
    finally:
        os.close(readable_r)
        os.close(readable_w)
    assert order == ["after its pass", "the next pass"]


def test_what_a_batch_queues_after_its_pass_waits_for_the_next_pass(loop):
    """Else a callable queuing itself again would run for ever, before any timer or
    socket."""
    order, runs = [], []

    def again():
        runs.append(1)
        if len(runs) < 1000:
            loop.call_after_pass(again)

    def start():
        loop.call_later(0, lambda: order.append(len(runs)))  # due at once
        loop.call_after_pass(again)
        loop.call_later(0.05, loop.stop)

    loop.call_soon(start)
    loop.run()
    assert order and order[0] <= 2  # this pass's run, perhaps the next's: not a thousand


def test_a_closed_loop_drops_what_is_queued_after_its_pass_and_closes_once():
    loop = Loop()
    loop.close()
    loop.call_after_pass(print, "never")  # dropped (it freed the event that runs them)
    loop.close()
    assert loop.after_pass_waiting == 0

"""Deadlines on one timer (evloop/deadlines.py: long-poll timeouts, staged responses' next
stages), on a real loop."""

import time

import pytest

from django_comet.evloop import deadlines as deadlines_module
from django_comet.evloop.deadlines import GRAIN, Deadlines
from django_comet.evloop.loop import Loop


@pytest.fixture
def loop():
    loop = Loop()
    yield loop
    loop.close()


def run_until_expired(loop, deadlines, expired, count):
    """Run the loop until ``count`` items have expired."""

    def check():
        if len(expired) >= count:
            loop.stop()
        else:
            loop.call_later(0.005, check, background=True)

    loop.call_later(0, check, background=True)
    loop.run()


def test_items_expire_in_deadline_order_never_early_on_one_timer(loop):
    expired = []
    due_at = {}
    deadlines = Deadlines(loop, lambda item: expired.append((item, time.monotonic())))
    for item, delay in [("c", 0.09), ("a", 0.01), ("b", 0.05), ("a2", 0.01)]:
        due_at[item] = time.monotonic() + delay
        deadlines.add(item, delay)
    assert loop.foreground_handles == 1  # one timer for all four
    run_until_expired(loop, deadlines, expired, 4)
    assert [item for item, _ in expired] == ["a", "a2", "b", "c"]
    assert all(at >= due_at[item] for item, at in expired)
    assert loop.foreground_handles == 0  # nothing left waiting: no timer either


def test_an_item_expires_with_its_arguments_on_the_grain_it_was_given(loop):
    expired = []
    deadlines = Deadlines(loop, lambda *args: expired.append(args), grain=0.001)
    added = time.monotonic()
    due = deadlines.add("stage", 0.0101, "resume", 1.0)
    # Rounded up to its grain (1 ms), not to GRAIN (10 ms).
    assert added + 0.0101 <= due.tick * 0.001 < time.monotonic() + 0.0101 + 0.001
    run_until_expired(loop, deadlines, expired, 1)
    assert expired == [("stage", "resume", 1.0)]


def test_a_discarded_item_never_expires_and_an_emptied_tick_leaves_nothing(loop):
    expired = []
    deadlines = Deadlines(loop, expired.append)
    early = deadlines.add("early", 0.01)
    late = deadlines.add("late", 3600)  # a long-poll answered long before its timeout
    kept = deadlines.add("kept", 0.03)
    deadlines.discard(early, "early")
    deadlines.discard(late, "late")
    assert list(deadlines._due.values()) == [kept]  # emptied ticks are gone
    run_until_expired(loop, deadlines, expired, 1)
    assert expired == ["kept"]
    assert not deadlines._due and not deadlines._ticks
    assert loop.foreground_handles == 0


def test_discarding_the_last_item_cancels_the_timer(loop):
    deadlines = Deadlines(loop, lambda item: pytest.fail(f"{item} expired"))
    due = deadlines.add("x", 0.01)
    assert loop.foreground_handles == 1
    deadlines.discard(due, "x")
    assert loop.foreground_handles == 0


def test_an_expiry_may_end_others_of_its_tick_and_add_new_ones(loop, monkeypatch):
    """What the server does on a timeout (answer, end the response) can release other
    waiters, even of the same tick, and a stage may wait again at once."""
    expired = []
    dues = {}

    def expire(item):
        expired.append(item)
        if item == "first":
            deadlines.discard(dues["second"], "second")
            dues["again"] = deadlines.add("again", 0.01)

    deadlines = Deadlines(loop, expire)
    now = time.monotonic()
    monkeypatch.setattr(deadlines_module.time, "monotonic", lambda: now)  # no tick between
    for item in ["first", "second", "third"]:
        dues[item] = deadlines.add(item, 0)
    monkeypatch.undo()
    assert dues["first"] is dues["second"] is dues["third"]  # one tick
    run_until_expired(loop, deadlines, expired, 3)
    assert expired == ["first", "third", "again"]
    assert loop.foreground_handles == 0


def test_an_earlier_deadline_rearms_the_timer(loop):
    expired = []
    deadlines = Deadlines(loop, expired.append)
    deadlines.add("late", 3600)
    deadlines.add("soon", 0.01)  # must not wait behind the hour
    run_until_expired(loop, deadlines, expired, 1)
    assert expired == ["soon"]
    deadlines.close()
    assert loop.foreground_handles == 0


def test_early_ends_do_not_pile_up(loop):
    """Each long-poll answered early left its tick in the heap; the heap is rebuilt
    once such ticks outnumber the live ones."""
    deadlines = Deadlines(loop, lambda item: None)
    deadlines.add("anchor", 3600)
    for i in range(1000):
        due = deadlines.add(i, 1 + i * GRAIN)  # a tick each
        deadlines.discard(due, i)
    assert len(deadlines._due) == 1
    assert len(deadlines._ticks) <= 2 * len(deadlines._due) + 64 + 1
    deadlines.close()


def test_an_expiry_that_raises_is_logged_and_the_rest_still_expire(loop, monkeypatch, caplog):
    expired = []

    def expire(item):
        expired.append(item)
        if item == "bad":
            raise RuntimeError("render failed")

    deadlines = Deadlines(loop, expire)
    now = time.monotonic()
    monkeypatch.setattr(deadlines_module.time, "monotonic", lambda: now)
    deadlines.add("bad", 0)
    deadlines.add("same tick", 0)
    monkeypatch.undo()
    deadlines.add("later", 0.05)
    run_until_expired(loop, deadlines, expired, 3)
    assert expired == ["bad", "same tick", "later"]
    assert "Error ending a wait at its timeout" in caplog.text
    assert loop.foreground_handles == 0

"""The Django-facing event API in-process: authorization answers, channel arguments, and
the blocking fallback of streams and polls (no runcomet: Django's test client)."""

import re
import threading
import tracemalloc
from decimal import Decimal

import pytest
from django.http import HttpResponseForbidden
from django.test import RequestFactory, override_settings

from django_comet import EventStreamResponse, event_stream, may_listen, poll_response, publish, sse
from django_comet.conf import comet_settings
from django_comet.evloop.hub import Event, Hub


def yes(request, channel):
    return True


def nothing(request, channel):
    return None


def a_response(request, channel):
    return HttpResponseForbidden()


async def async_no(request, channel):
    return False


@pytest.mark.parametrize(
    ("authorize", "allowed"), [(yes, True), (nothing, False), (lambda r, c: False, False)]
)
def test_authorize_grants_only_true(authorize, allowed):
    with override_settings(COMET_AUTHORIZE=authorize):
        assert may_listen(RequestFactory().get("/"), "room") is allowed


@pytest.mark.parametrize(
    ("authorize", "message"),
    [(a_response, "must return True or False"), (async_no, "not an async one")],
)
def test_authorize_answers_that_are_no_yes_or_no_are_errors_not_a_yes(authorize, message):
    with override_settings(COMET_AUTHORIZE=authorize), pytest.raises(TypeError, match=message):
        may_listen(RequestFactory().get("/"), "room")


@pytest.mark.parametrize(
    ("authorize", "message"),
    [
        (async_no, "not an async one"),
        ("tests.test_events.async_no", "not an async one"),
        ("tests.no_such_module.check", "cannot be imported"),
        (42, "must be a callable or a dotted path"),
    ],
)
def test_authorize_setting_is_checked_at_startup(authorize, message):
    with override_settings(COMET_AUTHORIZE=authorize):
        errors = comet_settings.errors()
    assert len(errors) == 1 and message in errors[0], errors


def test_a_tests_new_memory_broker_starts_with_an_empty_history():
    """Events one test published reached the next test's polls and streams: the memory
    broker's history is the process's, and lived on."""
    from django_comet import history

    with override_settings(COMET_BROKER="memory://"):
        first = publish("isolated", "from one test")
        assert [(e["id"], e["data"]) for e in history("isolated")] == [(first, "from one test")]
    with override_settings(COMET_BROKER="memory://"):
        assert history("isolated") == []
        assert publish("isolated", "from the next") > first  # ids still grow


def test_a_stream_of_one_channel_given_as_a_string():
    assert EventStreamResponse("chat").channels == ["chat"]


def first_frames(response, count):
    """The first ``count`` frames of a blocking stream, read on a thread: a stream
    that does not end must fail the test, not hang it."""
    frames = []

    def read():
        for frame in response.streaming_content:
            frames.append(frame)
            if len(frames) == count:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    return frames, reader.is_alive()


@override_settings(COMET_SSE_HEARTBEAT=0, COMET_MAX_HOLD=0.2)
def test_fallback_stream_without_heartbeats_ends_after_max_hold():
    """As under runcomet: a heartbeat of 0 sends none, and COMET_MAX_HOLD ends the
    stream with a retry, so a thread per stream is not held forever."""
    response = EventStreamResponse(["quiet-fallback"])
    frames, running = first_frames(response, 3)
    assert not running
    assert re.fullmatch(rb"id: \d+\nevent: comet-heartbeat\ndata: 0\n\n", frames[0])
    assert len(frames) == 2 and frames[1].startswith(b"retry: "), frames


@override_settings(COMET_SSE_HEARTBEAT=0, COMET_MAX_HOLD=0)
def test_fallback_stream_without_heartbeats_still_writes_when_idle(monkeypatch):
    """Outside runcomet a thread learns that its client left only by writing: with no
    heartbeats, an idle stream still writes a comment now and then (each minute; 50 ms
    here), or a stream whose client left would hold its thread until the next event."""
    monkeypatch.setattr(sse, "IDLE_COMMENT_SECONDS", 0.05)
    frames, _ = first_frames(EventStreamResponse(["idle-fallback"]), 3)
    assert re.fullmatch(rb"id: \d+\nevent: comet-heartbeat\ndata: 0\n\n", frames[0])
    assert frames[1:] == [b":\n\n", b":\n\n"]


@pytest.mark.parametrize("retry", [2.5, -5, True, "1000"])
def test_a_retry_that_is_no_whole_number_of_milliseconds_is_refused(retry):
    with pytest.raises(ValueError, match="retry"):
        EventStreamResponse("chat", retry=retry)


@pytest.mark.parametrize("name", ["comet-heartbeat", "comet-history-gap", "comet-mine"])
def test_the_servers_own_event_names_are_reserved(name):
    with pytest.raises(ValueError, match="reserved"):
        publish("chat", "x", event=name)


def test_listening_to_no_channel_is_a_400():
    request = RequestFactory().get("/")
    assert event_stream(request).status_code == 400
    assert poll_response(request).status_code == 400


def test_a_long_poll_on_no_channel_is_refused_in_the_view():
    """It would have waited for its timeout, for nothing (as a view's code calls it)."""
    from django.http import HttpResponse

    from django_comet import defer_until
    from django_comet.deferred import _current

    token = _current.set(RequestFactory().get("/").environ)  # as within a request
    try:
        with pytest.raises(ValueError, match="at least one channel"):
            defer_until(HttpResponse(), [], "/t/readme-deliver/")
    finally:
        _current.reset(token)


def test_a_stream_or_wait_names_at_most_max_channels():
    """One request naming hundreds of channels (a 8 KB query string holds about 720)
    held a subscription each and read every one's history: 273 KiB per held poll, and
    hundreds of MB for a few replays (found by a security review)."""
    from django.http import HttpResponse

    from django_comet import EventStreamResponse, defer_until
    from django_comet.deferred import _current

    request = RequestFactory().get("/")
    allowed = [f"c{n}" for n in range(comet_settings.MAX_CHANNELS)]
    too_many = [*allowed, "one-more"]
    assert event_stream(request, *too_many).status_code == 400
    assert poll_response(request, *too_many).status_code == 400
    assert poll_response(request, *allowed, *allowed).status_code == 200  # (once each)
    with pytest.raises(ValueError, match="more than COMET_MAX_CHANNELS"):
        EventStreamResponse(too_many)
    token = _current.set(request.environ)  # as within a request
    try:
        with pytest.raises(ValueError, match="more than COMET_MAX_CHANNELS"):
            defer_until(HttpResponse(), too_many, "/t/readme-deliver/")
    finally:
        _current.reset(token)


class WatchedSinks(list):
    """A hub's sink list that says when a waiter has joined it."""

    def __init__(self):
        super().__init__()
        self.joined = threading.Event()

    def append(self, sink):
        super().append(sink)
        self.joined.set()


def wait_on(hub, after):
    """hub.wait on a thread, and a publish-ready moment: returns (result list, thread)."""
    hub._sinks = WatchedSinks()
    result = []
    waiter = threading.Thread(target=lambda: result.append(hub.wait(["c"], after, 5)))
    waiter.start()
    assert hub._sinks.joined.wait(10)
    return result, waiter


def test_a_blocking_wait_catches_events_a_history_of_0_does_not_keep():
    hub = Hub(size=0)
    result, waiter = wait_on(hub, after=0)
    event = Event("c", 1, '"x"')
    hub.add(event)
    waiter.join(10)
    assert result == [([event], False)]


def test_a_blocking_wait_tells_of_a_gap_with_the_events_after_it():
    hub = Hub(size=0)
    hub.add(Event("c", 1, '"lost"'))
    assert hub.since(["c"], 0) == ([], True)
    result, waiter = wait_on(hub, after=0)  # a gap alone does not end the wait
    event = Event("c", 2, '"x"')
    hub.add(event)
    waiter.join(10)
    assert result == [([event], True)]


def test_the_newest_id_counts_events_the_history_let_go():
    """A client that starts without a cursor gets this one: an event published before
    it came, and not kept, must not look like one it missed."""
    hub = Hub(size=0)
    hub.add(Event("c", 7, '"gone"'))
    assert hub.newest_id(["c", "other"]) == 7
    assert hub.since(["c"], hub.newest_id(["c"])) == ([], False)


def test_a_gap_the_broker_reports_is_told_by_replays_and_moves_fresh_cursors_past_it():
    hub = Hub(size=10)
    hub.add(Event("a", 1, '"kept"'))
    told = []
    hub.add_gap_sink(lambda channels, through: told.append((channels, through)))
    hub.add_gap(None, 5)  # events up to 5, on any channel, never came
    assert told == [(None, 5)]
    assert hub.since(["a"], 1) == ([], True)
    assert hub.since(["b"], 0) == ([], True)
    assert hub.newest_id(["b"]) == 5  # a client from now on missed nothing
    assert hub.since(["b"], hub.newest_id(["b"])) == ([], False)
    hub.add_gap(["a"], 7)
    assert hub.since(["a"], 6) == ([], True) and hub.since(["b"], 6) == ([], False)


def test_the_hub_keeps_the_histories_of_its_most_recently_published_channels():
    """A channel per user or per object must not grow memory for ever: beyond
    ``channels`` histories the least recently published is let go, and a replay from
    before its newest event is told of the gap."""
    hub = Hub(size=10, channels=2)
    hub.add(Event("a", 1, '"a1"'))
    hub.add(Event("b", 2, '"b1"'))
    hub.add(Event("a", 3, '"a2"'))  # a is now the most recent
    hub.add(Event("c", 4, '"c1"'))  # lets b go, not a
    assert set(hub._history) == {"a", "c"}
    assert hub.since(["b"], 0) == ([], True)
    assert hub.since(["b"], 2) == ([], False)  # a client that had it missed nothing
    assert hub.newest_id(["b"]) == 2
    assert [e.id for e in hub.since(["a"], 0)[0]] == [1, 3]


def test_what_stays_of_channels_let_go_is_bounded_however_many_there_were():
    """A channel per user, for months: the marks of channels let go are kept for as many
    channels as there are histories, then folded into a fixed table."""
    hub = Hub(size=1, channels=100)
    tracemalloc.start()
    try:
        for i in range(1, 20_001):
            hub.add(Event(f"user-{i}", i, "1"))
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20_001, 60_001):
            hub.add(Event(f"user-{i}", i, "1"))
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 20_000  # exact marks for all: about 4.7 MB more here
    assert len(hub._let_go) == 100


def test_a_channel_whose_mark_was_folded_away_is_still_told_its_gap():
    hub = Hub(size=1, channels=2)
    hub.add(Event("old", 1, "1"))
    hub.add(Event("old", 2, "2"))  # 1 let go by its history
    for i in range(3, 10):  # let old go, then fold its mark away
        hub.add(Event(f"other-{i}", i, "1"))
    assert "old" not in hub._let_go
    assert hub.since(["old"], 1) == ([], True)  # missed 2: never silent
    assert hub.since(["old"], 0)[1]
    assert hub.newest_id(["old"]) >= 2
    # A client that had everything may be told of a gap that did not happen only when
    # later marks raised both of its slots: not the newest channel folded away.
    assert "other-5" not in hub._let_go and "other-5" not in hub._history
    assert hub.since(["other-5"], 5) == ([], False)
    # Back with a history: the bound is told as a gap to replays, and is no reason to
    # cut a stream behind (that is for events its own history let go).
    hub.add(Event("old", 10, "3"))
    assert hub.since(["old"], 1) == ([hub._history["old"][0]], True)
    assert hub.let_go_mark("old") == 0


def test_a_bound_from_the_table_is_told_as_a_gap_never_as_events_let_go():
    """A stream behind is cut as a slow reader only for events its channels' histories
    let go: not for the table's bound of a channel folded away or never published to
    (another channel's mark, maybe), which is told as a gap instead."""
    hub = Hub(size=100, channels=2)
    hub.add(Event("room", 1, "1"))
    for i in range(2, 2000):  # a channel per user, folded away by the thousand
        hub.add(Event(f"user-{i}", i, "1"))
    hub.add(Event("room", 2000, "2"))
    forgotten = "user-3"
    bound = hub._forgotten.mark(forgotten)
    assert bound >= 3
    for channels in (["room", forgotten], ["room", "never-published"]):
        assert not hub.catch_up(channels, 1, 0, 1_000_000)[1]  # not fallen
    assert hub.catch_up(["room", forgotten], 1, 0, 1_000_000)[2] >= 3  # told, though
    told = []
    hub.add_gap_sink(lambda channels, through: told.append((channels, through)))
    hub.add_gap([forgotten], 2)  # a broker's gap below its bound: still not a cut
    assert hub.let_go_mark(forgotten) == 0 and hub.since([forgotten], 2)[1]
    assert told == [([forgotten], 2)]  # live streams hear of the gap as it was


def test_a_publish_that_can_reach_no_one_is_told_once_and_still_published(monkeypatch, caplog):
    """The memory broker in a process that has served no request and runs no server (a
    shell, a command, a task worker): the event reaches no browser, and that is said."""
    from django_comet.brokers import memory

    monkeypatch.setattr(memory, "_served", False)
    monkeypatch.setattr(memory, "_warned", False)
    monkeypatch.setattr(memory, "under_a_test_runner", lambda: False)  # (pytest-django's)
    # A thread of a server (a ticker an app's ready() started) may publish before the
    # server serves: not warned.
    ticker = threading.Thread(target=publish, args=("nowhere", 0))
    ticker.start()
    ticker.join()
    assert not [r for r in caplog.records if "served no request" in r.getMessage()]
    first = publish("nowhere", 1)
    assert publish("nowhere", 2) == first + 1
    told = [r for r in caplog.records if "served no request" in r.getMessage()]
    assert len(told) == 1 and told[0].levelname == "WARNING"
    assert "publish('nowhere')" in told[0].getMessage()


def test_a_publish_under_the_test_runner_is_not_warned_about(monkeypatch, caplog):
    """A project's tests (pytest-django's environment here, as manage.py test's) read
    their events in their own process: the warning's advice would mislead them."""
    from django_comet.brokers import memory

    monkeypatch.setattr(memory, "_served", False)
    monkeypatch.setattr(memory, "_warned", False)
    assert memory.under_a_test_runner()
    publish("tested", 1)
    assert not [r for r in caplog.records if "served no request" in r.getMessage()]


def test_a_publish_in_a_process_that_serves_is_not_warned_about(monkeypatch, caplog, client):
    from django_comet.brokers import memory
    from django_comet.evloop.hub import hub

    monkeypatch.setattr(memory, "_warned", False)
    monkeypatch.setattr(memory, "_served", False)

    def sink(event):  # a server in this process takes events from the hub
        pass

    hub.add_sink(sink)
    try:
        publish("served", 1)
    finally:
        hub.remove_sink(sink)
    memory.watch_for_requests()
    assert client.get("/t/echo/").status_code == 200  # any request: runserver, gunicorn
    publish("served", 2)
    assert memory._served
    assert not [r for r in caplog.records if "served no request" in r.getMessage()]


def test_a_publish_from_a_shell_with_the_memory_broker_is_warned_about(demo_db):
    import subprocess
    import sys

    from .processes import ROOT

    shell = subprocess.run(
        [
            sys.executable,
            str(ROOT / "demo_site" / "manage.py"),
            "shell",
            "-c",
            "from django_comet import publish; print(publish('chat', {'text': 'hi'}))",
        ],
        env={
            "DEMO_DB": demo_db,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "PYTHONPATH": str(ROOT),
            "PATH": "/usr/bin:/bin",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.strip().splitlines()[-1].isdigit()  # published all the same
    assert "publish('chat') with COMET_BROKER = 'memory://'" in shell.stderr


def test_catch_up_takes_a_budget_of_the_oldest_events_in_order():
    """What a stream behind reads, batch by batch: the oldest events newer than its
    cursor over all its channels, in id order, up to about its budget in bytes."""
    hub = Hub(size=1000)
    for i in range(1, 601):  # a: odd ids, b: even ids; every frame the same size
        hub.add(Event("a" if i % 2 else "b", i, "x" * 100))
    frame = len(Event("a", 100, "x" * 100).frame)
    events, fallen, gap, complete = hub.catch_up(["a", "b"], 100, 0, 10 * frame)
    assert [e.id for e in events] == list(range(101, 112))  # ten fit, and one past them
    assert (fallen, gap, complete) == (False, 0, False)
    events, _, _, complete = hub.catch_up(["b"], 590, 0, 10 * frame)
    assert [e.id for e in events] == [592, 594, 596, 598, 600] and complete


def test_catch_up_tells_a_history_let_go_from_a_brokers_gap():
    hub = Hub(size=3)
    for i in range(1, 6):
        hub.add(Event("a", i, "x"))  # 1 and 2 let go
    _, fallen, gap, _ = hub.catch_up(["a"], 1, 0, 1000)
    assert fallen and gap == 2
    hub.add_gap(["a"], 6)  # an event this process will never receive
    events, fallen, gap, _ = hub.catch_up(["a"], 2, 0, 1000)
    assert [e.id for e in events] == [3, 4, 5] and not fallen and gap == 6
    assert hub.catch_up(["a"], 2, 6, 1000)[2] == 0  # told already: no news


def test_history_outside_a_server_raises_the_brokers_error_while_it_is_unreachable():
    """A shell's or a task's process has no history of its own to answer from: an
    outage must not look like a channel without events."""
    from django.test import override_settings

    from django_comet import history
    from django_comet.brokers import get_broker

    from .brokers import free_port

    with (
        override_settings(COMET_BROKER=f"redis://127.0.0.1:{free_port()}/0"),
        pytest.raises(get_broker().unreachable),  # (the overriding broker's)
    ):
        history("outside")


@pytest.mark.parametrize("after", ["5", None, -1, 2.5])
def test_history_wants_an_event_id_and_says_so(after):
    from django_comet import history

    with pytest.raises(TypeError, match="after must be an event id"):
        history("anything", after=after)


def test_a_foreign_cursors_replay_misses_no_event_published_while_it_reads():
    """A cursor from another epoch with no history left: the cursor it moves to was
    asked of the broker after the history was read, and an event published in between
    was neither replayed nor told (found by a review)."""
    from django_comet.brokers.memory import MemoryBroker
    from django_comet.events import replay
    from django_comet.evloop.hub import hub

    broker = MemoryBroker()
    read_history = broker.since
    published = []

    def since(channels, after):
        found = read_history(channels, after)
        if after == 0:  # another thread publishes just after the history was read
            published.append(broker.publish("race-room", '"in between"'))
        return found

    broker.since = since
    events, gap, cursor = replay(broker, ["race-room"], broker.newest_id() + 10**9)
    assert (events, gap) == ([], True)
    assert [e.id for e in hub.since(["race-room"], cursor)[0]] == published


@pytest.mark.parametrize("view", [event_stream, poll_response])
@pytest.mark.parametrize("channels", [["room", "lobby"], ("room",), b"room"])
def test_channels_given_as_one_list_are_the_views_mistake_not_the_clients(view, channels):
    """A list was a bare "unhashable type" 500, a tuple a 400 "Invalid channel name"
    that blamed the client (and comet.js took for a refusal, asked again each minute)."""
    message = rf"{view.__name__}\(request, \*names\) for a list of them"
    with pytest.raises(TypeError, match=message):
        view(RequestFactory().get("/"), channels)


@override_settings(COMET_MAX_EVENT_SIZE=100)
def test_an_event_over_the_size_bound_is_refused():
    """Each event is kept whole in every history, as text and as a frame: 100 events of
    10 MB were 2.4 GB in one process (found by a review).  The bound is the JSON's
    bytes, escapes included."""
    publish("sized", "x" * 98)  # 100 bytes
    for data in ("x" * 99, "é" * 17):  # 101 and 104 bytes ("\u00e9" each)
        with pytest.raises(ValueError, match=r"over COMET_MAX_EVENT_SIZE \(100\)"):
            publish("sized", data)


def test_the_history_settings_follow_override_settings():
    """They were read once, at startup (found by a review of settings)."""
    from django_comet import history

    with override_settings(COMET_BROKER="memory://", COMET_HISTORY_SIZE=2):
        ids = [publish("sized-history", n) for n in range(5)]
        assert [e["id"] for e in history("sized-history")] == ids[-2:]
    with override_settings(COMET_BROKER="memory://", COMET_HISTORY_CHANNELS=1):
        publish("kept-first", 1)
        publish("kept-second", 2)
        assert history("kept-first") == []
        assert [e["data"] for e in history("kept-second")] == [2]
    publish("sized-again", 0)
    assert [e["data"] for e in history("sized-again")] == [0]


@pytest.mark.parametrize(
    "timeout",
    [
        True,
        "5",
        float("nan"),
        0,
        1e8,
        pytest.param(10**400, id="an-int-past-floats"),
        pytest.param(10**5000, id="an-int-past-reprs"),
        Decimal("sNaN"),
    ],
)
def test_a_poll_timeout_that_is_no_number_of_seconds_is_refused_by_name(timeout):
    """``True`` was taken for 1 s, and the others' errors named "a channel wait"."""
    with pytest.raises((TypeError, ValueError), match=r"poll_response\(\): timeout must be"):
        poll_response(RequestFactory().get("/"), "room", timeout=timeout)

"""Server-Sent Events: what a stream is told when the history no longer reaches back
(a gap), across restarts, and replays larger than the output bound."""

import json
import socket

import pytest
import requests

from .processes import runcomet
from .publishing import publish, subscribed
from .sse_client import SSEClient


def test_history_exhaustion_is_announced(tight):
    ids = [publish(tight, "gap", i) for i in range(8)]  # history keeps the last 5
    with SSEClient(
        tight, "/t/stream/?channels=gap", headers=b"Last-Event-ID: %d\r\n" % ids[0]
    ) as client:
        gap = client.next_event()
        assert gap["event"] == "comet-history-gap"
        assert "id" not in gap
        assert json.loads(gap["data"]) == {"last_event_id": ids[0], "channels": ["gap"]}
        assert [client.next_event()["data"] for _ in range(5)] == ["3", "4", "5", "6", "7"]
    # A long-poll says so too.
    polled = requests.get(tight.url + f"/t/fastpoll/?channel=gap&since={ids[0]}").json()
    assert polled["gap"] is True
    assert [e["data"] for e in polled["events"]] == [3, 4, 5, 6, 7]
    within = requests.get(tight.url + f"/t/fastpoll/?channel=gap&since={ids[4]}").json()
    assert "gap" not in within
    assert [e["data"] for e in within["events"]] == [5, 6, 7]


def test_a_cursor_of_0_gets_the_history_without_a_gap(tight):
    """0 asks for whatever history there is (comet.js's first connection, the chat's
    first poll): a client with no state missed nothing, however long the channel's past."""
    for i in range(8):  # the history keeps the last 5
        publish(tight, "from-0", i)
    with SSEClient(tight, "/t/stream/?channels=from-0", headers=b"Last-Event-ID: 0\r\n") as client:
        assert [client.next_event()["data"] for _ in range(5)] == ["3", "4", "5", "6", "7"]
    polled = requests.get(tight.url + "/t/fastpoll/?channel=from-0&since=0").json()
    assert "gap" not in polled
    assert [e["data"] for e in polled["events"]] == [3, 4, 5, 6, 7]


def test_a_stream_hears_of_events_lost_before_the_server_held_it(tight):
    """Events published after the view's replay and before the server holds the stream
    are sent from the history; when more came than it keeps, the client is told."""
    with SSEClient(tight, "/t/stream-then-publish/?channels=late&count=8") as client:
        gap = client.next_event()
        assert gap["event"] == "comet-history-gap"
        info = json.loads(gap["data"])  # the stream's cursor: the newest id seen before
        assert info["channels"] == ["late"]
        events = [client.next_event() for _ in range(5)]
        assert [e["data"] for e in events] == ["3", "4", "5", "6", "7"]
        assert info["last_event_id"] < int(events[0]["id"]) - 3  # the first 3 are gone


def test_a_gap_with_no_event_after_it_is_told_once(demo_db):
    """A quiet channel whose history the process let go (it keeps 2 here): a client that
    missed its last event is told of the gap, and the gap's id moves its cursor past
    what is gone, or it would be told again at every reconnect (comet.js takes the same
    cursor from the gap's data)."""
    server = runcomet(db=demo_db, env={"TEST_HISTORY_CHANNELS": "2"})
    try:
        missed = publish(server, "quiet-room", "gone")
        newest = [publish(server, f"busy-{i}", i) for i in range(2)][-1]  # lets it go
        headers = b"Last-Event-ID: %d\r\n" % (missed - 1)
        with SSEClient(server, "/t/stream/?channels=quiet-room", headers=headers) as client:
            gap = client.next_event()
            assert gap["event"] == "comet-history-gap"
            assert gap["id"] == str(newest)
            info = json.loads(gap["data"])
            assert info == {
                "last_event_id": missed - 1,
                "channels": ["quiet-room"],
                "cursor": newest,
            }
            subscribed(server, "quiet-room", 1)
            later = publish(server, "quiet-room", "later")
            assert client.next_event() == {"id": str(later), "data": '"later"'}
        headers = b"Last-Event-ID: %d\r\n" % newest  # back, from the gap's id
        with SSEClient(server, "/t/stream/?channels=quiet-room", headers=headers) as client:
            assert client.next_event() == {"id": str(later), "data": '"later"'}
    finally:
        assert server.stop() == 0


def published_by_a_process_gone(demo_db, channel, count):
    """The ids of ``count`` events a runcomet published on ``channel`` before it
    stopped (the memory broker's history goes with it: a restart)."""
    server = runcomet(db=demo_db)
    try:
        return [publish(server, channel, n) for n in range(count)]
    finally:
        assert server.stop() == 0


def test_a_cursor_from_before_a_restart_hears_of_the_gap(demo_db):
    """The memory broker's ids follow the clock across restarts; a client back with a
    cursor from the old process missed that process's later events, whatever the new one
    has published since."""
    ids = published_by_a_process_gone(demo_db, "epoch", 3)
    new = runcomet(db=demo_db)
    try:
        fresh = publish(new, "epoch", "new")
        polled = requests.get(new.url + f"/t/fastpoll/?channel=epoch&since={ids[0]}").json()
        assert polled == {"events": [{"id": fresh, "data": "new"}], "last_id": fresh, "gap": True}
        with SSEClient(
            new, "/t/stream/?channels=epoch", headers=b"Last-Event-ID: %d\r\n" % ids[-1]
        ) as client:
            assert client.next_event()["event"] == "comet-history-gap"
            assert client.next_event() == {"id": str(fresh), "data": '"new"'}
    finally:
        assert new.stop() == 0


def test_a_gap_from_before_a_restart_is_told_once_before_anything_is_published(demo_db):
    """The new process has published nothing, so no event carries the client's cursor
    past the old process's: the gap's own id does (where the new process's ids begin),
    or the client would hear of it at every reconnect."""
    (before,) = published_by_a_process_gone(demo_db, "restarted", 1)
    new = runcomet(db=demo_db)
    try:
        headers = b"Last-Event-ID: %d\r\n" % before
        with SSEClient(new, "/t/stream/?channels=restarted", headers=headers) as client:
            gap = client.next_event()
        assert gap["event"] == "comet-history-gap", gap
        url = new.url + "/t/fastpoll/?channel=restarted&timeout=0.1&since="
        answer = requests.get(url + str(before), timeout=30).json()
        assert answer["gap"] is True and answer["events"] == [], answer
        again = requests.get(url + str(answer["last_id"]), timeout=30).json()
        assert "gap" not in again and again["events"] == [], again
        headers = b"Last-Event-ID: %s\r\n" % gap["id"].encode()
        with SSEClient(new, "/t/stream/?channels=restarted", headers=headers) as client:
            subscribed(new, "restarted", 1)
            fresh = publish(new, "restarted", "new")
            assert client.next_event() == {"id": str(fresh), "data": '"new"'}
    finally:
        assert new.stop() == 0


def test_the_cursor_a_restarts_gap_gave_hears_of_the_next_restarts_gap(demo_db):
    """A restarted process that had published nothing moved a client past the gap to
    cursor 0, which asks for the history and is never told of a gap: what the next
    process published while the client was away, lost at the next restart, went
    untold (found by a review).  So did a new client's cursor there, and comet.js's
    first poll's (since=0) on a channel with no history."""
    (before,) = published_by_a_process_gone(demo_db, "twice", 1)
    second = runcomet(db=demo_db)
    try:
        url = second.url + "/t/fastpoll/?channel=twice&timeout=0.1&since="
        polled = requests.get(url + str(before), timeout=30).json()
        assert polled["gap"] is True and polled["events"] == [], polled
        headers = b"Last-Event-ID: %d\r\n" % before
        with SSEClient(second, "/t/stream/?channels=twice", headers=headers) as client:
            gap = client.next_event()
        assert gap["event"] == "comet-history-gap", gap
        new_client = requests.get(second.url + "/t/fastpoll/?channel=twice&timeout=0.1").json()
        from_0 = requests.get(url + "0", timeout=30).json()  # (comet.js's first poll)
        assert from_0["events"] == [] and "gap" not in from_0, from_0
        publish(second, "twice", "missed")  # while the clients are away
    finally:
        assert second.stop() == 0
    third = runcomet(db=demo_db)
    try:
        url = third.url + "/t/fastpoll/?channel=twice&timeout=0.1&since="
        for cursor in (polled["last_id"], gap["id"], new_client["last_id"], from_0["last_id"]):
            answer = requests.get(url + str(cursor), timeout=30).json()
            assert answer["gap"] is True, (cursor, answer)
    finally:
        assert third.stop() == 0


def test_a_stream_that_never_got_an_event_hears_of_what_a_restart_lost(demo_db):
    """A new stream, or one from 0 with no history, had no id for the browser to send
    back: its reconnect to the next process asked afresh, and was never told of what
    the old process published while it was away (documented as a limit). Its first
    heartbeat carries its cursor now, as a poll's ``last_id`` does."""
    first = runcomet(db=demo_db)
    try:
        cursors = []
        for query in ("", "&lastEventId=0"):
            with SSEClient(first, "/t/stream/?channels=unseen" + query) as client:
                heartbeat = client.next_event(skip_comments=False)
            assert heartbeat["event"] == "comet-heartbeat" and heartbeat.get("id"), heartbeat
            cursors.append(heartbeat["id"].encode())
        publish(first, "unseen", "missed")  # while the page is away
    finally:
        assert first.stop() == 0
    second = runcomet(db=demo_db)
    try:
        for cursor in cursors:
            headers = b"Last-Event-ID: %s\r\n" % cursor
            with SSEClient(second, "/t/stream/?channels=unseen", headers=headers) as client:
                told = client.next_event()
            assert told["event"] == "comet-history-gap", (cursor, told)
    finally:
        assert second.stop() == 0


@pytest.mark.parametrize(
    "env",
    [{"TEST_HISTORY_CHANNELS": "1"}, {"TEST_HISTORY_SIZE": "0"}],
    ids=["channel-let-go", "no-history"],
)
def test_a_poll_from_0_is_never_told_of_losses_from_before_it_came(demo_db, env):
    """A poll from 0 that found no history moved its cursor to where the hub was
    complete, behind events this process knew lost: its next poll was told of a gap
    (found by a review)."""
    server = runcomet(db=demo_db, env=env)
    try:
        publish(server, "room-a", "old")
        publish(server, "room-b", "other")  # (one channel's history kept: room-a's goes)
        url = server.url + "/t/fastpoll/?channel=room-a&timeout=0.1&since="
        first = requests.get(url + "0", timeout=30).json()
        second = requests.get(url + str(first["last_id"]), timeout=30).json()
        assert "gap" not in first and "gap" not in second, (first, second)
    finally:
        assert server.stop() == 0


def test_a_replay_larger_than_the_output_bound_is_not_cut_at_the_next_event(tight):
    """A client back on a slow link gets a replay bigger than COMET_MAX_PENDING_OUTPUT
    (64 KiB here; the newest event, 1 MB, is sent whatever its size): the replay is
    allowed on top of the bound, or the client would be cut at every next event and
    never catch up."""
    before = tight.status()["dropped_slow"]
    big = "r" * 1_000_000  # 5 of them (the history): more than the kernel buffers hold
    ids = [publish(tight, "replayed", big) for _ in range(5)]
    sock = socket.create_connection((tight.host, tight.port), timeout=30)
    request = f"GET /t/stream/?channels=replayed&lastEventId={ids[0] - 1} HTTP/1.1\r\n"
    sock.sendall(request.encode() + b"Host: 127.0.0.1\r\n\r\n")
    subscribed(tight, "replayed", 1)
    last = publish(tight, "replayed", "small")  # unread so far: most of it is still unsent
    marker, tail = b"id: %d\n" % last, b""
    try:
        while marker not in tail:  # read it all, to the event published last
            chunk = sock.recv(1 << 20)
            assert chunk, "the stream was cut"
            tail = tail[-64:] + chunk
    finally:
        sock.close()
    assert tight.status()["dropped_slow"] == before


def test_a_replay_larger_than_the_bound_comes_whole_a_bound_at_a_time(tight):
    """One request for a cursor far back must not pin a copy of the whole history of its
    channels for as long as its client reads slowly, nor lose what does not fit: a
    replay is taken in order, COMET_MAX_PENDING_OUTPUT (64 KiB here) at a time.  A
    stream takes the rest from the process's history as it reads; a poll's answer ends
    with the last event that fit, and the next poll takes the next batch."""
    ids = [publish(tight, "capped", "x" * 30_000) for _ in range(5)]  # all in the history
    cursor = ids[0] - 1
    polled, since = [], cursor
    for batch in (2, 2, 1):  # two of 30 KB fit in 64 KiB
        answer = requests.get(tight.url + f"/t/fastpoll/?channel=capped&since={since}").json()
        assert "gap" not in answer and len(answer["events"]) == batch
        polled += [e["id"] for e in answer["events"]]
        since = answer["last_id"]
    assert polled == ids
    from_0 = requests.get(tight.url + "/t/fastpoll/?channel=capped&since=0").json()
    assert "gap" not in from_0 and from_0["last_id"] == ids[1]
    with SSEClient(tight, f"/t/stream/?channels=capped&lastEventId={cursor}") as client:
        assert [client.next_event()["id"] for _ in range(5)] == [str(i) for i in ids]
        subscribed(tight, "capped", 1)
        live = publish(tight, "capped", "live")
        assert client.next_event()["id"] == str(live)  # and it goes on from the newest


def test_the_rest_of_a_large_replay_lost_before_the_stream_is_held_is_told(tight):
    """The rest of a replay too large for the first content is taken from the history
    when the server holds the stream: events published before then (3, by the view) may
    push some of it out of a 5-event history.  The client hears of that gap too, though
    its first content told of an earlier one: past what it was sent, any loss is news."""
    ids = [publish(tight, "racy", "x" * 30_000) for _ in range(7)]  # ids[1] is gone
    path = f"/t/stream-then-publish/?channels=racy&count=3&lastEventId={ids[0]}"
    with SSEClient(tight, path) as client:
        first = client.next_event()
        assert first["event"] == "comet-history-gap"
        got = [client.next_event() for _ in range(2)]  # the first content: 2 fit in 64 KiB
        assert [e["id"] for e in got] == [str(ids[2]), str(ids[3])]
        second = client.next_event()  # ids[4] went with the view's events
        assert second["event"] == "comet-history-gap"
        assert json.loads(second["data"])["last_event_id"] == ids[3]
        rest = [client.next_event() for _ in range(5)]
        assert [e["id"] for e in rest[:2]] == [str(ids[5]), str(ids[6])]
        assert [e["data"] for e in rest[2:]] == ["0", "1", "2"]

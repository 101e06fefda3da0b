"""Server-Sent Events over real sockets: framing, replay, history gaps, heartbeats,
fan-out to 1,000 clients, authorization, slow readers, disconnects (long-polls:
test_longpoll.py)."""

import json
import re
import socket

import pytest
import requests

from django_comet.evloop.frames import sse_frame
from django_comet.sse import EventStreamResponse, _parse_event_id

from .processes import peak_rss_kib, runcomet
from .publishing import publish, subscribed
from .sse_client import SSEClient


@pytest.fixture(scope="module")
def tight(demo_db):
    """A server with a 5-event history, a 0.2 s heartbeat and a 64 KiB output bound."""
    import os

    os.environ.update(
        TEST_HISTORY_SIZE="5", TEST_SSE_HEARTBEAT="0.2", TEST_MAX_PENDING_OUTPUT=str(64 * 1024)
    )
    try:
        server = runcomet(db=demo_db)
    finally:
        for name in ("TEST_HISTORY_SIZE", "TEST_SSE_HEARTBEAT", "TEST_MAX_PENDING_OUTPUT"):
            del os.environ[name]
    yield server
    assert server.stop() == 0


def test_sse_frame_encoding():
    assert (
        sse_frame(7, "note", "a\nb\r\nc\rd")
        == b"id: 7\nevent: note\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
    )
    assert sse_frame(1, "bad\nname", "") == b"id: 1\nevent: badname\ndata: \n\n"


@pytest.mark.parametrize(
    "value, cursor",
    [
        (0, 0),
        ("0", 0),
        ("007", 7),
        ("1" * 30, 10**20),  # past every id: nothing to replay, and no gap
        (-1, None),
        (True, None),
        ("", None),
        ("7x", None),
        ("\u0667", None),  # a digit, but not an ASCII one
    ],
)
def test_a_last_event_id_is_read_as_the_server_writes_them(value, cursor):
    assert _parse_event_id(value) == cursor


def test_a_retry_of_0_is_a_retry_and_one_below_is_refused():
    assert EventStreamResponse(["retries"], retry=0)._first.startswith(b"retry: 0\n\n")
    with pytest.raises(ValueError, match="whole number of milliseconds"):
        EventStreamResponse(["retries"], retry=-1)


def test_stream_headers_framing_and_multiline_data(comet):
    with SSEClient(comet, "/t/stream/?channels=news") as client:
        assert client.status == 200
        assert client.headers[b"content-type"].startswith(b"text/event-stream")
        assert client.headers[b"cache-control"] == b"no-cache"
        assert client.headers[b"x-accel-buffering"] == b"no"
        assert client.headers[b"transfer-encoding"] == b"chunked"
        subscribed(comet, "news", 1)
        first = publish(comet, "news", {"text": "line one\nline two"}, event="headline")
        second = publish(comet, "news", "plain")
        event = client.next_event()
        assert event == {
            "id": str(first),
            "event": "headline",
            "data": '{"text":"line one\\nline two"}',
        }
        assert client.next_event() == {"id": str(second), "data": '"plain"'}
        assert second > first
    comet.wait_for_status(lambda s: "news" not in s["channels"] and s["held"] == 0)


def test_replay_after_last_event_id_header_and_query(comet):
    ids = [publish(comet, "replay", i) for i in range(4)]
    with SSEClient(
        comet, "/t/stream/?channels=replay", headers=b"Last-Event-ID: %d\r\n" % ids[1]
    ) as client:
        assert [client.next_event()["data"] for _ in range(2)] == ["2", "3"]
    # A header that is none of ours (a proxy's) leaves the query's cursor in force; ours
    # are written in digits only, as a poll's since= is.
    for foreign in ("x", f"+{ids[0]}"):
        with SSEClient(
            comet,
            f"/t/stream/?channels=replay&lastEventId={ids[2]}",
            headers=f"Last-Event-ID: {foreign}\r\n".encode(),
        ) as client:
            assert client.next_event() == {"id": str(ids[3]), "data": "3"}
    with SSEClient(comet, f"/t/stream/?channels=replay&lastEventId={ids[2]}") as client:
        assert client.next_event() == {"id": str(ids[3]), "data": "3"}
        subscribed(comet, "replay", 1)
        live = publish(comet, "replay", "live")
        assert client.next_event() == {"id": str(live), "data": '"live"'}


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


def test_a_stream_with_its_cursor_is_not_given_it_again(comet):
    """The heartbeat carries a cursor only where the first content has none: not to a
    client back where it was, nor after events, whose ids say it."""
    newest = publish(comet, "given", "x")
    for query, headers in (
        ("", b"Last-Event-ID: %d\r\n" % newest),
        ("&lastEventId=0", b""),  # the history replayed: its event has the id
    ):
        with SSEClient(comet, "/t/stream/?channels=given" + query, headers=headers) as client:
            heartbeat = client.next_event(skip_comments=False)
        assert heartbeat["event"] == "comet-heartbeat" and "id" not in heartbeat, heartbeat


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


def test_heartbeat_events_tell_their_interval(tight):
    """An event, not a comment, so that a browser's script can watch for it."""
    with SSEClient(tight, "/t/stream/?channels=quiet") as client:
        frames = client.frames()
        first = next(frames)  # at once: the interval, and the new client's cursor
        assert re.fullmatch(rb"id: \d+\nevent: comet-heartbeat\ndata: 0.2", first), first
        assert next(frames) == b"event: comet-heartbeat\ndata: 0.2"
        assert next(frames) == b"event: comet-heartbeat\ndata: 0.2"


def test_the_chat_answers_head_as_uptime_checks_send_it(comet):
    for path in ("/chat/", "/chat/events/", "/chat/poll/?since=0"):
        response = requests.head(comet.url + path, timeout=30)
        assert response.status_code == 200, (path, response.status_code)
        assert response.content == b""


def test_authorization_refusal(comet):
    assert requests.get(comet.url + "/t/stream/?channels=secret-room").status_code == 403
    assert requests.get(comet.url + "/t/poll/?channel=secret-room").status_code == 403
    assert comet.status()["held"] == 0


def test_thousand_clients_receive_one_publish(comet):
    clients = []
    try:
        for _ in range(1000):
            clients.append(SSEClient(comet, "/t/stream/?channels=crowd"))
        subscribed(comet, "crowd", 1000)
        event_id = publish(comet, "crowd", {"to": "everyone"})
        for client in clients:
            assert client.next_event() == {"id": str(event_id), "data": '{"to":"everyone"}'}
    finally:
        for client in clients:
            client.close()
    comet.wait_for_status(lambda s: "crowd" not in s["channels"] and s["held"] == 0)


def test_slow_reader_is_dropped(tight):
    before = tight.status()["dropped_slow"]
    sock = socket.create_connection((tight.host, tight.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(b"GET /t/stream/?channels=firehose HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    subscribed(tight, "firehose", 1)
    big = "x" * 32 * 1024
    try:
        for _ in range(200):  # never read: kernel buffers fill, then the 64 KiB bound
            publish(tight, "firehose", big)
            if tight.status()["dropped_slow"] > before:
                break
        status = tight.wait_for_status(lambda s: "firehose" not in s["channels"] and s["held"] == 0)
        assert status["dropped_slow"] == before + 1
    finally:
        sock.close()


@pytest.fixture(scope="module")
def bursty(demo_db):
    """--threads 0, where a view's publishes are fanned out together, after it; a 64 KiB
    bound on unsent output and a 1,000-event history."""
    env = {"TEST_MAX_PENDING_OUTPUT": str(64 * 1024), "TEST_HISTORY_SIZE": "1000"}
    server = runcomet("--threads", "0", db=demo_db, env=env)
    yield server
    assert server.stop() == 0, "".join(server.output)


def test_a_burst_larger_than_the_bound_reaches_a_client_that_reads(bursty):
    """500 KB at once: the stream falls behind and catches up from the history as it
    reads, in order, and stays open (it was cut as a slow reader)."""
    with SSEClient(bursty, "/t/stream/?channels=burst") as client:
        subscribed(bursty, "burst")
        url = bursty.url + "/t/publish-many/?channel=burst&n=500&size=1000"
        last = requests.get(url, timeout=60).json()["id"]
        ids = [int(client.next_event()["id"]) for _ in range(500)]
        assert ids == list(range(last - 499, last + 1))
        after = publish(bursty, "burst", "live again")
        assert client.next_event() == {"id": str(after), "data": '"live again"'}
        status = bursty.status()
        assert status["dropped_slow"] == 0 and status["streams_behind"] == 0
        assert status["channels"]["burst"] == 1


def test_a_stream_behind_hears_of_a_brokers_gap_in_its_place(bursty):
    """A gap (events this process will never receive) told while a stream is behind:
    it gets the gap event as it catches up, between the events before and after the
    lost one, and goes on (it was cut as fallen a history behind, never told)."""
    with SSEClient(bursty, "/t/stream/?channels=gapped") as client:
        subscribed(bursty, "gapped")
        url = bursty.url + "/t/publish-around-a-gap/?channel=gapped&n=300"
        ids = requests.get(url, timeout=60).json()
        got = [client.next_event() for _ in range(601)]
        assert [int(e["id"]) for e in got[:300]] == list(range(ids["first"], ids["lost"]))
        assert got[300]["event"] == "comet-history-gap" and "id" not in got[300]
        assert json.loads(got[300]["data"]) == {
            "last_event_id": ids["lost"] - 1,
            "channels": ["gapped"],
        }
        assert [int(e["id"]) for e in got[301:]] == list(range(ids["lost"] + 1, ids["last"] + 1))
        status = bursty.status()
        assert status["channels"]["gapped"] == 1 and status["streams_behind"] == 0


def test_a_stream_cut_a_history_behind_gets_what_was_queued_first(bursty):
    """1,500 events at once for a 1,000-event history: the stream takes its bound's
    worth, falls behind and is cut in the same pass, the oldest it needs being gone.
    What was queued for it still goes to the socket before the cut (it got nothing: a
    socket bufferevent's output can be written by its own writes only, until thawed)."""
    before = bursty.status()["dropped_slow"]
    with SSEClient(bursty, "/t/stream/?channels=overrun") as client:
        subscribed(bursty, "overrun")
        url = bursty.url + "/t/publish-many/?channel=overrun&n=1500&size=1000"
        last = requests.get(url, timeout=60).json()["id"]
        received = []
        with pytest.raises(ConnectionError):  # cut: no last chunk
            while True:
                received.append(int(client.next_event()["id"]))
        assert received and received == list(range(last - 1499, last - 1499 + len(received)))
    assert bursty.wait_for_status(lambda s: s["dropped_slow"] == before + 1)


def test_a_client_that_leaves_while_behind_leaves_nothing(bursty):
    before = bursty.status()
    sock = socket.create_connection((bursty.host, bursty.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(b"GET /t/stream/?channels=leaving-behind HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    subscribed(bursty, "leaving-behind")
    url = bursty.url + "/t/publish-many/?channel=leaving-behind&n=500&size=1000"
    assert requests.get(url, timeout=60).status_code == 200
    assert bursty.wait_for_status(lambda s: s["streams_behind"] == 1)
    sock.close()
    status = bursty.wait_for_status(
        lambda s: s["streams_behind"] == 0 and s["held"] == 0 and s["timers"] == before["timers"]
    )
    assert "leaving-behind" not in status["channels"]
    assert status["dropped_slow"] == before["dropped_slow"]


def test_slow_readers_of_small_events_hold_about_their_bound(demo_db):
    """What a stream that does not read holds is about COMET_MAX_PENDING_OUTPUT (1 MiB)
    whatever the events' size: small events share the output buffer's blocks (each one
    had blocks of its own, 10-15 times its size)."""
    server = runcomet(db=demo_db)
    socks = []
    try:
        for _ in range(10):
            sock = socket.create_connection((server.host, server.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"GET /t/stream/?channels=small HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            socks.append(sock)
        subscribed(server, "small", 10)
        before = peak_rss_kib(server.proc.pid)
        for _ in range(20):  # 2 MB of events for each stream, in batches
            url = server.url + "/t/publish-many/?channel=small&n=5000&size=10"
            assert requests.get(url, timeout=60).status_code == 200
            if server.status()["dropped_slow"] == 10:
                break
        assert server.wait_for_status(lambda s: s["dropped_slow"] == 10)
        assert peak_rss_kib(server.proc.pid) - before < 10 * 4 * 1024  # under 4 MiB each
    finally:
        for sock in socks:
            sock.close()
        assert server.stop() == 0, "".join(server.output)


def test_disconnects_release_subscriptions(comet):
    clients = [SSEClient(comet, "/t/stream/?channels=leaving,other") for _ in range(5)]
    subscribed(comet, "leaving", 5)
    for client in clients[:3]:
        client.close()
    status = subscribed(comet, "leaving", 2)
    assert status["channels"]["other"] == 2
    for client in clients[3:]:
        client.close()
    status = comet.wait_for_status(lambda s: not {"leaving", "other"} & set(s["channels"]))
    assert status["held"] == 0 and status["streams"] == 0


def test_head_of_a_stream_ends_at_once(comet):
    with comet.connect() as sock:
        for _ in range(2):  # and the keep-alive connection serves the next request
            sock.sendall(b"HEAD /t/stream/?channels=heads HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += sock.recv(1)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert b"text/event-stream" in head
    comet.wait_for_status(lambda s: s["held"] == 0 and "heads" not in s["channels"])


def test_streams_and_polls_with_views_in_the_loop_thread(comet_inline):
    with SSEClient(comet_inline, "/t/stream/?channels=inline") as client:
        subscribed(comet_inline, "inline", 1)
        event_id = publish(comet_inline, "inline", "x")
        assert client.next_event() == {"id": str(event_id), "data": '"x"'}
    answer = requests.get(comet_inline.url + f"/t/poll/?channel=inline&since={event_id - 1}")
    assert answer.json()["event"]["id"] == event_id


@pytest.mark.parametrize("path", ["/t/stream/?channels=", "/t/fastpoll/?channel="])
def test_a_malformed_channel_is_a_400_that_reflects_nothing(comet, path):
    response = requests.get(comet.url + path + "x<script>alert(1)</script>", timeout=10)
    assert response.status_code == 400
    assert response.headers["Content-Type"].startswith("text/plain")
    assert "<script>" not in response.text
    refused = requests.get(comet.url + path + "secret-room", timeout=10)
    assert refused.status_code == 403
    assert refused.headers["Content-Type"].startswith("text/plain")


def test_a_timeout_that_is_not_finite_is_refused_and_leaves_no_timer(comet):
    for timeout in ("nan", "inf", "1e19"):
        response = requests.get(comet.url + f"/t/fastpoll/?channel=x&timeout={timeout}")
        assert response.status_code == 500
    assert comet.wait_for_status(lambda s: s["held"] == 0)["timers"] == 0


def test_a_channel_named_twice_replays_each_event_once(comet):
    first = publish(comet, "twice", 1)
    second = publish(comet, "twice", 2)
    path = f"/t/stream/?channels=twice,twice&lastEventId={first - 1}"
    with SSEClient(comet, path) as client:
        assert [client.next_event()["id"] for _ in range(2)] == [str(first), str(second)]
        third = publish(comet, "twice", 3)
        assert client.next_event()["id"] == str(third)  # not second again
    polled = requests.get(comet.url + f"/t/fastpoll/?channel=twice,twice&since={first - 1}")
    assert [e["id"] for e in polled.json()["events"]] == [first, second, third]


def test_a_stream_with_a_bodyless_status_ends_at_once_and_leaks_nothing(comet):
    """A 204 carries no body: the stream is not held, and no event frame can be left in
    the buffer evhttp shares between responses (it went out with the next one)."""
    with comet.connect() as sock:
        sock.sendall(b"GET /t/stream-204/?channels=nobody HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 204 ")
        comet.wait_for_status(lambda s: "nobody" not in s["channels"] and s["held"] == 0)
        response = requests.post(
            comet.url + "/t/publish/", data={"channel": "nobody", "data": '"x"'}, timeout=10
        )
        assert response.json() == {"id": response.json()["id"]}  # its own body, nothing else


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


def test_the_access_log_counts_what_left_of_a_stream_cut_short(demo_db):
    """A client that stops reading, cut by the write timeout (2 s here) with a bound's
    worth still queued: its line counts the event bytes that reached the client, not
    less by the chunked framing of what never left (the server counts that framing's
    share of the unsent bytes: exact for events of one size, to a few bytes)."""
    env = {"TEST_TIMEOUT": "2", "TEST_HISTORY_SIZE": "100000"}
    server = runcomet(db=demo_db, env=env)
    try:
        with server.connect() as sock:
            sock.sendall(b"GET /t/stream/?channels=stalled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            subscribed(server, "stalled", 1)
            # 10 MB: more than the kernel's buffers take, the rest queued in the server's.
            url = server.url + "/t/publish-many/?channel=stalled&n=10000&size=1000"
            assert requests.get(url, timeout=60).status_code == 200
            server.wait_for_status(lambda s: "stalled" not in s["channels"], timeout=30)
            received = b"".join(iter(lambda: sock.recv(1 << 16), b""))  # to the end
        body = received.partition(b"\r\n\r\n")[2]
        payload = 0
        while body:  # chunks, the last one cut short
            size_line, _, body = body.partition(b"\r\n")
            payload += min(int(size_line, 16), len(body))
            body = body[int(size_line, 16) + 2 :]
        assert 0 < payload < 10000 * 1000
        assert server.logged("/t/stream/?channels=stalled HTTP/1.1")
        line = next(line for line in server.output if "channels=stalled HTTP/1.1" in line)
        logged = int(line.split('" 200 ')[1].split()[0])
        assert abs(logged - payload) <= 8, (payload, line)  # the framing of 64 KiB: 450
    finally:
        assert server.stop() == 0


def test_a_stream_that_reads_nothing_is_cut_after_the_write_timeout(demo_db):
    """A client that never reads a big replay is cut once COMET_TIMEOUT (2 s here) passes
    with no progress, heartbeats (every 0.2 s) notwithstanding: they used to re-arm the
    write timeout, so such a request held its replay in memory for as long as it liked.
    (The output bound is raised so that the replay, 5 MB, is more than the kernel's
    buffers take: what they take is not the server's to time.)"""
    bound = str(8 * 1024 * 1024)
    env = {"TEST_SSE_HEARTBEAT": "0.2", "TEST_TIMEOUT": "2", "TEST_MAX_PENDING_OUTPUT": bound}
    server = runcomet(db=demo_db, env=env)
    sock = None
    try:
        ids = [publish(server, "unread", "u" * 1_000_000) for _ in range(5)]
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((server.host, server.port))
        request = f"GET /t/stream/?channels=unread&lastEventId={ids[0] - 1} HTTP/1.1\r\n"
        sock.sendall(request.encode() + b"Host: 127.0.0.1\r\n\r\n")
        subscribed(server, "unread", 1)
        status = server.wait_for_status(lambda s: "unread" not in s["channels"], timeout=30)
        assert status["held"] == 0
    finally:
        if sock is not None:
            sock.close()
        assert server.stop() == 0, "".join(server.output)

"""Server-Sent Events to clients that read slowly or not at all: dropped when over
their bound, caught up from the history when they read, nothing left behind."""

import json
import socket

import pytest
import requests

from .processes import peak_rss_kib, runcomet
from .publishing import publish, subscribed
from .sse_client import SSEClient


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

"""Server-Sent Events over real sockets: framing, replay, heartbeats, fan-out to 1,000
clients, authorization, disconnects (history gaps: test_sse_gaps.py; slow readers:
test_sse_slow_readers.py; long-polls: test_longpoll.py)."""

import re

import pytest
import requests

from django_comet.evloop.frames import sse_frame
from django_comet.sse import EventStreamResponse, _parse_event_id

from .publishing import publish, subscribed
from .sse_client import SSEClient


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

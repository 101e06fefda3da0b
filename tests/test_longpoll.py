"""Long-polls over real sockets: waiting and answering, timeouts, cursors and history
gaps, the chat's poll protocol, many polls woken by one publish, a poll's connection
after its answer."""

import concurrent.futures
import contextlib
import fcntl
import json
import struct
import termios

import pytest
import requests

from .processes import read_body, read_chunked, runcomet, wait_until
from .publishing import publish, subscribed


@pytest.fixture(scope="module")
def forgetful(demo_db):
    """A server that keeps no history, with views in the loop thread (so that a view's
    publishes all happen before the loop fans the first one out)."""
    server = runcomet("--threads", "0", db=demo_db, env={"TEST_HISTORY_SIZE": "0"})
    yield server
    assert server.stop() == 0


def test_a_long_poll_woken_after_its_events_left_the_history_gets_them_and_the_gap(forgetful):
    with forgetful.connect() as sock:
        sock.sendall(
            b"GET /t/fastpoll/?channel=burst&timeout=30 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        subscribed(forgetful, "burst", 1)
        last = publish(forgetful, "burst,burst,burst", "x")
        answer = json.loads(read_body(sock))
    # The event that woke it, though the history let it go at once; the two after it
    # are gone for this client, and it is told.
    assert answer == {"events": [{"id": last - 2, "data": "x"}], "last_id": last - 2, "gap": True}
    # One event alone, let go by the history as it came: no gap.
    with forgetful.connect() as sock:
        sock.sendall(
            b"GET /t/fastpoll/?channel=burst&since=%d&timeout=30 HTTP/1.1\r\n"
            b"Host: 127.0.0.1\r\n\r\n" % last
        )
        subscribed(forgetful, "burst", 1)
        alone = publish(forgetful, "burst", "y")
        answer = json.loads(read_body(sock))
    assert answer == {"events": [{"id": alone, "data": "y"}], "last_id": alone}
    forgetful.wait_for_status(lambda s: s["held"] == 0)


def test_a_gap_with_no_event_after_it_is_told_once_not_at_every_poll(forgetful):
    """A channel whose events are all gone (no history kept here): a poll from before
    them is told of the gap on its timeout, and its cursor moves past it, so that the
    next poll is not told again (it was, every poll, with last_id where it was)."""
    seen = publish(forgetful, "emptied", "seen")
    gone = publish(forgetful, "emptied", "gone")
    url = forgetful.url + f"/t/fastpoll/?channel=emptied&since={seen}&timeout=0.2"
    first = requests.get(url)
    assert first.json()["gap"] is True and first.json()["events"] == []
    assert first.json()["last_id"] >= gone
    since = first.json()["last_id"]
    url = forgetful.url + f"/t/fastpoll/?channel=emptied&since={since}&timeout=0.2"
    assert requests.get(url).json() == {"events": [], "last_id": since}


def test_long_poll_waits_then_answers_with_the_event(comet):
    with comet.connect() as sock:
        sock.sendall(b"GET /t/poll/?channel=lp&timeout=30 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        subscribed(comet, "lp", 1)
        event_id = publish(comet, "lp", {"n": 1})
        body = read_body(sock)
    assert json.loads(body)["event"] == {
        "channel": "lp",
        "id": event_id,
        "event": None,
        "data": {"n": 1},
    }
    comet.wait_for_status(lambda s: "lp" not in s["channels"] and s["held"] == 0)


@pytest.mark.parametrize("waits", [1, 2])
def test_a_held_poll_still_closes_the_connection_when_the_client_asked(comet, waits):
    """A held poll's header lists are freed while it waits; the client's
    "Connection: close" must survive that (RFC 9112 9.6), through a second wait too."""
    channel = f"lp-close-{waits}"
    path = (
        f"/t/poll/?channel={channel}&timeout=30"
        if waits == 1
        else f"/t/poll-twice/?channel={channel}"
    )
    with comet.connect() as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        for n in range(waits):
            subscribed(comet, channel, 1)
            publish(comet, channel, {"n": n})
            while b'"n": %d' % n not in data:  # this wait's answer (the next wait is on)
                more = sock.recv(4096)
                assert more, data
                data += more
        while more := sock.recv(4096):  # only the server closing ends this (else: timeout)
            data += more
    assert data.endswith(b"\r\n0\r\n\r\n")  # and it closed after a clean end


def test_a_timed_stage_after_a_wait_gets_no_event(comet):
    """A stage deferred from a defer_until stage is a fresh request: the event was
    that stage's, and a view without an ``event`` parameter must not be given one."""
    with comet.connect() as sock:
        sock.sendall(
            b"GET /t/poll-then-stage/?channel=then-stage HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        subscribed(comet, "then-stage", 1)
        event_id = publish(comet, "then-stage", {})
        body = read_body(sock)
    assert body == b"waiting;event %d;done after event %d;" % (event_id, event_id)


def test_long_poll_timeout_gives_none(comet):
    response = requests.get(comet.url + "/t/poll/?channel=lp-timeout&timeout=0.2")
    assert response.json() == {"event": None}
    # (Waited for, not read once: the shared server may still be letting go of an
    # earlier test's clients.)
    comet.wait_for_status(lambda s: s["timers"] == 0)


def test_held_long_polls_share_one_timer_and_each_times_out(comet):
    """Thousands of long-polls wait at once, most answered by an event before their
    timeout: their timeouts share one loop timer, not one each.  Each still times out
    on its own (the short ones first), and clients that leave take theirs away."""
    leaving = [comet.connect() for _ in range(20)]
    for sock in leaving:
        sock.sendall(
            b"GET /t/fastpoll/?channel=lp-shared&timeout=600 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
    subscribed(comet, "lp-shared", 20)
    comet.wait_for_status(lambda s: s["timers"] == 1)
    with comet.connect() as short, comet.connect() as shorter:
        short.sendall(
            b"GET /t/fastpoll/?channel=lp-shared&timeout=0.4 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        shorter.sendall(
            b"GET /t/fastpoll/?channel=lp-shared&timeout=0.2 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        for sock in (shorter, short):
            body = json.loads(read_body(sock))
            assert body["events"] == []  # timed out, with nothing
    for sock in leaving:
        sock.close()
    status = comet.wait_for_status(lambda s: s["held"] == 0)
    assert status["timers"] == 0


def poll_request(path):
    return b"GET %b HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path.encode()


def cut_before_the_end(sock):
    data = b""
    while more := sock.recv(4096):
        data += more
    return not data.endswith(b"\r\n0\r\n\r\n")


def test_a_long_poll_answer_that_fails_to_render_cuts_only_its_own_client(comet):
    """An event and a timeout each reach a waiter whose rendering raises: that client's
    connection is cut, and the waiters beside it are still answered."""
    with comet.connect() as broken, comet.connect() as good:
        broken.sendall(poll_request("/t/brokenpoll/?channel=lp-broken&timeout=60"))
        good.sendall(poll_request("/t/fastpoll/?channel=lp-broken&timeout=60"))
        subscribed(comet, "lp-broken", 2)
        event_id = publish(comet, "lp-broken", "x")
        assert cut_before_the_end(broken)
        assert json.loads(read_body(good))["last_id"] == event_id
    with comet.connect() as broken, comet.connect() as good:
        # (The broken one's timeout comes first; nothing waits for it to begin, which a
        # status poll could miss on a busy machine.)
        broken.sendall(poll_request("/t/brokenpoll/?channel=lp-broken-t&timeout=0.5"))
        good.sendall(poll_request("/t/fastpoll/?channel=lp-broken-t&timeout=1.5"))
        assert cut_before_the_end(broken)
        assert json.loads(read_body(good))["events"] == []  # its timeout still came
    status = comet.wait_for_status(lambda s: s["held"] == 0)
    assert status["timers"] == 0


def test_an_aborted_long_poll_whose_client_sent_much_is_freed(comet):
    """A held response caps what it reads of its client's input (64 KiB), and reading
    stops there.  An abort turned reading back on, but not past the cap: with nothing
    left to write, the connection was never looked at again, and stayed held for good
    (its client gone or not)."""
    with comet.connect() as broken:
        broken.sendall(poll_request("/t/brokenpoll/?channel=lp-flooded&timeout=600"))
        subscribed(comet, "lp-flooded", 1)
        broken.setblocking(False)
        sent = 0
        with contextlib.suppress(BlockingIOError):
            while sent < 4 * 1024 * 1024:  # until the buffers on the way are full
                sent += broken.send(b"X" * 65536)
        wait_until(lambda: sent - unread(broken, comet.port) >= 64 * 1024)  # read: capped
        publish(comet, "lp-flooded", "x")  # its answer fails to render: an abort
        broken.setblocking(True)
        with contextlib.suppress(ConnectionResetError):
            assert cut_before_the_end(broken)
    comet.wait_for_status(lambda s: s["held"] == 0)


def unread(sock, server_port):
    """Bytes sent on ``sock`` that the server has not read from its socket yet: in our
    send queue, or in its receive queue (/proc/net/tcp)."""
    outq = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    ours = sock.getsockname()[1]
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local, remote = (int(f.split(":")[1], 16) for f in fields[1:3])
            if (local, remote) == (server_port, ours):
                return outq + int(fields[4].split(":")[1], 16)
    raise AssertionError("the server's end of the connection is not in /proc/net/tcp")


def test_long_poll_cursor_answers_at_once_from_history(comet):
    first = publish(comet, "cursor", "a")
    second = publish(comet, "cursor", "b")
    answer = requests.get(comet.url + f"/t/poll/?channel=cursor&since={first}&timeout=30").json()
    assert answer["event"]["id"] == second  # nothing lost between two polls


def test_chat_poll_protocol(comet):
    since = requests.get(comet.url + "/chat/poll/?since=0&x=1", timeout=30)
    assert since.status_code == 200
    last = since.json()["last_id"] if since.json()["events"] else 0
    event_id = publish(comet, "chat", {"name": "t", "text": "hello"})
    body = requests.get(comet.url + f"/chat/poll/?since={last}").json()
    assert body["events"][-1] == {"id": event_id, "data": {"name": "t", "text": "hello"}}
    assert body["last_id"] == event_id


@pytest.mark.parametrize("since", ["abc", "-1", "", "1.5", "%C2%B2"])
def test_a_poll_cursor_that_is_not_an_event_id_is_a_400(comet, since):
    """poll_response takes the query string's text as it came (it was a 500 in the
    README's example, which called int() on it)."""
    readme = requests.get(comet.url + f"/t/readme-wait/?since={since}", timeout=30)
    assert readme.status_code == 400  # the README's own view, as printed
    for path in ("/chat/poll/", "/t/fastpoll/?channel=chat&"):
        url = comet.url + path + ("&" if "?" in path else "?") + f"since={since}"
        response = requests.get(url.replace("&&", "&"), timeout=30)
        assert response.status_code == 400, (path, response.status_code)
        assert response.text == "since must be an event id (a whole number)."
    comet.wait_for_status(lambda s: s["held"] == 0)


def test_a_poll_cursor_of_thousands_of_digits_is_read_as_the_number_it_is(comet):
    """Python's int() refuses more than 4,300 digits: such a cursor was a 500."""
    first = publish(comet, "digits", "one")
    padded = "0" * 5000 + str(first - 1)  # the event before `first`: answered at once
    url = comet.url + f"/t/fastpoll/?channel=digits&since={padded}&timeout=30"
    assert [e["id"] for e in requests.get(url, timeout=30).json()["events"]] == [first]
    said = publish(comet, "chat", {"name": "a", "text": "b"})
    reset = requests.get(comet.url + "/chat/poll/?since=" + "9" * 5000, timeout=30)
    assert reset.status_code == 200  # past every id: a cursor from before a reset,
    assert reset.json()["events"][-1]["id"] == said  # answered with the history at once


def test_the_readmes_2007_style_long_poll(comet):
    """The README's defer_until example (tests/event_views.py has it as printed): history at
    once, a wait for the next event, and a cursor from before a reset starting over
    instead of answering nothing at once, again and again."""
    first = publish(comet, "readme", "one")
    body = requests.get(comet.url + "/t/readme-wait/?since=0", timeout=30).json()
    assert body["events"][-1]["id"] == first and body["last_id"] == first
    with comet.connect() as sock:
        sock.sendall(b"GET /t/readme-wait/?since=%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % first)
        comet.wait_for_status(lambda s: s["channels"].get("readme") == 1)
        second = publish(comet, "readme", "two")
        _, chunks = read_chunked(sock)
    body = json.loads(b"".join(chunks))
    assert [e["id"] for e in body["events"]] == [second] and body["last_id"] == second
    reset = requests.get(comet.url + "/t/readme-wait/?since=99999999999999999", timeout=30)
    assert [e["id"] for e in reset.json()["events"]][-2:] == [first, second]
    assert reset.json()["last_id"] == second  # the next poll waits again
    # Its stage's own URL, requested directly (a crawler), is a 400, not a 500.
    assert requests.get(comet.url + "/t/readme-deliver/", timeout=30).status_code == 400


def test_poll_response_waits_then_answers_without_a_view(comet):
    with comet.connect() as sock:
        sock.sendall(
            b"GET /t/fastpoll/?channel=fast&timeout=30 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        subscribed(comet, "fast", 1)
        first = publish(comet, "fast", {"n": 1}, event="named")
        body = json.loads(read_body(sock))
    assert body == {"events": [{"id": first, "data": {"n": 1}, "event": "named"}], "last_id": first}
    second = publish(comet, "fast", [2])
    at_once = requests.get(comet.url + f"/t/fastpoll/?channel=fast&since={first - 1}").json()
    assert [e["id"] for e in at_once["events"]] == [first, second]
    assert at_once["last_id"] == second
    empty = requests.get(comet.url + f"/t/fastpoll/?channel=fast&since={second}&timeout=0.2")
    assert empty.json() == {"events": [], "last_id": second}
    # A proxy that buffers (nginx by default) would hold back its first byte, which
    # tells a browser's script that the poll is live.
    assert empty.headers["X-Accel-Buffering"] == "no"
    comet.wait_for_status(lambda s: s["held"] == 0 and "fast" not in s["channels"])


def test_many_long_polls_woken_by_one_publish(comet):
    socks = []
    try:
        for _ in range(300):
            sock = comet.connect()
            sock.sendall(
                b"GET /t/fastpoll/?channel=crowdpoll&timeout=30 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            )
            socks.append(sock)
        subscribed(comet, "crowdpoll", 300)
        event_id = publish(comet, "crowdpoll", "all")
        for sock in socks:
            assert json.loads(read_body(sock))["last_id"] == event_id
    finally:
        for sock in socks:
            sock.close()
    comet.wait_for_status(lambda s: s["held"] == 0)


def test_a_poll_gets_only_events_of_its_own_channels(comet_inline):
    """Polls woken in one pass share a rendering only if they listen to the same
    channels: one publish request, two events, views in the loop thread (so both events
    are in the hub before the first is fanned out)."""
    socks = {}
    try:
        for name, channels in (("both", "own-a,own-b"), ("one", "own-a")):
            socks[name] = comet_inline.connect()
            request = f"GET /t/fastpoll/?channel={channels}&timeout=30 HTTP/1.1\r\n"
            socks[name].sendall(request.encode() + b"Host: 127.0.0.1\r\n\r\n")
        subscribed(comet_inline, "own-a", 2)
        last = publish(comet_inline, "own-a,own-b", "x")
        both = json.loads(read_body(socks["both"]))
        one = json.loads(read_body(socks["one"]))
    finally:
        for sock in socks.values():
            sock.close()
    assert [e["id"] for e in both["events"]] == [last - 1, last]
    assert [e["id"] for e in one["events"]] == [last - 1]  # never own-b's


def test_a_channel_named_twice_is_listened_to_once(comet):
    """Both when the poll is answered from the history and when it is woken."""
    first = publish(comet, "twice", "a")
    url = comet.url + f"/t/fastpoll/?channel=twice,twice&since={first - 1}"
    assert [e["id"] for e in requests.get(url, timeout=10).json()["events"]] == [first]
    with comet.connect() as sock:
        request = f"GET /t/fastpoll/?channel=twice,twice&since={first}&timeout=30 HTTP/1.1\r\n"
        sock.sendall(request.encode() + b"Host: 127.0.0.1\r\n\r\n")
        subscribed(comet, "twice", 1)
        second = publish(comet, "twice", "b")
        assert [e["id"] for e in json.loads(read_body(sock))["events"]] == [second]
    comet.wait_for_status(lambda s: s["held"] == 0)


@pytest.fixture(scope="module")
def bounded(demo_db):
    """A server with a 5-event history and a 64 KiB output bound."""
    env = {"TEST_HISTORY_SIZE": "5", "TEST_MAX_PENDING_OUTPUT": str(64 * 1024)}
    server = runcomet(db=demo_db, env=env)
    yield server
    assert server.stop() == 0


def test_paging_a_long_poll_from_before_a_gap_tells_it_once(bounded):
    """Two channels, each missing its oldest events: the answer is the newest that fit,
    with the gap (the client reloads), not the first of many batches that would each
    say it again."""
    for channel in ("page-a", "page-b"):
        for _ in range(7):  # the history keeps 5
            publish(bounded, channel, "x" * 30_000)
    url = bounded.url + "/t/fastpoll/?channel=page-a,page-b&timeout=0.2&since="
    answer = requests.get(url + "1").json()
    assert answer["gap"] is True
    answers = []
    while answer["events"]:
        answer = requests.get(url + str(answer["last_id"])).json()
        answers.append(answer)
    assert not any(a.get("gap") for a in answers)


def test_a_woken_long_polls_answer_is_bounded_too(bounded):
    """A burst that wakes a waiting poll: its answer holds what fits in the bound (64
    KiB here), the oldest first, and its next polls take the rest."""
    since = publish(bounded, "burst", "before")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        url = bounded.url + "/t/fastpoll/?channel=burst&timeout=30&since="
        waiting = pool.submit(lambda: requests.get(url + str(since), timeout=60).json())
        subscribed(bounded, "burst", 1)
        newest = requests.get(
            bounded.url + "/t/publish-many/?channel=burst&n=5&size=30000", timeout=30
        ).json()["id"]
        answer = waiting.result()
    got = []
    while True:
        assert "gap" not in answer and 1 <= len(answer["events"]) <= 2  # 2 fit in 64 KiB
        got += [e["id"] for e in answer["events"]]
        if answer["last_id"] == newest:
            break
        answer = requests.get(url + str(answer["last_id"]), timeout=60).json()
    assert len(got) == 5 and got == sorted(got) and got[-1] == newest


@pytest.mark.parametrize("threads", ["0", "2"])
def test_a_chain_of_waits_answered_from_the_history_goes_to_its_end(demo_db, threads):
    """defer_until stages, each answered at once from the history: with --threads 0 each
    ran inside the one before, until RecursionError cut the response (after about 120)."""
    server = runcomet("--threads", threads, db=demo_db, env={"TEST_HISTORY_SIZE": "400"})
    try:
        since = publish(server, "chain", "start")
        url = server.url + "/t/publish-many/?channel=chain&n=300"
        last = requests.get(url, timeout=30).json()["id"]
        with server.connect() as sock:
            target = f"/t/chain-of-polls/?channel=chain&since={since}&timeout=0.2"
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            *ids, end = read_body(sock).split(b";")
        assert end == b"end"
        ids = [int(i) for i in ids]
        assert len(ids) == 300 and ids == sorted(set(ids)) and ids[-1] == last
        server.wait_for_status(lambda s: s["held"] == 0)
    finally:
        assert server.stop() == 0

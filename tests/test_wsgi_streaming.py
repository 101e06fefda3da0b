"""The WSGI server streaming bodies over real sockets: lengths kept or cut, lazy bodies
paced by their clients, failures after the head, generators closed."""

import socket
import uuid

import pytest
import requests

from django_comet.evloop.producer import PUMP_BUDGET, PUMP_ITEM_COST

from .processes import (
    assert_clean_hellos,
    body_of,
    closes,
    evloop,
    raw,
    read_chunked,
    read_cut_stream,
    wait_until,
)


@pytest.mark.parametrize(
    ("method", "query", "status"),
    [
        (b"HEAD", b"", b"200 OK"),
        (b"HEAD", b"length", b"200 OK"),
        (b"GET", b"304", b"304 Not Modified"),
    ],
)
def test_a_large_body_that_is_not_sent_ends_and_the_connection_goes_on(
    wsgi_server, method, query, status
):
    """None of a HEAD's or a 304's body goes out, so nothing may wait for it to drain: the
    response ends, the body's close() is called, and the connection serves the next request."""
    tag = uuid.uuid4().hex
    with wsgi_server.connect() as sock:
        sock.settimeout(10)
        f = sock.makefile("rb")
        sock.sendall(
            b"%s /large?%s HTTP/1.1\r\nHost: x\r\nX-Tag: %s\r\n\r\n" % (method, query, tag.encode())
        )
        assert f.readline() == b"HTTP/1.1 " + status + b"\r\n"
        head = []
        while (line := f.readline()) != b"\r\n":
            head.append(line)
        assert (b"Content-Length: 4194304\r\n" in head) == (query == b"length")
        assert_clean_hellos(sock, f)
    assert closes(wsgi_server, tag, 1) == 1


@pytest.mark.parametrize(
    "request_line", [b"GET /slow-end HTTP/1.1\r\nConnection: close", b"GET /slow-end HTTP/1.0"]
)
def test_a_stream_that_ends_after_its_bytes_left_closes_cleanly(wsgi_server, request_line):
    """The end of a stream that is not chunked, with its bytes already sent and the
    connection to close: libevent frees the request and the connection at once, inside
    the call that ends the response, and the server must not release them again."""
    before = len(wsgi_server.output)
    for _ in range(3):
        out = raw(wsgi_server, request_line + b"\r\nHost: x\r\n\r\n")
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")) and body == b"e" * 300_000
    assert requests.get(wsgi_server.url + "/hello").status_code == 200
    assert not [line for line in wsgi_server.output[before:] if "Traceback" in line]


def test_a_stream_of_known_length_keeps_an_http10_connection_alive(wsgi_server):
    """Only a body of unknown length must end with an HTTP/1.0 connection."""
    with wsgi_server.connect() as sock:
        sock.settimeout(10)
        f = sock.makefile("rb")
        for _ in range(2):
            sock.sendall(b"GET /large?length HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
            assert f.readline() == b"HTTP/1.0 200 OK\r\n"
            while f.readline() != b"\r\n":
                pass
            assert f.read(64 * 65536) == b"L" * 64 * 65536


@pytest.mark.parametrize("server_name", ["wsgi_server", "wsgi_inline"])
@pytest.mark.parametrize(
    "path, expected", [(b"/overlong", b"o" * 10), (b"/overlong-items", b"0234512345")]
)
def test_a_stream_longer_than_its_length_is_cut_there_and_closed(
    request, server_name, path, expected
):
    """One item of 300 kB, or small items of a generator (with --threads 0 written to
    the socket one by one, and each counted: uncounted, the third went out too)."""
    server = request.getfixturevalue(server_name)
    with server.connect() as sock:
        sock.settimeout(10)
        sock.sendall(
            b"GET %b HTTP/1.1\r\nHost: x\r\n\r\nGET /hello HTTP/1.1\r\nHost: x\r\n\r\n" % path
        )
        out = b""
        while more := sock.recv(65536):
            out += more
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"Content-Length: 10" in head
    assert body == expected  # and then the connection closed: no stray bytes, no hello
    assert server.logged("runs past its Content-Length")


@pytest.mark.parametrize("server_name", ["wsgi_server", "wsgi_inline"])
def test_a_generators_empty_items_are_skipped_and_the_connection_goes_on(request, server_name):
    """An empty item is no chunk (PEP 3333 lets an app yield one): chunked, an empty
    chunk is the body's end, and the rest would be read as the next response."""
    server = request.getfixturevalue(server_name)
    with server.connect() as sock:
        sock.settimeout(10)
        for _ in range(2):  # the second on the same connection: nothing stray before it
            sock.sendall(b"GET /with-empties HTTP/1.1\r\nHost: x\r\n\r\n")
            head, chunks = read_chunked(sock)
            assert head.startswith(b"HTTP/1.1 200 "), head
            assert b"".join(chunks) == b"abc"


def test_a_stream_shorter_than_its_length_is_cut_not_ended(wsgi_server):
    with wsgi_server.connect() as sock:
        sock.settimeout(10)
        sock.sendall(b"GET /short-stream HTTP/1.1\r\nHost: x\r\n\r\n")
        out = b""
        while more := sock.recv(65536):  # the server closes: the client never waits on
            out += more
    assert len(out.partition(b"\r\n\r\n")[2]) == 300_000
    assert wsgi_server.logged("short of its Content-Length")


@pytest.mark.parametrize("server_name", ["wsgi_server", "wsgi_inline"])
def test_a_whole_answer_to_a_chunked_upload_ends_at_its_length(request, server_name):
    """The request's own chunked coding is not the answer's: evhttp ended a whole
    answer to a chunked upload with a last chunk, five bytes that a keep-alive client
    took for the start of its next answer."""
    server = request.getfixturevalue(server_name)
    out = raw(
        server,
        b"POST /body-length HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"5\r\nhello\r\n0\r\n\r\n"
        + b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    first, _, rest = out.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200") and b"Content-Length: 1\r\n" in first + b"\r\n"
    assert rest.startswith(b"5HTTP/1.1 200"), rest
    assert rest.endswith(b"Hello, world!")


def test_exception_after_headers_cuts_the_stream(wsgi_server):
    with wsgi_server.connect() as sock:
        sock.sendall(b"GET /raise-after HTTP/1.1\r\nHost: x\r\n\r\n")
        _, data = read_cut_stream(sock)
        assert data and data == b"x" * len(data)  # what it could of the first part
    assert requests.get(wsgi_server.url + "/hello").status_code == 200


def test_large_lazy_body_is_streamed_chunked(wsgi_server):
    with wsgi_server.connect() as sock:
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        _, chunks = read_chunked(sock)
    assert b"".join(chunks) == b"0" * 200_000 + b"1" * 200_000 + b"2" * 200_000


@pytest.mark.parametrize("threads", ["0", "1"])
def test_system_exit_in_an_app_is_an_app_error_and_the_server_lives(threads):
    """sys.exit() in a view must neither end a worker thread (with one thread, the last)
    nor escape into the loop: a 500, or a cut stream, and the next request is served."""
    server = evloop("tests.fixtureapps.apps:dispatch", "--threads", threads)
    try:
        for _ in range(2):
            assert requests.get(server.url + "/exit-before", timeout=10).status_code == 500
            with server.connect() as sock:
                sock.sendall(b"GET /exit-after HTTP/1.1\r\nHost: x\r\n\r\n")
                _, data = read_cut_stream(sock)
                assert data and data == b"x" * len(data)
        assert requests.get(server.url + "/hello", timeout=10).status_code == 200
        assert server.logged("a view called sys.exit()")
    finally:
        assert server.stop() == 0, "".join(server.output)


@pytest.mark.parametrize(
    "target, size",
    [("/bytes?200000", 200_000), ("/large", 64 * 65536), ("/large?length", 64 * 65536)],
    ids=["whole", "chunked", "streamed-with-length"],
)
def test_a_client_that_half_closes_gets_the_whole_response(wsgi_server, target, size):
    """nc -N, some HTTP/1.0 clients and TCP proxies shut their sending side once the
    request is out: that is no reason to cut the response (evhttp took it for one)."""
    with wsgi_server.connect() as sock:
        sock.settimeout(10)
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target.encode())
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while more := sock.recv(65536):  # then closed: the client has nothing more to ask
            out += more
    assert out.startswith(b"HTTP/1.1 200 ")
    assert len(body_of(out)) == size


def test_a_stream_failing_after_its_bytes_left_is_cut_and_released(wsgi_server):
    """The cut must be noticed with nothing left to write and reading off (it was not:
    the exchange and its descriptor stayed, and no access-log line ever came)."""
    with wsgi_server.connect() as sock:
        sock.settimeout(10)
        sock.sendall(b"GET /raise-later HTTP/1.1\r\nHost: x\r\n\r\n")
        _, data = read_cut_stream(sock)
        assert len(data) == 300_000
    assert wsgi_server.logged('"GET /raise-later HTTP/1.1" 200 300000')


def test_an_empty_str_after_streaming_began_cuts_the_response(wsgi_server):
    out = raw(wsgi_server, b"GET /empty-str-later HTTP/1.1\r\nHost: x\r\n\r\n")
    # Cut: what had not reached the socket yet (the head too, at times) never does.
    assert not out.endswith(b"0\r\n\r\n")
    assert wsgi_server.logged("yielded str, not bytes")
    assert wsgi_server.logged('"GET /empty-str-later HTTP/1.1" 200')
    line = next(x for x in wsgi_server.output if '"GET /empty-str-later' in x)
    assert line.rstrip().endswith("(cut by the server)"), line


def test_an_error_page_after_a_generators_first_bytes_cuts_the_response(wsgi_server):
    """A generator's first bytes go out as they come (PEP 3333), headers with them: an
    error page it then starts (start_response with exc_info) is too late, and the
    client sees the body cut short, never a clean end."""
    out = raw(wsgi_server, b"GET /exc-info-after-yield HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 "), out
    assert b"body-part-one;" in out and b"error page" not in out, out
    assert not out.endswith(b"0\r\n\r\n"), out


def test_clients_that_stop_reading_a_stream_hold_no_thread():
    """A streamed body pauses while its client does not read, in its worker thread; a
    spare thread runs views in its place meanwhile, so a few such clients cannot stall
    every view."""
    server = evloop("tests.fixtureapps.apps:dispatch", "--threads", "2")
    stalled = []
    try:
        for _ in range(4):  # twice the threads
            sock = server.connect()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 200")
            stalled.append(sock)
        assert requests.get(server.url + "/hello", timeout=10).status_code == 200
    finally:
        for sock in stalled:
            sock.close()
        server.stop()


def test_a_paused_body_goes_on_and_is_closed_in_the_thread_that_began_it():
    """A Django body's database connection, translation and time zone are its view
    thread's: a body paused for a slow reader used to go on in whichever worker was free
    (a QuerySet.iterator() then found its connection closed by the requests its first
    thread had served meanwhile), and was closed in the loop thread if its client left."""
    server = evloop("tests.fixtureapps.apps:dispatch", "--threads", "4")
    try:
        with server.connect() as sock:
            sock.sendall(b"GET /thread-names?256 HTTP/1.1\r\nHost: x\r\nX-Tag: t1\r\n\r\n")
            for _ in range(20):  # other views meanwhile, in the other threads
                assert requests.get(server.url + "/hello", timeout=10).status_code == 200
            _, chunks = read_chunked(sock)
        body = b"".join(chunks)
        assert len(body) == 256 * 65536
        names = {body[i : i + 65536].rstrip(b".") for i in range(0, len(body), 65536)}
        assert len(names) == 1, names
        (name,) = names

        def closed_in():
            response = requests.get(server.url + "/closed-in", headers={"X-Tag": "t1"})
            return response.content

        wait_until(lambda: closed_in() == name)
    finally:
        server.stop()


@pytest.mark.parametrize("server_name", ["wsgi_server", "wsgi_inline"])
def test_a_large_body_past_its_length_ends_at_it_and_is_closed(request, server_name):
    """The chunk that crosses the write high-water mark is cut to nothing by the
    Content-Length: the response ends there (closing the connection) instead of waiting
    for a drain that never comes."""
    server = request.getfixturevalue(server_name)
    tag = uuid.uuid4().hex
    out = raw(
        server, b"GET /overlong-large HTTP/1.1\r\nHost: x\r\nX-Tag: %s\r\n\r\n" % tag.encode()
    )
    assert out.split(b"\r\n\r\n", 1)[1] == b"a" * 300_000
    assert closes(server, tag, 1) == 1


def test_a_stream_cut_by_its_app_still_sends_what_was_queued(wsgi_server):
    """The app fails right after its first part: the client gets the head and what it
    can of that part, then the cut, not an empty reply (which reads as "try again")."""
    with wsgi_server.connect() as sock:
        sock.sendall(b"GET /raise-after HTTP/1.1\r\nHost: x\r\n\r\n")
        _, data = read_cut_stream(sock)
    assert len(data) > 0


def test_a_generators_item_goes_out_before_the_generator_is_asked_for_the_next(wsgi_server):
    """PEP 3333 ("Buffering and Streaming"): the server must not delay a block.  The
    app here gives its second item only once the client has its first."""
    tag = uuid.uuid4().hex.encode()
    with wsgi_server.connect() as sock:
        sock.settimeout(30)  # (the app would give up waiting after 60 s)
        sock.sendall(b"GET /first-then-wait HTTP/1.1\r\nHost: x\r\nX-Tag: %b\r\n\r\n" % tag)
        out = b""
        while b"first;" not in out:
            more = sock.recv(65536)
            assert more, out
            out += more
        released = requests.get(wsgi_server.url + "/release", headers={"X-Tag": tag}, timeout=10)
        assert released.status_code == 200
        while not out.endswith(b"\r\n0\r\n\r\n"):
            more = sock.recv(65536)
            assert more, out
            out += more
    assert b"second" in out


@pytest.mark.parametrize(
    ("path", "before"),
    [
        (b"/first-then-signal?%d", b"first;"),
        (b"/big-item-then-signal?%d,102400", b"B;"),  # (more than libevent writes at once)
        (b"/big-item-then-signal?%d,2097152", b"B;"),  # (past the high-water mark)
        (b"/big-first-then-signal?%d,16777216", b"B;"),  # (the first, more than the
    ],  # socket takes: the pump starts once it has left, not with the head)
    ids=["small", "100KiB", "2MiB", "16MiB-first"],
)
def test_with_threads_0_an_item_goes_out_before_the_generator_is_asked_for_the_next(
    wsgi_inline, path, before
):
    """As above, in the loop thread: the app asks for its next item only once the
    client has all of the one before (it then waits for the client's go, on a socket of
    the test's: the loop thread serves nothing else meanwhile).  The loop used to ask
    for items until 1 MiB was unsent before it wrote any, and then, one item a pass,
    wrote no more than 16 KiB of one before asking (found by reviews)."""
    with socket.create_server(("127.0.0.1", 0)) as listener, wsgi_inline.connect() as sock:
        listener.settimeout(30)
        sock.settimeout(30)  # (the app would give up waiting after 60 s)
        port = listener.getsockname()[1]
        sock.sendall(b"GET %b HTTP/1.1\r\nHost: x\r\n\r\n" % (path % port))
        out = b""
        try:
            while before not in out:
                more = sock.recv(1 << 20)
                assert more, out[-100:]
                out += more
        finally:  # (the app is let go whatever happened: the server serves other tests)
            app, _ = listener.accept()
            with app:
                app.sendall(b"g")
        while not out.endswith(b"\r\n0\r\n\r\n"):
            more = sock.recv(65536)
            assert more, out
            out += more
    assert b"second" in out


def test_with_threads_0_bodies_streaming_at_full_speed_leave_the_loop_to_the_others():
    """70 endless bodies of small items, each written as it comes: the loop thread
    pumping them still accepts and answers other requests (it pumped each a while, then
    waited for its bytes to leave, serving the others meanwhile).  An earlier version
    queued a pump for each drain too, and stopped accepting until the bodies ended
    (found by a review)."""
    server = evloop("tests.fixtureapps.apps:dispatch", "--threads", "0")
    tag = uuid.uuid4().hex
    socks = []
    try:
        for _ in range(70):
            sock = server.connect()
            sock.sendall(f"GET /rows HTTP/1.1\r\nHost: x\r\nX-Tag: {tag}\r\n\r\n".encode())
            socks.append(sock)
        for sock in socks:  # each is streaming
            sock.settimeout(30)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        for _ in range(3):  # (new connections: accepting goes on)
            assert requests.get(server.url + "/hello", timeout=30).text == "Hello, world!"
        for sock in socks:
            sock.close()
        assert closes(server, tag, 70) == 70
    finally:
        for sock in socks:
            sock.close()
        assert server.stop() == 0


@pytest.mark.parametrize("count, size", [(3000, 1), (64, 8192), (48, 20000)])
def test_with_threads_0_a_body_pumped_at_full_speed_gives_way_after_its_turn(
    wsgi_inline, count, size
):
    """The loop thread pumps a body for a turn of PUMP_BUDGET bytes (an item counting at
    least PUMP_ITEM_COST), then serves the others: the body's generator asks the server
    for /mark as it begins, and tells at which item it saw that answered.  Not before
    the turn is over (giving way at each item, or at each 16 KiB, is a pass per item),
    and long before the body's end (a pump that never gives way while the socket takes
    it all holds every other connection).  A turn's items all fit in the sockets'
    buffers, so the socket never makes the pump give way sooner."""
    tag = uuid.uuid4().hex.encode()
    with wsgi_inline.connect() as sock:
        sock.settimeout(30)
        sock.sendall(
            b"GET /items-then-count?%d,%d HTTP/1.1\r\nHost: x\r\nX-Tag: %b\r\n\r\n"
            % (count, size, tag)
        )
        _, chunks = read_chunked(sock)
    seen = int(b"".join(chunks).rpartition(b";seen=")[2].rstrip(b";"))
    turn = PUMP_BUDGET // max(size, PUMP_ITEM_COST)
    assert turn <= seen < count, (turn, seen)


def test_bodies_that_wait_between_items_do_not_hold_every_view_thread():
    """A generator that waits between its items (an event stream of its own, 20 ms a
    tick here) holds the thread that iterates it: with as many as there are threads,
    no other request was answered.  Spares take their places while requests wait (4
    per thread), and past them the log says why requests wait (found by a review
    against runserver, which starts a thread per request)."""
    server = evloop("tests.fixtureapps.apps:dispatch", "--threads", "1")
    tag = uuid.uuid4().hex.encode()
    socks = []
    try:
        for n in range(5):  # the thread and its 4 spares, each streaming
            sock = server.connect()
            sock.sendall(b"GET /ticks HTTP/1.1\r\nHost: x\r\nX-Tag: %b\r\n\r\n" % tag)
            socks.append(sock)
            out = b""
            while b"tick" not in out:
                more = sock.recv(65536)
                assert more, out
                out += more
            if n < 4:  # a spare is left
                assert requests.get(server.url + "/hello", timeout=10).status_code == 200
        with server.connect() as sock:  # no spare left: it waits, and the log says why
            sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            assert server.logged("Requests wait for a view thread: 5 threads are streaming")
            for stream in socks:
                stream.close()
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        assert closes(server, tag.decode(), 5) == 5
    finally:
        for sock in socks:
            sock.close()
        assert server.stop() == 0


def test_a_generator_whose_client_left_is_closed_even_if_it_never_ends(wsgi_server):
    """An endless slow body (a heartbeat every 20 ms) whose client leaves is closed at
    its next item: no view thread stays with it."""
    tag = uuid.uuid4().hex
    with wsgi_server.connect() as sock:
        sock.settimeout(30)
        sock.sendall(b"GET /ticks HTTP/1.1\r\nHost: x\r\nX-Tag: %s\r\n\r\n" % tag.encode())
        out = b""
        while b"tick" not in out:
            more = sock.recv(65536)
            assert more, out
            out += more
    assert closes(wsgi_server, tag, 1) == 1


@pytest.mark.parametrize("request_line", [b"HEAD /large", b"GET /large?304", b"HEAD /generator"])
def test_a_streamed_answer_without_a_body_keeps_an_http10_connection_alive(
    wsgi_server, request_line
):
    """Only a body of unknown length must end an HTTP/1.0 connection: none goes out in
    an answer to HEAD, nor in a 304."""
    with wsgi_server.connect() as sock:
        sock.settimeout(10)
        f = sock.makefile("rb")
        for _ in range(2):
            sock.sendall(request_line + b" HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
            status = f.readline()
            assert status.startswith((b"HTTP/1.0 200 ", b"HTTP/1.0 304 ")), status
            head = b""
            while (line := f.readline()) != b"\r\n":
                head += line
            assert b"Connection: close" not in head, head


def test_a_head_takes_no_more_of_a_body_than_its_headers_need(wsgi_server):
    """An endless body of small rows: a HEAD asks it for its first item (start_response
    may come with it), then closes it, rather than reading on for bytes it drops."""
    tag = uuid.uuid4().hex
    out = raw(
        wsgi_server,
        f"HEAD /rows HTTP/1.1\r\nHost: x\r\nX-Tag: {tag}\r\n\r\n".encode(),
        until_close=False,
    )
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"\r\n\r\n")
    assert closes(wsgi_server, tag, 1) == 1
    assert (
        requests.get(wsgi_server.url + "/yielded", headers={"X-Tag": tag}, timeout=10).text == "1"
    )

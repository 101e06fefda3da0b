"""The WSGI server (`python -m django_comet.evloop`) over real sockets, any WSGI app."""

import signal
import socket
import struct
import time
import uuid

import pytest
import requests

from .processes import evloop, fd_count, raw, read_chunked, read_cut_stream, wait_until


def closes(server, tag: str, expected: int) -> int:
    """How many bodies of requests sent with ``X-Tag: tag`` were closed: once that is
    ``expected``, or after a deadline (a body may be closed just after its response is
    out, from the thread that ran it)."""
    deadline = time.monotonic() + 10
    while True:
        count = int(requests.get(server.url + "/closed", headers={"X-Tag": tag}).content)
        if count >= expected or time.monotonic() > deadline:
            return count
        time.sleep(0.02)


def test_hello_and_environ(wsgi_server):
    response = requests.get(wsgi_server.url + "/hello")
    assert response.status_code == 200
    assert response.text == "Hello, world!"
    env = requests.get(
        wsgi_server.url + "/environ/caf%C3%A9?q=1&r=%20", headers={"X-A": "1"}
    ).json()
    assert env["PATH_INFO"] == "/environ/caf\u00c3\u00a9"  # UTF-8 bytes as latin-1 (PEP 3333)
    assert env["QUERY_STRING"] == "q=1&r=%20"
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["SERVER_PORT"] == str(wsgi_server.port)
    assert env["HTTP_X_A"] == "1"
    assert env["wsgi.url_scheme"] == "http"


def test_what_exists_before_serving_is_frozen_out_of_collections(wsgi_server):
    figures = requests.get(wsgi_server.url + "/gc").json()
    assert figures["frozen"] > 1000  # the app's modules, the server, libevent's binding


def test_keep_alive_reuses_the_connection(wsgi_server):
    with wsgi_server.connect() as sock:
        f = sock.makefile("rb")
        for _ in range(3):
            sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            status = f.readline()
            assert status == b"HTTP/1.1 200 OK\r\n"
            length = None
            while (line := f.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert f.read(length) == b"Hello, world!"


def test_a_process_a_view_starts_can_be_stopped(wsgi_server):
    """It inherits the signal mask of the view's thread: one that blocked the stop
    signals (left to the main thread) made every child ignore SIGTERM."""
    answer = requests.get(wsgi_server.url + "/child-terminated", timeout=30)
    assert answer.text == str(-signal.SIGTERM)


def test_head_has_length_but_no_body(wsgi_server):
    out = raw(wsgi_server, b"HEAD /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"Content-Length: 13" in head
    assert body == b""


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


def assert_clean_hellos(sock, f):
    """Two hellos on ``sock``: each exactly itself, no stray byte of an earlier body."""
    for _ in range(2):
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert f.readline() == b"HTTP/1.1 200 OK\r\n"
        while f.readline() != b"\r\n":
            pass
        assert f.read(13) == b"Hello, world!"


def test_a_1xx_final_status_is_a_500_and_nothing_of_its_body_goes_out(wsgi_server):
    with wsgi_server.connect() as sock:
        sock.settimeout(10)
        f = sock.makefile("rb")
        sock.sendall(b"GET /large?199 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert f.readline().startswith(b"HTTP/1.1 500 ")
        length = 0
        while (line := f.readline()) != b"\r\n":
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        f.read(length)
        assert_clean_hellos(sock, f)
    assert wsgi_server.logged("1xx is not a final status")


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


def test_a_stream_longer_than_its_length_is_cut_there_and_closed(wsgi_server):
    with wsgi_server.connect() as sock:
        sock.settimeout(10)
        sock.sendall(
            b"GET /overlong HTTP/1.1\r\nHost: x\r\n\r\nGET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        out = b""
        while more := sock.recv(65536):
            out += more
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"Content-Length: 10" in head
    assert body == b"o" * 10  # and then the connection closed: no stray bytes, no hello
    assert wsgi_server.logged("runs past its Content-Length")


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


def test_the_access_log_escapes_what_would_forge_its_fields(wsgi_server):
    """A quote in the request-target (nginx passes one on) ended the quoted field early,
    so that a client could write the rest of its own log line.  A byte over 0x7f is
    refused (raw UTF-8 reached the app), and told escaped."""
    raw(wsgi_server, b'GET /hello?a"b\\c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
    assert wsgi_server.logged('"GET /hello?a\\"b\\\\c HTTP/1.1" 200')
    out = raw(wsgi_server, "GET /hello?q=café HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 400 "), out
    assert b"percent-encode" in out, out
    assert wsgi_server.logged('"GET /hello?q=caf\\xc3\\xa9" 400 - (refused)')
    # Cut once escaped: 300 such bytes were 800 characters before the "...".
    tag = uuid.uuid4().hex
    raw(wsgi_server, b"GET /%s%s HTTP/1.1\r\nHost: x\r\n\r\n" % (tag.encode(), b"\xff" * 300))
    assert wsgi_server.logged(f'"GET /{tag}\\xff')
    line = next(line for line in wsgi_server.output if f"/{tag}" in line)
    assert len(line.partition('"GET ')[2].partition('" 400')[0]) == 200 + len("...")


def test_a_requests_access_line_comes_after_what_it_wrote_to_wsgi_errors(wsgi_server):
    """wsgi.errors had a writer thread of its own: the access line of a request could
    come before the end of the traceback the app wrote there."""
    tags = [uuid.uuid4().hex for _ in range(50)]
    for tag in tags:
        assert requests.get(f"{wsgi_server.url}/traceback?{tag}", timeout=10).status_code == 200
    for tag in tags:
        assert wsgi_server.logged(f"/traceback?{tag} HTTP/1.1")
    output = list(wsgi_server.output)
    for tag in tags:
        text = output.index(f"ValueError: {tag}\n")
        access = next(i for i, line in enumerate(output) if f"/traceback?{tag} " in line)
        assert text < access, output[text - 1 : access + 2]


def test_close_is_always_called(wsgi_server):
    tag = uuid.uuid4().hex
    requests.get(wsgi_server.url + "/close-counter", headers={"X-Tag": tag})
    assert closes(wsgi_server, tag, 1) == 1


def test_exception_before_start_response_is_500_and_server_lives(wsgi_server):
    response = requests.get(wsgi_server.url + "/raise-before")
    assert response.status_code == 500
    assert requests.get(wsgi_server.url + "/hello").status_code == 200
    assert wsgi_server.logged("before start_response")


def test_exception_after_headers_cuts_the_stream(wsgi_server):
    with wsgi_server.connect() as sock:
        sock.sendall(b"GET /raise-after HTTP/1.1\r\nHost: x\r\n\r\n")
        _, data = read_cut_stream(sock)
        assert data and data == b"x" * len(data)  # what it could of the first part
    assert requests.get(wsgi_server.url + "/hello").status_code == 200


def test_app_contract_violations_become_500(wsgi_server):
    for path in ("/bad-header", "/bad-status", "/no-start"):
        out = raw(
            wsgi_server, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        assert out.startswith(b"HTTP/1.1 500 "), (path, out)
        assert b"pwned" not in out


def test_exc_info_replaces_unsent_headers(wsgi_server):
    response = requests.get(wsgi_server.url + "/exc-info")
    assert response.status_code == 503
    assert response.content == b"replaced"


def test_short_content_length_closes_the_connection(wsgi_server):
    out = raw(wsgi_server, b"GET /short-length HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"Connection: close" in head
    assert body == b"12345"


def test_large_lazy_body_is_streamed_chunked(wsgi_server):
    with wsgi_server.connect() as sock:
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        _, chunks = read_chunked(sock)
    assert b"".join(chunks) == b"0" * 200_000 + b"1" * 200_000 + b"2" * 200_000


def test_http10_gets_http10_semantics(wsgi_server):
    out = raw(wsgi_server, b"GET /hello HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.0 200 OK")
    assert out.endswith(b"Hello, world!")


@pytest.mark.parametrize("leaving", ["close", "reset"])
def test_client_vanishing_before_the_answer_costs_nothing(leaving):
    """Clients that leave while their views run (closing, or gone with a reset): once
    the views are done, the server holds no descriptor more than before."""
    server = evloop("tests.fixtureapps.apps:dispatch", "--threads", "32")  # (all wait at once)
    try:
        assert requests.get(server.url + "/hello", timeout=10).status_code == 200
        before = fd_count(server.proc.pid)
        tag = uuid.uuid4().hex.encode()
        for _ in range(20):
            sock = server.connect()
            sock.sendall(b"GET /wait-for-release HTTP/1.1\r\nHost: x\r\nX-Tag: %b\r\n\r\n" % tag)
            if leaving == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        released = requests.get(server.url + "/release", headers={"X-Tag": tag}, timeout=10)
        assert released.status_code == 200
        assert requests.get(server.url + "/hello", timeout=10).status_code == 200
        wait_until(lambda: fd_count(server.proc.pid) <= before)
    finally:
        assert server.stop() == 0, "".join(server.output)


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


def test_a_204_goes_out_without_length_or_body(wsgi_server):
    with wsgi_server.connect() as sock:
        for _ in range(2):  # and the connection serves the next request as it should
            sock.sendall(b"GET /no-content HTTP/1.1\r\nHost: x\r\n\r\n")
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += sock.recv(1)
            assert head.startswith(b"HTTP/1.1 204 ")
            assert b"content-length" not in head.lower()
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")  # no "hello" before it


@pytest.mark.parametrize(
    "headers",
    [
        b"Connection: TE, close\r\n",
        b"Connection: TE\r\nConnection: close\r\n",
        b"Connection:\tclose\r\n",  # evhttp strips spaces only: it saw "\tclose"
    ],
)
def test_close_among_connection_options_closes(wsgi_server, headers):
    with wsgi_server.connect() as sock:
        request = b"GET /hello HTTP/1.1\r\nHost: x\r\n" + headers + b"TE: trailers\r\n\r\n"
        sock.sendall(request + b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")  # never answered
        answer = b"".join(iter(lambda: sock.recv(65536), b""))  # a hang fails: it must close
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"Hello, world!")
    assert answer.count(b"HTTP/1.1") == 1 and b"\r\nConnection: close\r\n" in answer


@pytest.mark.parametrize(
    "value, closes", [("close", True), ("Foo,%20Close", True), ("keep-alive", False)]
)
def test_an_apps_close_among_connection_options_closes(wsgi_server, value, closes):
    """An app's "Connection: close", among other options too, ends the connection
    after its answer: a request sent behind it is never answered."""
    with wsgi_server.connect() as sock:
        sock.sendall(
            b"GET /app-close?%s HTTP/1.1\r\nHost: x\r\n\r\n" % value.encode()
            + b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        answers = b"".join(iter(lambda: sock.recv(65536), b""))  # a hang fails: it must close
    assert answers.startswith(b"HTTP/1.1 200 OK")
    assert answers.count(b"HTTP/1.1 200 OK") == (1 if closes else 2), answers


@pytest.mark.parametrize("version", [b"1.0", b"1.1"])
def test_every_answer_is_dated_once(wsgi_server, version):
    request = b"GET /hello HTTP/" + version + b"\r\nHost: x\r\nConnection: close\r\n\r\n"
    head = raw(wsgi_server, request).partition(b"\r\n\r\n")[0]
    assert head.lower().count(b"\r\ndate: ") == 1, head


def body_of(response: bytes) -> bytes:
    """The body of one response read until the connection closed, de-chunked if need be."""
    head, _, rest = response.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in head.lower():
        return rest
    body = b""
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert rest == b"\r\n", "no clean end"
            return body
        body, rest = body + rest[:size], rest[size + 2 :]


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


def test_a_result_whose_attributes_fail_is_a_500_not_a_hang(wsgi_server):
    """Asking the result for its deferral or its close() may raise more than an
    AttributeError (a proxy gone wrong): the client still gets an answer."""
    assert requests.get(wsgi_server.url + "/odd-result", timeout=10).status_code == 500
    assert requests.get(wsgi_server.url + "/hello", timeout=10).status_code == 200


def test_an_http10_answer_keeps_the_apps_date(wsgi_server):
    out = raw(wsgi_server, b"GET /dated HTTP/1.0\r\n\r\n")
    dates = [line for line in out.split(b"\r\n\r\n")[0].split(b"\r\n") if line.startswith(b"Date")]
    assert dates == [b"Date: Tue, 01 Jan 2030 00:00:00 GMT"]


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


@pytest.mark.parametrize("how", ["", "file", "large"])  # whole, by descriptor, streamed
def test_a_205_goes_out_without_content(wsgi_server, how):
    """RFC 9110 15.3.6: a 205 has no content, and says so, whatever the app gave it
    (evhttp knows no 205: a length would have the client read the next answer as it)."""
    out = raw(
        wsgi_server,
        b"GET /reset-content?%s HTTP/1.1\r\nHost: x\r\n\r\n" % how.encode()
        + b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    first, _, rest = out.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 205") and b"Content-Length: 0\r\n" in first + b"\r\n"
    assert rest.startswith(b"HTTP/1.1 200")  # nothing of the 205's body in between
    assert rest.endswith(b"Hello, world!")


def test_a_head_whose_app_gives_no_body_gets_no_invented_length(wsgi_server):
    """RFC 9110 8.6: a HEAD's Content-Length, if any, is what the GET would send; an app
    that gives neither a length nor the body (werkzeug's way) gets none, not a 0."""
    get = raw(wsgi_server, b"GET /head-empty HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"Content-Length: 7\r\n" in get and get.endswith(b"\r\n\r\ncontent")
    head = raw(wsgi_server, b"HEAD /head-empty HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    assert b"Content-Length" not in head


@pytest.mark.parametrize("path", [b"/app-close", b"/short-length"])
def test_an_http10_keep_alive_request_told_to_close_hears_it_once(wsgi_server, path):
    """evhttp adds "Connection: keep-alive" to an HTTP/1.0 answer when the request asked
    for it: beside our "close" the client hears both, and may keep a closed connection."""
    out = raw(wsgi_server, b"GET %s HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" % path)
    head = out.partition(b"\r\n\r\n")[0].lower()
    assert head.count(b"\r\nconnection:") == 1 and b"\r\nconnection: close" in head


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


def test_a_request_refused_before_the_app_has_its_access_log_line(wsgi_server):
    """Refusals of the server's own (a second Host, a control character in the target)
    left no trace in the log: probes and smuggling attempts went unseen (found by a
    security review).  The target is escaped: a terminal's escapes stay text."""
    tag = uuid.uuid4().hex
    out = raw(wsgi_server, f"GET /{tag} HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 400 ")
    assert wsgi_server.logged(f'"GET /{tag}" 400 - (refused)')
    out = raw(wsgi_server, f"GET /{tag}\x1b[2J HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 400 ")
    assert wsgi_server.logged(f'"GET /{tag}\\x1b[2J" 400 - (refused)')

"""The WSGI server (`python -m django_comet.evloop`) over real sockets, any WSGI app:
the exchange, errors, keep-alive and closing (bodies streamed: test_wsgi_streaming.py)."""

import signal
import uuid

import pytest
import requests

from .processes import (
    assert_clean_hellos,
    closes,
    evloop,
    fd_count,
    raw,
    reset_on_close,
    wait_until,
)


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


def test_an_app_changing_the_environ_does_not_trouble_the_server(wsgi_server):
    """PEP 3333 leaves the environ to the app: the server reads nothing back from it at
    the exchange's end (a first version read CONTENT_LENGTH back, and a ValueError
    there left the client without its answer)."""
    url = wsgi_server.url + "/rewrite-content-length?"
    for query in ("junk", "", "-5"):
        answer = requests.post(url + query, data=b"body", timeout=10)
        assert answer.status_code == 200
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
                reset_on_close(sock)
            sock.close()
        released = requests.get(server.url + "/release", headers={"X-Tag": tag}, timeout=10)
        assert released.status_code == 200
        assert requests.get(server.url + "/hello", timeout=10).status_code == 200
        wait_until(lambda: fd_count(server.proc.pid) <= before)
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
    "value, ends", [("close", True), ("Foo,%20Close", True), ("keep-alive", False)]
)
def test_an_apps_close_among_connection_options_closes(wsgi_server, value, ends):
    """An app's "Connection: close", among other options too, ends the connection
    after its answer: a request sent behind it is never answered."""
    with wsgi_server.connect() as sock:
        sock.sendall(
            b"GET /app-close?%s HTTP/1.1\r\nHost: x\r\n\r\n" % value.encode()
            + b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        answers = b"".join(iter(lambda: sock.recv(65536), b""))  # a hang fails: it must close
    assert answers.startswith(b"HTTP/1.1 200 OK")
    assert answers.count(b"HTTP/1.1 200 OK") == (1 if ends else 2), answers


@pytest.mark.parametrize("version", [b"1.0", b"1.1"])
def test_every_answer_is_dated_once(wsgi_server, version):
    request = b"GET /hello HTTP/" + version + b"\r\nHost: x\r\nConnection: close\r\n\r\n"
    head = raw(wsgi_server, request).partition(b"\r\n\r\n")[0]
    assert head.lower().count(b"\r\ndate: ") == 1, head


def test_a_result_whose_attributes_fail_is_a_500_not_a_hang(wsgi_server):
    """Asking the result for its deferral or its close() may raise more than an
    AttributeError (a proxy gone wrong): the client still gets an answer."""
    assert requests.get(wsgi_server.url + "/odd-result", timeout=10).status_code == 500
    assert requests.get(wsgi_server.url + "/hello", timeout=10).status_code == 200


def test_an_http10_answer_keeps_the_apps_date(wsgi_server):
    out = raw(wsgi_server, b"GET /dated HTTP/1.0\r\n\r\n")
    dates = [line for line in out.split(b"\r\n\r\n")[0].split(b"\r\n") if line.startswith(b"Date")]
    assert dates == [b"Date: Tue, 01 Jan 2030 00:00:00 GMT"]


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


@pytest.mark.parametrize("path", ["/stream", "/generator"])
def test_a_head_of_a_chunked_answer_says_so_and_keeps_the_connection(wsgi_server, path):
    """RFC 9110 9.3.2: a HEAD gets the header fields a GET would, its framing too (RFC
    9112 6.1 allows Transfer-Encoding there): with none, Node's http client closed its
    keep-alive connection after the answer (found by a review of HTTP clients)."""
    out = raw(
        wsgi_server,
        b"HEAD %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode()
        + b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    head, _, rest = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"\r\nTransfer-Encoding: chunked" in head
    assert b"Content-Length" not in head
    assert rest.startswith(b"HTTP/1.1 200")  # no body in between
    assert rest.endswith(b"Hello, world!")
    http10 = raw(wsgi_server, b"HEAD %s HTTP/1.0\r\nHost: x\r\n\r\n" % path.encode())
    assert b"Transfer-Encoding" not in http10  # (HTTP/1.0 knows no chunked coding)


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

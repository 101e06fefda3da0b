"""PEP 3333's write() callable through a real server: the head goes out at the first
call, and each call's bytes while the app goes on, at its client's pace."""

import socket
import uuid

import pytest
import requests

from .processes import closes, evloop, raw, read_chunk, read_head, wait_until


def test_write_callable_and_generator(wsgi_server):
    assert requests.get(wsgi_server.url + "/write").content == b"written;returned"
    assert requests.get(wsgi_server.url + "/generator").content == b"ab"


def send_tagged(sock: socket.socket, target: str, tag: str) -> None:
    """A GET of ``target`` whose X-Tag names what the app records of it."""
    sock.sendall(
        b"GET %s HTTP/1.1\r\nHost: x\r\nX-Tag: %s\r\n\r\n" % (target.encode(), tag.encode())
    )


def test_written_bytes_go_out_while_the_app_goes_on(wsgi_server):
    """PEP 3333: write()'s bytes are sent, or buffered for transmission while the app
    proceeds; the head goes out at the first write().  (They waited for the app to
    return.)"""
    tag = uuid.uuid4().hex
    with wsgi_server.connect() as sock:
        sock.settimeout(10)  # a hang fails
        send_tagged(sock, "/write-then-wait", tag)
        f = sock.makefile("rb")
        head = read_head(f)
        assert head.startswith(b"HTTP/1.1 200")
        assert b"transfer-encoding: chunked" in head.lower()
        assert read_chunk(f) == b"early;"  # while the app waits
        requests.get(wsgi_server.url + "/release", headers={"X-Tag": tag})
        assert read_chunk(f) == b"late"
        assert read_chunk(f) is None


def test_write_waits_for_a_slow_client_in_its_own_thread():
    """write() pauses the app while more than the high-water mark is unsent, as a
    streamed body's items do; a spare thread serves meanwhile.  (Everything written
    was kept in memory, and the app never waited.)"""
    server = evloop("tests.fixtureapps.apps:dispatch", "--threads", "1")
    tag = uuid.uuid4().hex
    try:
        with server.connect() as sock:
            send_tagged(sock, "/write-many?64", tag)
            f = sock.makefile("rb")
            assert read_head(f).startswith(b"HTTP/1.1 200")
            # Served by a spare while the writer waits for this client: with the one
            # view thread writing on unpaused, it came after the last write.
            count = requests.get(server.url + "/yielded", headers={"X-Tag": tag}, timeout=10)
            assert int(count.content) < 64
            size = 0
            while (chunk := read_chunk(f)) is not None:
                size += len(chunk)
        assert size == 64 * 1024 * 1024
    finally:
        server.stop()


def test_an_error_after_write_cuts_the_response(wsgi_server):
    """Once write() has sent the head, start_response(exc_info) re-raises (PEP 3333)
    and the client sees the response cut, not an error page after it."""
    out = raw(wsgi_server, b"GET /write-then-fail HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body.startswith(b"8\r\npartial;\r\n")
    assert not body.endswith(b"0\r\n\r\n")
    assert requests.get(wsgi_server.url + "/hello").status_code == 200


def test_write_raises_once_the_client_is_gone():
    """An app writing for ever stops when its client leaves: write() raises.  (With
    --threads 0, such an app never gives the loop thread back: see the README.)"""
    server = evloop("tests.fixtureapps.apps:dispatch", "--threads", "2")
    tag = uuid.uuid4().hex
    try:
        with server.connect() as sock:
            send_tagged(sock, "/write-forever", tag)
            assert sock.recv(12) == b"HTTP/1.1 200"

        def ended():
            return requests.get(server.url + "/write-ended", headers={"X-Tag": tag}).content

        wait_until(lambda: ended() == b"ClientGone")
    finally:
        server.stop()


def test_an_app_that_writes_on_past_clientgone_ends_cleanly():
    """write() past the Content-Length: the bytes are cut there, and once the response
    is over write() raises; an app that catches it and returns normally must not end
    the response twice (the loop thread's _end failed on it)."""
    server = evloop("tests.fixtureapps.apps:dispatch", "--threads", "2")
    tag = uuid.uuid4().hex
    try:
        with server.connect() as sock:
            send_tagged(sock, "/write-past-length", tag)
            f = sock.makefile("rb")
            assert b"Content-Length: 10\r\n" in read_head(f)
            assert f.read() == b"x" * 10  # and the connection closes
        assert closes(server, tag, 1) == 1
        assert requests.get(server.url + "/write-ended", headers={"X-Tag": tag}).content == (
            b"ClientGone"
        )
        # (The loop ran the worker's hand-overs before it answered these; its error log
        # comes before this request's line.)
        assert requests.get(server.url + "/hello").status_code == 200
        assert server.logged('"GET /hello HTTP/1.1" 200')
        assert "Unhandled error" not in "".join(server.output)
    finally:
        server.stop()


@pytest.mark.parametrize("server_name", ["wsgi_server", "wsgi_inline"])
def test_write_from_another_thread_is_refused(request, server_name):
    """Its bytes would race the app's own, and with --threads 0 reach libevent from
    outside the loop thread."""
    server = request.getfixturevalue(server_name)
    tag = uuid.uuid4().hex
    response = requests.get(server.url + "/write-from-thread", headers={"X-Tag": tag})
    assert response.content == b"mine"
    assert requests.get(server.url + "/write-ended", headers={"X-Tag": tag}).content == (
        b"AppError"
    )


def test_a_written_head_answers_head_without_a_body(wsgi_server):
    out = raw(
        wsgi_server,
        b"HEAD /write HTTP/1.1\r\nHost: x\r\n\r\n"
        + b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    first, _, rest = out.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200")
    assert rest.startswith(b"HTTP/1.1 200") and rest.endswith(b"Hello, world!")


@pytest.mark.parametrize("threads", ["0", "2"])
def test_write_while_a_body_streams_keeps_its_place(threads):
    server = evloop("tests.fixtureapps.apps:dispatch", "--threads", threads)
    try:
        body = requests.get(server.url + "/write-streaming", timeout=10).content
        assert body == b"A;" + b"x" * 300_000 + b"MID;y" + b"END;"
    finally:
        server.stop()

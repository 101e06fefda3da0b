"""Listening on a Unix socket (unix:PATH), as behind a local reverse proxy."""

import json
import os
import signal
import socket
import stat

import pytest

from django_comet.evloop.listen import unix_peers_supported

from .processes import evloop, manage, read_chunked, runcomet

pytestmark = pytest.mark.skipif(
    not unix_peers_supported(), reason="this C library cannot name a Unix-socket peer"
)


def request(sock: socket.socket, target: str, *extra: str) -> tuple[bytes, bytes]:
    """One keep-alive GET with a Content-Length answer: (head, body)."""
    lines = [f"GET {target} HTTP/1.1", "Host: localhost", *extra, "", ""]
    sock.sendall("\r\n".join(lines).encode())
    f = sock.makefile("rb")
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = f.readline()
        assert line, head
        head += line
    length = next(
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    return head, f.read(length)


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "comet.sock")


def test_runcomet_serves_django_and_a_staged_response_on_a_unix_socket(demo_db, sock_path):
    server = runcomet(db=demo_db, addrport=f"unix:{sock_path}")
    try:
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
        # Open to all who reach it (a proxy of another user's): the directory decides.
        assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o666
        with server.connect() as sock:
            head, body = request(sock, "/t/echo/?x=1")
            assert head.startswith(b"HTTP/1.1 200 OK"), head
            echoed = json.loads(body)
            assert echoed["GET"] == {"x": "1"}
            assert echoed["remote_addr"] == "127.0.0.1"  # a local process, not "localhost"
            head, body = request(sock, "/t/echo/")  # the same connection, kept alive
            assert head.startswith(b"HTTP/1.1 200 OK"), head
        with server.connect() as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            _, chunks = read_chunked(sock)
        assert b"last_stage4" in b"".join(chunks)
        assert server.wait_for_status(lambda s: s["held"] == 0)["held"] == 0
    finally:
        assert server.stop() == 0, "".join(server.output)
    assert not os.path.exists(sock_path), "the socket file outlived the server"


def test_the_socket_file_is_removed_under_the_autoreloader_too(demo_db, sock_path):
    """There the server runs in a daemon thread, which a stop signal ends with the
    process: the file is removed on the way out all the same."""
    import psutil

    server = runcomet(db=demo_db, addrport=f"unix:{sock_path}", reload=True)
    try:
        assert os.path.exists(sock_path)
        (child,) = psutil.Process(server.proc.pid).children()  # the reloader's server
        child.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
    finally:
        server.stop()
    assert not os.path.exists(sock_path), "the socket file outlived the server"


def test_a_stale_socket_file_is_replaced(demo_db, sock_path):
    left = socket.socket(socket.AF_UNIX)
    left.bind(sock_path)
    left.close()  # its file stays, with nothing accepting on it
    server = runcomet(db=demo_db, addrport=f"unix:{sock_path}")
    try:
        with server.connect() as sock:
            head, _ = request(sock, "/t/echo/")
        assert head.startswith(b"HTTP/1.1 200 OK"), head
    finally:
        assert server.stop() == 0, "".join(server.output)


@pytest.mark.parametrize("launch", ["runcomet", "evloop"])
def test_a_socket_made_accessible_with_chmod_is_still_removed(demo_db, sock_path, launch):
    """Opening the socket to a proxy's group (chmod) changes its change time: the file
    is still this server's to remove when it stops."""
    if launch == "runcomet":
        server = runcomet(db=demo_db, addrport=f"unix:{sock_path}")
    else:
        server = evloop("tests.fixtureapps.apps:app", addrport=f"unix:{sock_path}")
    try:
        os.chmod(sock_path, 0o660)
    finally:
        assert server.stop() == 0, "".join(server.output)
    assert not os.path.exists(sock_path), "the socket file outlived the server"


def test_a_live_socket_is_refused_in_one_line_and_left_alone(sock_path):
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(sock_path)
        live.listen()
        result = manage("runcomet", "--noreload", "--skip-checks", f"unix:{sock_path}")
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [
            f"CommandError: Cannot listen on unix:{sock_path}: a server is listening on it"
        ]
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)


def test_a_file_that_is_not_a_socket_is_never_removed(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    result = manage("runcomet", "--noreload", "--skip-checks", f"unix:{path}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"CommandError: Cannot listen on unix:{path}: it exists and is not a socket"
    ]
    assert path.read_text() == "keep me"


def test_unix_without_a_path_is_refused():
    result = manage("runcomet", "--noreload", "--skip-checks", "unix:")
    assert result.returncode == 1
    assert "unix: needs a path" in result.stderr
    assert "Traceback" not in result.stderr


def test_any_wsgi_app_on_a_unix_socket(sock_path):
    server = evloop("tests.fixtureapps.apps:dispatch", addrport=f"unix:{sock_path}")
    try:
        with server.connect() as sock:
            sock.sendall(b"GET /environ HTTP/1.0\r\n\r\n")  # no Host: SERVER_NAME stands in
            response = b"".join(iter(lambda: sock.recv(65536), b""))
        environ = json.loads(response.partition(b"\r\n\r\n")[2])
        assert (environ["REMOTE_ADDR"], environ["SERVER_NAME"]) == ("127.0.0.1", "localhost")
        assert environ["SERVER_PORT"] == "0"
        server.signal(signal.SIGTERM)
        assert server.proc.wait(15) == 0
    finally:
        server.stop()
    assert not os.path.exists(sock_path)


def test_a_stopping_server_leaves_its_successors_socket_alone(demo_db, sock_path):
    """A rolling restart: the old server drains a slow request while a new one binds
    the same path; the old one's exit must not remove the new one's socket file."""
    old = runcomet(db=demo_db, addrport=f"unix:{sock_path}")
    try:
        slow = old.connect()
        slow.sendall(b"GET /t/sleep/?s=4 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        old.wait_for_status(lambda s: s["in_flight"] >= 2)
        old.signal(signal.SIGTERM)
        old.wait_until_refused()  # draining: its socket file is stale, the new one replaces it
        assert old.proc.poll() is None
        new = runcomet(db=demo_db, addrport=f"unix:{sock_path}")
        try:
            assert b"slept" in b"".join(iter(lambda: slow.recv(65536), b""))
            assert old.proc.wait(20) == 0
            with new.connect() as sock:  # the new server's file is still there
                head, _ = request(sock, "/t/echo/")
            assert head.startswith(b"HTTP/1.1 200 OK"), head
        finally:
            assert new.stop() == 0, "".join(new.output)
        slow.close()
    finally:
        old.stop()

"""A process forked from a view (multiprocessing's fork, os.fork) closes the server's
sockets first thing: it must keep neither the port nor a client's connection.  One that
keeps copies of every descriptor anyway (made before the fork), as pre-forked siblings
keep the listening socket: a socket the server closes then stays open in the copy, and
the server must not go on hearing of it (with epoll's changelist, one closed before its
removal reached epoll stayed in epoll, and the loop spun at 100% CPU for as long as the
copy lived)."""

import contextlib
import os
import signal

import pytest
import requests

from .processes import closed_but_watched, reset_on_close, runcomet, wait_until
from .sse_client import SSEClient


@pytest.fixture
def holder():
    """``holder(server)``: fork a child of the server that keeps its descriptors (killed
    after the test); returns its pid."""
    pids = []

    def fork(server) -> int:
        pid = int(requests.get(server.url + "/t/fork-holder/", timeout=10).text)
        pids.append(pid)
        return pid

    yield fork
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def assert_nothing_closed_is_watched(server) -> None:
    """What made the loop spin: a socket the server closed, still in its epoll instance
    (the forked copy keeps it open, so epoll keeps reporting it).  Awaited: the removal
    of one just closed reaches epoll at the next pass."""
    pid = server.proc.pid
    try:
        wait_until(lambda: not closed_but_watched(pid), timeout=10)
    except AssertionError:
        raise AssertionError(f"closed but watched: {closed_but_watched(pid)}") from None


def reset(stream: SSEClient) -> None:
    """Close with a reset, as a client that vanishes does."""
    reset_on_close(stream.sock)
    stream.close()


def test_a_stream_whose_client_left_is_forgotten(demo_db, holder):
    server = runcomet(db=demo_db)
    try:
        stream = SSEClient(server, "/t/stream/?channels=forked")
        server.wait_for_status(lambda s: s["channels"].get("forked") == 1)
        holder(server)
        reset(stream)
        server.wait_for_status(lambda s: s["held"] == 0 and "forked" not in s["channels"])
        assert_nothing_closed_is_watched(server)
    finally:
        assert server.stop() == 0


def test_connections_that_close_while_the_loop_is_busy_are_forgotten(demo_db, holder, tmp_path):
    """With --threads 0 a slow view holds the loop: the connections that close meanwhile
    are freed in the pass that follows, the one in which the overdue sweep runs too."""
    server = runcomet("--threads", "0", db=demo_db)
    try:
        idle = []
        for _ in range(20):  # keep-alive connections, each after one exchange
            sock = server.connect()
            sock.sendall(b"GET /t/echo/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            idle.append(sock)
        holder(server)
        started = tmp_path / "started"
        slow = server.connect()
        slow.sendall(
            f"GET /t/sleep/?s=1.5&started={started} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        )
        wait_until(started.exists)  # the loop is in the view now
        for sock in idle:
            sock.close()
        assert b"slept" in slow.recv(65536)
        server.wait_for_status(lambda s: s["connections"] <= 2)
        assert_nothing_closed_is_watched(server)
    finally:
        assert server.stop() == 0


def test_a_drain_forgets_the_listening_socket_another_process_keeps(demo_db, holder):
    """Pre-forked siblings (here a forked child) keep the listening socket open after a
    draining server closes its descriptor; connections queue on it, never accepted."""
    server = runcomet(db=demo_db)
    try:
        holder(server)
        slow = server.connect()  # keeps the drain going
        slow.sendall(b"GET /t/sleep/?s=6 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        server.wait_for_status(lambda s: s["in_flight"] >= 2)
        probe = server.connect()
        server.signal(signal.SIGTERM)
        # An answer that closes its connection: the drain has begun.
        probe.sendall(b"GET /t/echo/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert b"Connection: close" in probe.recv(65536)
        probe.close()
        queued = [server.connect() for _ in range(3)]
        assert_nothing_closed_is_watched(server)
        assert b"slept" in b"".join(iter(lambda: slow.recv(65536), b""))
        assert server.proc.wait(20) == 0
        for sock in queued:
            sock.close()
    finally:
        server.stop()


def test_a_child_forked_by_a_view_keeps_neither_the_port_nor_the_connection(demo_db):
    """A view starting a daemon with os.fork: the client reads its answer to the end
    (the child kept the connection open after the server closed it), and once the server
    stops, another starts on its port (the child kept the port: "already in use")."""
    server = runcomet(db=demo_db)
    port = server.port
    children = []
    try:
        with server.connect() as sock:
            sock.settimeout(20)
            sock.sendall(
                b"GET /t/fork-child/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            )
            answer = b"".join(iter(lambda: sock.recv(65536), b""))  # to its end
        children.append(int(answer.split(b"\r\n\r\n", 1)[1]))
        assert server.stop() == 0
        again = runcomet(db=demo_db, addrport=f"127.0.0.1:{port}")
        try:
            assert requests.get(again.url + "/t/echo/", timeout=10).status_code == 200
        finally:
            assert again.stop() == 0
    finally:
        server.stop()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

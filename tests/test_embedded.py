"""The server embedded in another program: ``Server(app).serve_forever()`` on a thread."""

import os
import socket
import threading

from django_comet.evloop.admission import VIEW_BACKLOG_HIGH
from django_comet.evloop.config import ServerConfig
from django_comet.evloop.loop import Loop
from django_comet.evloop.server import Server

from .processes import wait_until


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


def open_fds():
    """Descriptor -> what it is (listing the directory opens one more, gone at once)."""
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return fds


def test_a_stopped_server_leaves_no_descriptor_open():
    """Its socket, its loop's event base and wake-up pipe: a program that starts and
    stops servers must not run out of descriptors.  A thread that calls into the
    stopped loop late writes nowhere."""
    before = open_fds()
    server = Server(hello, ServerConfig(port=0, threads=2, access_log=False))
    serving = threading.Thread(target=server.serve_forever, kwargs={"handle_signals": False})
    serving.start()
    try:
        with socket.create_connection(("127.0.0.1", server.address[1]), timeout=10) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = client.makefile("rb").read()
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\nhello")
    finally:
        server.loop.call_soon_threadsafe(server.shutdown)
        serving.join(30)
    assert not serving.is_alive()
    assert {fd: what for fd, what in open_fds().items() if fd not in before} == {}
    server.loop.call_soon_threadsafe(print)  # late: no write to a reused descriptor


def test_requests_still_waiting_for_a_thread_when_a_stop_is_cut_run_no_view():
    """A stop cut short (a second signal, the grace period over) gives up on every
    response: a request still queued for a view thread must not run its view (a POST's
    work done for no one) while the pool's threads finish."""
    ran = []
    release = threading.Event()

    def app(environ, start_response):
        ran.append(environ["PATH_INFO"])
        if environ["PATH_INFO"] == "/busy":
            release.wait(30)
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    server = Server(app, ServerConfig(port=0, threads=1, access_log=False))
    serving = threading.Thread(target=server.serve_forever, kwargs={"handle_signals": False})
    serving.start()
    clients = []
    try:
        for path, arrived in (
            (b"/busy", lambda: ran == ["/busy"]),  # the one view thread, until released
            (b"/queued", lambda: server._pool.backlog == 1),
        ):
            client = socket.create_connection(("127.0.0.1", server.address[1]), timeout=10)
            client.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            clients.append(client)
            wait_until(arrived)
        shutdown = server._pool.shutdown

        def released_then_shutdown(timeout=None):  # the server has given up on both now
            release.set()  # the busy view ends: its thread takes the queued call next
            shutdown(timeout)

        server._pool.shutdown = released_then_shutdown
        server.loop.call_soon_threadsafe(server.shutdown)
        server.loop.call_soon_threadsafe(server.shutdown)  # a second stop: cut the drain
        serving.join(30)
    finally:
        release.set()
        for client in clients:
            client.close()
    assert not serving.is_alive()
    assert ran == ["/busy"]


def on_the_programs_loop():
    """A server on a loop of the program's, with one view thread, whose views wait for
    ``release`` to be set: (loop, server, release)."""
    release = threading.Event()

    def app(environ, start_response):
        release.wait(30)
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    loop = Loop()
    server = Server(app, ServerConfig(port=0, threads=1, access_log=False), loop=loop)
    return loop, server, release


def test_a_drain_cut_short_leaves_nothing_on_the_programs_own_loop():
    """Server(app, loop=...): the program's loop goes on after the server; the drain's
    next look, left on it, stopped the program's next run at once."""
    loop, server, release = on_the_programs_loop()
    with socket.create_connection(("127.0.0.1", server.address[1]), timeout=10) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # in flight: the drain waits
        loop.call_later(0.01, server.shutdown)  # (timers: run once the loop runs)

        def cut_short():  # a second stop: "closing now"; the view may end from then on
            server.shutdown()
            release.set()

        loop.call_later(0.02, cut_short)
        server.serve_forever(handle_signals=False)
    assert loop.pending_handles == 1  # the wake-up pipe's watcher, the loop's own
    loop.close()


def test_a_stop_during_a_backlog_pause_leaves_nothing_on_the_programs_own_loop():
    """The check that resumes accepting once the views caught up went on re-arming
    itself every 5 ms on the program's loop after the server had closed."""
    loop, server, release = on_the_programs_loop()
    clients = []

    def connect_many():
        for _ in range(VIEW_BACKLOG_HIGH + 10):
            client = socket.create_connection(("127.0.0.1", server.address[1]), timeout=10)
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            clients.append(client)

    connecting = threading.Thread(target=connect_many)
    connecting.start()

    def stop_once_paused():
        if server.backlog_pauses == 0:
            loop.call_later(0.01, stop_once_paused)
            return
        server.shutdown()
        server.shutdown()  # cut short: the views' backlog is still there

    loop.call_later(0.01, stop_once_paused)
    try:
        server.serve_forever(handle_signals=False)
        assert server.backlog_pauses == 1
        assert loop.pending_handles == 1  # the wake-up pipe's watcher, the loop's own
    finally:
        release.set()
        connecting.join()
        for client in clients:
            client.close()
        loop.close()

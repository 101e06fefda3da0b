"""The server embedded in another program: ``Server(app).serve_forever()`` on a thread."""

import os
import socket
import threading

from django_comet.evloop.config import ServerConfig
from django_comet.evloop.server import Server


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

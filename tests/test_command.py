"""runcomet: argument parsing, startup errors, graceful stop."""

import signal
import socket
import threading
from io import StringIO

import pytest
import requests
from django.core.management import call_command

from django_comet.management.commands.runcomet import Command

from .processes import manage, runcomet


def parsed(*args):
    cmd = Command(stdout=StringIO(), stderr=StringIO())
    cmd.run = lambda **options: None  # test shim: parse only
    call_command(cmd, *args)
    return cmd


@pytest.mark.parametrize(
    "args, addr, port, ipv6",
    [
        ((), "127.0.0.1", "8000", False),
        (("8001",), "127.0.0.1", "8001", False),
        (("0.0.0.0:8002",), "0.0.0.0", "8002", False),
        (("[::1]:8003",), "::1", "8003", True),
        (("localhost:8004",), "localhost", "8004", False),
    ],
)
def test_addrport_forms(args, addr, port, ipv6):
    cmd = parsed(*args)
    assert (cmd.addr, cmd.port, cmd.use_ipv6) == (addr, port, ipv6)


def test_threads_option():
    cmd = parsed("--threads", "3")
    assert cmd.server_config(threads=3, use_threading=True).threads == 3
    assert cmd.server_config(threads=None, use_threading=False).threads == 0


def test_bad_address_is_one_line():
    result = manage("runcomet", "--noreload", "not an address")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        'CommandError: "not an address" is not a valid port number or address:port pair.'
    ]


def test_port_in_use_is_one_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = manage("runcomet", "--noreload", "--skip-checks", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "CommandError: That port is already in use."
    assert "Traceback" not in result.stderr


def test_missing_libevent_is_a_system_check_error():
    result = manage("check", env={"COMET_LIBEVENT": "/nonexistent/libevent.so"})
    assert result.returncode == 1
    assert "django_comet.E001" in result.stderr
    assert "/nonexistent/libevent.so" in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_in_flight_requests_and_exits_0(demo_db, signum):
    server = runcomet(db=demo_db)
    try:
        result = {}

        def slow():
            result["response"] = requests.get(server.url + "/t/sleep/?s=1.5")

        thread = threading.Thread(target=slow)
        thread.start()
        server.wait_for_status(lambda s: s["in_flight"] >= 2)
        staged = server.connect()
        staged.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        server.wait_for_status(lambda s: s["held"] == 1)
        server.signal(signum)
        thread.join()
        assert result["response"].status_code == 200
        assert result["response"].text == "slept"
        data = b""
        while more := staged.recv(4096):
            data += more
        staged.close()
        assert data.endswith(b"\r\n0\r\n\r\n")  # the held response ended with a last chunk
        assert server.proc.wait(20) == 0
    finally:
        server.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url + "/t/echo/", timeout=2)

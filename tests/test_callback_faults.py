"""Errors in the server's own callbacks from C (a bug of ours, a logging filter that
raises, MemoryError): raised into C, ctypes printed them and dropped them, halfway
through, and one that returns a pointer crashed the process.  They are logged as the
server's errors now, and the server goes on serving (found by a review of the binding)."""

import signal
import subprocess
import sys
import textwrap

import pytest
import requests

from .processes import ROOT, evloop, read_until_closed

CALLBACK_ERROR = "Unhandled error in event loop callback"


@pytest.mark.parametrize(
    ("fault", "threads", "logged"),
    [
        # Inside evhttp's callback for a new connection, which returns its bufferevent.
        ("Server._accepted_for_the_loop", "0", CALLBACK_ERROR),
        # Inside the request callback, before the exchange is tracked: a 500.
        ("ConnectionGuard.request_arrived", "8", "Error reading a request"),
    ],
    ids=["new-connection", "request"],
)
def test_an_error_in_a_callback_from_c_is_logged_and_the_server_goes_on(fault, threads, logged):
    server = evloop(
        "tests.fixtureapps.faults:app", "--threads", threads, env={"TEST_FAULTS": fault}
    )
    try:
        with requests.Session() as session:
            first = session.get(server.url + "/", timeout=10)
            assert first.status_code == (500 if fault.endswith("request_arrived") else 200)
            for _ in range(3):  # and on the same connection
                answer = session.get(server.url + "/", timeout=10)
                assert answer.status_code == 200 and answer.content == b"Hello, world!"
        assert server.logged(logged)
        output = "".join(server.output)
        assert f"RuntimeError: injected fault in {fault}" in output, output
        assert "Exception ignored" not in output, output  # (ctypes' word for it)
    finally:
        assert server.stop() == 0, "".join(server.output)


EMBEDDED = textwrap.dedent(
    """
    import sys
    from django_comet.evloop.config import ServerConfig
    from django_comet.evloop.server import Server
    from tests.fixtureapps.apps import hello

    server = Server(hello, ServerConfig(port=0, access_log=False))
    print(server.address[1], flush=True)
    try:
        server.serve_forever(handle_signals=False)
    except KeyboardInterrupt:
        print("KeyboardInterrupt from serve_forever", flush=True)
        sys.exit(3)
    """
)


def test_ctrl_c_stops_a_server_embedded_in_the_main_thread():
    """Python's own SIGINT handler raises KeyboardInterrupt at the next bytecode: in the
    loop thread, the first line of a callback from C, which ctypes printed and dropped,
    and the server went on serving."""
    proc = subprocess.Popen(
        [sys.executable, "-c", EMBEDDED],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(proc.stdout.readline())
        url = f"http://127.0.0.1:{port}/"
        assert requests.get(url, timeout=10).status_code == 200  # serving, and idle now
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 3, proc.stderr.read()
        assert proc.stdout.read() == "KeyboardInterrupt from serve_forever\n"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()


def test_an_error_logging_a_refusal_still_answers_it():
    """A refused request's access line comes before its answer: an error there (a
    LOGGING filter that raises) left the client with no answer at all, and went to
    ctypes rather than the server's log (found by a diff review)."""
    server = evloop("tests.fixtureapps.faults:app", env={"TEST_FAULTS": "Server._log_refused"})
    try:
        with server.connect() as sock:  # two Host headers: a 400
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
            assert read_until_closed(sock).startswith(b"HTTP/1.1 400 "), "no answer"
        assert server.logged(CALLBACK_ERROR)
        assert "Exception ignored" not in "".join(server.output)
        assert requests.get(server.url + "/", timeout=10).status_code == 200
    finally:
        assert server.stop() == 0, "".join(server.output)

"""Stopping runcomet: signals drain what is in flight, held responses end properly,
and a server whose stdout or stderr nobody reads still stops (--workers: see
test_stopping_workers.py)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from io import StringIO

import pytest
import requests

from django_comet.management.commands.runcomet import Command

from .processes import (
    ROOT,
    ServerProcess,
    evloop,
    get_in_background,
    read_body,
    read_chunked,
    runcomet,
    wait_until,
)
from .publishing import ended_as_its_kind_does, publish
from .sse_client import SSEClient


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["term", "int", "hup"]
)
def test_signal_drains_in_flight_requests_and_exits_0(demo_db, signum):
    server = runcomet(db=demo_db)
    try:
        slow = get_in_background(server.url + "/t/sleep/?s=1.5")
        server.wait_for_status(lambda s: s["in_flight"] >= 2)
        staged = server.connect()
        staged.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        server.wait_for_status(lambda s: s["held"] == 1)
        server.signal(signum)
        assert (slow.result().status_code, slow.result().text) == (200, "slept")
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


@pytest.mark.parametrize("threads", ["8", "0"])
@pytest.mark.parametrize("console", ["", "django_comet.server"], ids=["own-log", "LOGGING"])
def test_the_last_word_of_a_stop_comes_after_what_was_logged(demo_db, threads, console):
    """ "Stopped." went to stdout while the log's own thread had yet to write
    "Stopping: ..." to stderr: with --threads 0, in 5 stops of 6; and where LOGGING gave
    a logger under django_comet a handler, which has a thread of its own (found by
    reviews)."""
    server = runcomet("--threads", threads, db=demo_db, env={"TEST_CONSOLE_LOG": console})
    assert server.stop() == 0
    out = "".join(server.output)  # (stdout and stderr, in the order they were written)
    assert out.index("Stopping: no new connections") < out.index("Stopped.")


@pytest.mark.parametrize("threads", ["8", "0"])
def test_a_server_started_under_nohup_outlives_its_terminal(demo_db, threads):
    """nohup ignores SIGHUP so that the server outlives the terminal (an ssh session
    lost): it is left ignored, as runserver leaves it, and the SIGTERM after it is the
    first stop, not the second."""
    server = runcomet("--threads", threads, db=demo_db, prefix=("nohup",))
    server.signal(signal.SIGHUP)
    server.signal(signal.SIGTERM)
    assert server.stop() == 0
    assert "Stopped.\n" in server.output
    assert not [line for line in server.output if "Second stop request" in line]


@pytest.mark.parametrize("threads", ["8", "0"])
def test_a_second_sigterm_is_the_same_stop(demo_db, threads, tmp_path):
    """GNU timeout sends its SIGTERM to the process, then to its process group: the
    second must not cut the drain the first began (with --threads 0, a view running)."""
    server = runcomet("--threads", threads, db=demo_db)
    try:
        started = tmp_path / "started"
        slow = get_in_background(f"{server.url}/t/sleep/?s=2&started={started}")
        wait_until(started.exists)
        server.signal(signal.SIGTERM)
        if threads != "0":  # (there the loop, which closes the port, runs the view)
            server.wait_until_refused()  # the first was handled
        server.signal(signal.SIGTERM)
        assert slow.result().text == "slept"
        assert server.proc.wait(20) == 0
        assert not [line for line in server.output if "Second stop request" in line]
    finally:
        server.stop()


@pytest.mark.parametrize("threads", ["8", "0"])
def test_a_stop_ends_the_process_while_an_async_view_still_awaits(demo_db, threads, tmp_path):
    """asgiref runs an async view's coroutine in a non-daemon thread, which the
    interpreter's exit joins: past the grace period the process stayed up until the
    view returned, and a second signal found no handler to stop it."""
    server = runcomet("--threads", threads, db=demo_db, env={"TEST_GRACE_PERIOD": "0.5"})
    try:
        started = tmp_path / "started"
        waiting = server.connect()
        waiting.sendall(
            b"GET /t/async-sleep/?s=600&started=%b HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            % str(started).encode()
        )
        wait_until(started.exists)
        server.signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        assert server.logged("Exiting without waiting for 1 thread(s) still running")
        waiting.close()
    finally:
        server.stop()


EMBEDDING_PROGRAM = """
import signal, sys, threading
from django_comet.evloop.__main__ import main

done = threading.Event()

def app(environ, start_response):  # a view that starts a thread of the program's
    threading.Thread(target=done.wait, args=(30,), name="view-started").start()
    start_response("200 OK", [("Content-Length", "7")])
    return [b"started"]

def own(signum, frame):
    print("own handler", flush=True)

signal.signal(signal.SIGHUP, own)
signal.signal(signal.SIGALRM, own)  # and a timer of its own
signal.setitimer(signal.ITIMER_REAL, 100, 100)
threading.Thread(target=done.wait, args=(30,), name="program-worker").start()
main(["__main__:app", "127.0.0.1:0", "--no-access-log", *sys.argv[1:]])
# (one write per line: the server's log writer may still be writing to the same pipe)
print(f"handler back: {signal.getsignal(signal.SIGHUP) is own}", flush=True)
print(f"alarm back: {signal.getsignal(signal.SIGALRM) is own}", flush=True)
print(f"timer back: {signal.getitimer(signal.ITIMER_REAL)[1] == 100}", flush=True)
done.wait(3)  # (the program goes on longer than the exit guard waits)
print("program went on", flush=True)
done.set()
after = threading.Thread(target=threading.Event().wait, args=(3,), name="program-after")
after.start()  # (joined at exit, for longer than the guard waits)
sys.exit(5)
"""


@pytest.mark.parametrize("threads", ["8", "0"])
def test_a_program_that_goes_on_after_its_server_keeps_its_threads(threads):
    """The exit guard acts only as the process exits, and only on threads started while
    the server ran: a program that runs the server in-process and then goes on, with
    threads of its own, is neither ended nor cut, and gets its signal handlers back (a
    first version ended it 2 s after the stop, and took threads started later, or that
    had an ended thread's ident, for the server's: found by diff reviews), SIGALRM and
    its timer too (``--threads 0`` kept them: found by a review of timers)."""
    program = ServerProcess(
        [sys.executable, "-c", EMBEDDING_PROGRAM, "--threads", threads],
        env={"PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    try:
        assert requests.get(program.url + "/", timeout=10).text == "started"
        program.signal(signal.SIGTERM)
        assert program.logged("handler back: True", timeout=30)
        assert program.logged("alarm back: True", timeout=10)
        assert program.logged("timer back: True", timeout=10)
        assert program.logged("program went on", timeout=30)
        assert program.proc.wait(30) == 5
        assert not program.logged("Exiting without waiting", timeout=0)
    finally:
        program.stop()


TICKING_PROGRAM = """
import signal, sys, time
from django_comet.evloop.__main__ import main

def app(environ, start_response):  # a view that holds the loop thread past a tick
    time.sleep(0.6)
    start_response("200 OK", [("Content-Length", "6")])
    return [b"slept;"]

signal.signal(signal.SIGALRM, lambda signum, frame: None)
signal.setitimer(signal.ITIMER_REAL, 0.2, 0.2)
main(["__main__:app", "127.0.0.1:0", "--no-access-log", "--threads", "0"])
print(f"timer back: {signal.getitimer(signal.ITIMER_REAL)[1] == 0.2}", flush=True)
"""


def test_a_programs_own_timer_never_stops_the_server():
    """With --threads 0, SIGALRM is the stop's grace timer; a program's own timer going
    off while a view runs stopped the server at once ("the grace period is over") though
    no stop was asked for (found by the diff review)."""
    program = ServerProcess(
        [sys.executable, "-c", TICKING_PROGRAM], env={"PYTHONPATH": str(ROOT)}, cwd=ROOT
    )
    try:
        assert requests.get(program.url + "/", timeout=10).text == "slept;"
        assert requests.get(program.url + "/", timeout=10).text == "slept;"
        program.signal(signal.SIGTERM)
        assert program.logged("timer back: True", timeout=30)
        assert program.proc.wait(30) == 0
    finally:
        program.stop()


def can_be_pid_1() -> bool:
    """Whether a command can be run as PID 1 of a PID namespace of its own (as a
    container's main process): ``unshare`` needs root, or user namespaces."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    tried = subprocess.run([unshare, "--pid", "--fork", "--mount-proc", "true"], check=False)
    return tried.returncode == 0


def test_as_a_containers_pid_1_a_stop_while_starting_ends_the_start(demo_db):
    """PID 1 ignores a signal left to its default action: a SIGTERM (``docker stop``)
    while Django's checks ran, or while a database did not answer, was lost, and the
    server started anyway, until SIGKILL (found by a review of runcomet in containers)."""
    if not can_be_pid_1():
        pytest.skip("cannot run a process as PID 1 of its own namespace here")
    import psutil

    manage_py = str(ROOT / "demo_site" / "manage.py")
    command = [sys.executable, manage_py, "runcomet", "--noreload", "127.0.0.1:0"]
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", *command],
        env={
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "DEMO_DB": demo_db,
            "TEST_SLOW_CHECK": "60",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # (the check says so, then takes a minute)
            if "slow check running" in line:
                break
        (pid_1,) = psutil.Process(proc.pid).children()
        os.kill(pid_1.pid, signal.SIGTERM)
        assert proc.wait(20) == 0
        assert "Starting comet server" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_stop_signal_repeated_is_the_same_request_unless_it_is_ctrl_c():
    from django_comet.evloop.interrupt import StopRequests

    for signum in (signal.SIGTERM, signal.SIGHUP):
        requests_ = StopRequests()
        assert requests_.new(signum)
        assert not requests_.new(signum)  # the same request again (GNU timeout)
        assert requests_.count == 1
    requests_ = StopRequests()
    assert requests_.new(signal.SIGINT)
    assert requests_.new(signal.SIGINT)  # a second Ctrl-C: now
    for first, second in [(signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGTERM)]:
        requests_ = StopRequests()  # (two signals pending at once arrive lowest first)
        assert requests_.new(first)
        assert requests_.new(second)
        assert requests_.count == 2


def test_a_stop_with_only_held_responses_ends_each_properly(demo_db):
    """Nothing in flight but held responses: each still gets its proper end before the
    process exits (the loop used to stop before their last bytes had left)."""
    server = runcomet(db=demo_db)
    try:
        stream = SSEClient(server, "/t/stream/?channels=stopping")
        staged = server.connect()
        staged.sendall(b"GET /t/quick-stages/?delay=60 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        poll = server.connect()
        poll.sendall(
            b"GET /t/fastpoll/?channel=stopping&timeout=60 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        server.wait_for_status(lambda s: s["held"] == 3)
        server.signal(signal.SIGTERM)
        frames = list(stream.frames())
        assert frames[-1].startswith(b"retry: "), frames
        assert stream.ended  # a last chunk, not a cut
        _, chunks = read_chunked(staged)
        assert chunks == [b"s0;"]
        _, chunks = read_chunked(poll)
        assert json.loads(b"".join(chunks))["events"] == []  # as on a timeout: poll again
        for sock in (stream.sock, staged, poll):
            assert sock.recv(1) == b""  # and each connection closes once its end has left
            sock.close()
        assert server.proc.wait(20) == 0
    finally:
        server.stop()


def test_a_request_during_the_drain_is_served_and_closes_its_connection(demo_db):
    server = runcomet(db=demo_db)
    try:
        with server.connect() as sock:
            sock.sendall(b"GET /t/echo/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")  # kept alive
            slow = server.connect()
            slow.sendall(b"GET /t/sleep/?s=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            server.wait_for_status(lambda s: s["in_flight"] >= 2)
            server.signal(signal.SIGTERM)  # draining: the sleep is still in flight
            server.wait_until_refused()
            sock.sendall(b"GET /t/echo/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = b"".join(iter(lambda: sock.recv(65536), b""))  # to the close
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert b"\r\nConnection: close\r\n" in answer
        assert b"".join(iter(lambda: slow.recv(65536), b"")).endswith(b"slept")
        slow.close()
        assert server.proc.wait(20) == 0
    finally:
        server.stop()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
DEFAULT_HANDLERS = (signal.SIG_DFL, signal.default_int_handler)


@pytest.fixture
def default_stop_handlers():
    """SIGTERM and SIGINT as a fresh interpreter has them, whatever this process
    inherited (a shell running the suite in the background ignores SIGINT), and as they
    were afterwards."""
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum, handler in zip(STOP_SIGNALS, DEFAULT_HANDLERS, strict=True):
        signal.signal(signum, handler)
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def test_the_parent_handles_stop_signals_from_its_banner_on(
    monkeypatch, tmp_path, default_stop_handlers
):
    """A stop signal sent as soon as the banner is out (a supervisor or a test reading
    it) reaches the parent's handler: it came before the handler was installed, and
    the parent died of it (rc -15), leaving its workers to the kernel's SIGTERM and its
    figures directory behind.  (Here, in-process: the window was too short to hit.)"""
    from django_comet.evloop.config import ServerConfig
    from django_comet.management.commands import runcomet as module

    class Parent(module.Supervisor):
        def run(self):  # forks nothing
            return 0

    at_banner = []
    monkeypatch.setattr(module, "Supervisor", Parent)
    monkeypatch.setattr(module.tempfile, "tempdir", str(tmp_path))
    cmd = Command(stdout=StringIO(), stderr=StringIO())
    cmd.on_bind = lambda *args, **kwargs: at_banner.extend(
        signal.getsignal(signum) for signum in STOP_SIGNALS
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        cmd._run_workers(2, sock, None, ServerConfig(port=0))
    assert [getattr(h, "__func__", h) for h in at_banner] == [Parent._on_stop] * 2, at_banner
    assert os.listdir(tmp_path) == []


def test_a_single_server_handles_stop_signals_from_its_banner_on(default_stop_handlers):
    """The same for one process: its banner came before its handlers, and a test that
    stopped it as soon as the banner was out saw it die of the SIGTERM (rc -15, its
    unix socket file left behind).  In-process, as above."""
    from django.core.management import call_command

    from django_comet.management.commands import runcomet as module

    class Announced(module.Server):
        def serve_forever(self, **kwargs):
            self.close()

    at_banner = []
    cmd = Command(stdout=StringIO(), stderr=StringIO())
    cmd.comet_server_cls = Announced
    cmd.check_migrations = lambda: None  # (no database here)
    cmd.on_bind = lambda *args, **kwargs: at_banner.extend(
        signal.getsignal(signum) for signum in STOP_SIGNALS
    )
    call_command(cmd, "127.0.0.1:0", use_reloader=False, skip_checks=True)
    assert len(at_banner) == 2 and not set(at_banner) & set(DEFAULT_HANDLERS), at_banner


def test_evloop_handles_stop_signals_from_its_banner_on(monkeypatch, default_stop_handlers):
    """And for ``python -m django_comet.evloop``, whose banner is a print."""
    from django_comet.evloop import __main__ as module

    class Announced(module.Server):
        def serve_forever(self, **kwargs):
            self.close()

    at_banner = []
    monkeypatch.setattr(module, "Server", Announced)
    monkeypatch.setattr(
        module,
        "print",
        lambda *args, **kwargs: at_banner.extend(
            signal.getsignal(signum) for signum in STOP_SIGNALS
        ),
        raising=False,
    )
    module.main(["tests.fixtureapps.apps:app", "127.0.0.1:0", "--no-access-log"])
    assert len(at_banner) == 2 and not set(at_banner) & set(DEFAULT_HANDLERS), at_banner


def test_clients_that_stopped_reading_do_not_hold_up_a_stop(demo_db):
    """With a minute of grace, a stop still ends soon after what can leave has left: a
    stream whose client reads nothing keeps its bytes in the server, not the stop."""
    env = {"TEST_GRACE_PERIOD": "60", "TEST_MAX_PENDING_OUTPUT": str(64 << 20)}
    server = runcomet(db=demo_db, env=env)
    try:
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect((server.host, server.port))
        stalled.sendall(b"GET /t/stream/?channels=stalled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        server.wait_for_status(lambda s: s["channels"].get("stalled") == 1)
        for _ in range(40):  # 8 MB it never reads: more than the kernel buffers (4 MB)
            requests.post(
                server.url + "/t/publish/",
                data={"channel": "stalled", "data": json.dumps("x" * 200_000)},
                timeout=10,
            )
        held = SSEClient(server, "/t/stream/?channels=other")  # and one that reads
        server.signal(signal.SIGTERM)
        assert list(held.frames())[-1].startswith(b"retry: ")
        # Not the 60 s of grace: the drain says why it ended early.
        assert server.logged("Not waiting for", timeout=30)
        assert server.proc.wait(30) == 0
        stalled.close()
    finally:
        server.stop()


def test_a_response_that_would_wait_during_the_stop_ends_at_once(demo_db):
    """A long-poll answered by the stop is polled again at once, on another kept-alive
    connection: that poll must not wait (it would hold the stop for the grace period)."""
    server = runcomet(db=demo_db, env={"TEST_GRACE_PERIOD": "60"})
    try:
        poll = b"GET /t/fastpoll/?channel=again&timeout=50 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        slow = server.connect()  # in flight throughout, so that the stop lasts
        slow.sendall(b"GET /t/sleep/?s=3 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first, second = server.connect(), server.connect()
        second.sendall(b"GET /t/echo/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert second.recv(65536).startswith(b"HTTP/1.1 200 ")  # open and idle
        first.sendall(poll)
        server.wait_for_status(lambda s: s["held"] == 1 and s["in_flight"] >= 3)
        server.signal(signal.SIGTERM)
        first_file = first.makefile("rb")
        _, chunks = read_chunked(first_file)
        assert json.loads(b"".join(chunks))["events"] == []
        assert first_file.read() == b""  # and no next request on it: closed
        second.sendall(poll)  # polling again, during the stop
        second_file = second.makefile("rb")
        head, chunks = read_chunked(second_file)
        assert json.loads(b"".join(chunks))["events"] == []
        assert b"\r\nConnection: close\r\n" in head and second_file.read() == b""
        assert b"".join(iter(lambda: slow.recv(65536), b"")).endswith(b"slept")
        assert server.proc.wait(30) == 0
        for sock in (first, second, slow):
            sock.close()
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["poll", "stream", "until"])
def test_a_wait_a_running_stage_returns_during_the_stop_ends_as_its_kind_does(
    demo_db, tmp_path, kind
):
    """A stage still running when the stop came, which then returns a wait (in the view
    threads): it was ended with no last part (a poll's body was a space, a stream had no
    retry:, a defer_until's stage never ran)."""
    gate = tmp_path / "gate"
    server = runcomet(db=demo_db)
    try:
        with server.connect() as sock:
            target = f"/t/wait-after-stage/?kind={kind}&channel=stopped&gate={gate}"
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            wait_until(lambda: os.path.exists(f"{gate}.started"))
            server.signal(signal.SIGTERM)
            server.wait_until_refused()
            gate.touch()
            body = read_body(sock)
        assert body.startswith(b"first;")
        assert ended_as_its_kind_does(kind, body.removeprefix(b"first;")), body
        assert server.proc.wait(20) == 0
    finally:
        server.stop()


def test_a_poll_in_a_gap_answered_by_the_stop_moves_past_the_gap(demo_db):
    """A long-poll whose cursor is before events gone from the history, answered by the
    stop: as on its timeout, its last_id moves past the gap, so that its next poll (to
    another server) is not told of it again."""
    server = runcomet(db=demo_db, env={"TEST_HISTORY_SIZE": "0"})
    try:
        seen = publish(server, "emptied", "seen")
        gone = publish(server, "emptied", "gone")
        with server.connect() as sock:
            target = f"/t/fastpoll/?channel=emptied&since={seen}&timeout=60"
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            server.wait_for_status(lambda s: s["held"] == 1)
            server.signal(signal.SIGTERM)
            answer = json.loads(read_body(sock))
        assert answer["gap"] is True and answer["events"] == []
        assert answer["last_id"] >= gone
        assert server.proc.wait(20) == 0
    finally:
        server.stop()


def test_a_body_cut_by_the_grace_period_is_closed_by_its_worker(demo_db, tmp_path):
    """A streamed body still going when the grace period is over, its worker between two
    pauses: it used to wait at its next pause for a loop that had stopped, for ever, and
    the body was never closed."""
    closed = tmp_path / "closed"
    server = runcomet(db=demo_db, env={"TEST_GRACE_PERIOD": "1"})
    try:
        with server.connect() as sock:
            target = f"/t/paced-big/?closed={closed}"
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            server.signal(signal.SIGTERM)
            while sock.recv(1 << 20):  # read on, to the cut
                pass
        assert server.proc.wait(20) == 0
        assert closed.read_text() == "closed"
        server.stop()  # (its output read to the end)
        cut = [line for line in server.output if "GET /t/paced-big/" in line]
        assert len(cut) == 1 and cut[0].rstrip().endswith("(cut by the server)"), cut
    finally:
        server.stop()


def start_view_holding_the_loop(server, tmp_path):
    """A view sleeping a minute in the loop thread (--threads 0); returns the socket of
    its request once the view runs."""
    started = tmp_path / "started"
    client = server.connect()
    client.sendall(
        b"GET /t/sleep/?s=60&started=%b HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % bytes(started)
    )
    wait_until(started.exists)
    return client


def test_with_threads_0_a_second_signal_stops_a_view_holding_the_loop(demo_db, tmp_path):
    """The loop thread runs the views: a second signal cuts the one that holds it (a
    handler raises into it), where it used to wait for the view to return."""
    server = runcomet("--threads", "0", db=demo_db)
    try:
        client = start_view_holding_the_loop(server, tmp_path)
        server.signal(signal.SIGTERM)
        server.signal(signal.SIGINT)  # (two SIGTERMs could arrive as one)
        assert server.proc.wait(30) == 0
        assert server.logged("Stopped at once: a second stop signal came while a view ran")
        client.settimeout(10)
        assert b"slept" not in client.recv(4096)  # closed, the view never finished
        client.close()
    finally:
        server.stop()


def test_with_threads_0_the_grace_period_ends_a_view_holding_the_loop(demo_db, tmp_path):
    server = runcomet("--threads", "0", db=demo_db, env={"TEST_GRACE_PERIOD": "1"})
    try:
        client = start_view_holding_the_loop(server, tmp_path)
        server.signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        assert server.logged("Stopped at once: the grace period is over, and a view held the loop")
        client.close()
    finally:
        server.stop()


def test_with_threads_0_a_view_resumed_by_libevent_is_stopped_too():
    """A streamed body that paused is taken up again from libevent's callback for its
    drained output, not from the loop's own dispatch: the exception that stops it must
    reach the loop from there too (ctypes would print it and drop it)."""
    server = evloop("tests.fixtureapps.apps:dispatch", "--threads", "0")
    try:
        with server.connect() as client:
            client.settimeout(30)
            client.sendall(b"GET /big-then-wait HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            # Past the first pause (1 MiB unsent): the rest is taken up from libevent's
            # callback once these have left, and then the body waits (and, in the loop
            # thread, everything with it).
            while got.count(b"B") < 16 * 65536:
                more = client.recv(1 << 20)
                assert more, got[-200:]
                got += more
            server.signal(signal.SIGTERM)
            server.signal(signal.SIGINT)
            assert server.proc.wait(30) == 0
        assert server.logged("Stopped at once: ")
        assert not [line for line in server.output if "Exception ignored" in line]
    finally:
        server.stop()

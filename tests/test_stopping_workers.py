"""Stopping runcomet --workers: the parent and its workers drain once, workers that die
or cannot start, a parent killed outright, a stop as they start, a successor binding
while they drain."""

import contextlib
import glob
import os
import signal
import socket
import subprocess
import sys

import psutil
import pytest
import requests

from .brokers import RedisServer
from .processes import ROOT, get_in_background, runcomet, wait_until


def sleep_request(seconds: int, started) -> bytes:
    """A request for a view that sleeps, which creates ``started`` as it begins."""
    return b"GET /t/sleep/?s=%d&started=%s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % (
        seconds,
        str(started).encode(),
    )


def began(tmp_path, name: str = "started") -> None:
    """Wait for the view to be running.  (Not for the status' in_flight: each worker
    counts the status request it serves, so two workers' figures add up to 2 with
    nothing else in flight.)"""
    wait_until((tmp_path / name).exists)


@pytest.fixture(scope="module")
def redis():
    """--workers need a shared broker: one Redis server for the module."""
    server = RedisServer()
    yield server
    server.destroy()


def test_workers_dying_on_start_are_restarted_ever_more_slowly():
    from django_comet.evloop.prefork import restart_pause

    pauses, pause = [], 0.0
    for _ in range(8):
        pause = restart_pause(pause, lived=0.01)
        pauses.append(pause)
    assert pauses == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert restart_pause(5.0, lived=60) == 0.0  # it had served: replace it at once


CRASH_LOOP = """
import os, sys
from django_comet.evloop import prefork
prefork.restart_pause = lambda pause, lived: 3600.0  # a worker that keeps dying
def child(number):
    os._exit(1)
sys.exit(prefork.Supervisor(1, child, grace=1.0).run())
"""


def test_a_stop_during_a_restart_pause_stops_the_parent_at_once():
    """The parent of workers that keep dying waits longer and longer before the next
    one (up to 5 s); a stop meanwhile ends that wait (time.sleep resumed after the
    handler: the stop waited out the pause)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASH_LOOP],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.PIPE,
    )
    try:
        # Logged as the pause begins.
        assert b"starting another" in proc.stderr.readline()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["ctrl-c", "systemd", "hangup"]
)
def test_a_stop_signal_to_the_process_group_drains_in_flight_requests(
    redis, demo_db, signum, tmp_path
):
    """Ctrl-C reaches the whole process group: the parent and every worker; so does
    systemd's SIGTERM (KillMode=control-group), or `kill -- -PGID`, or the SIGHUP of a
    terminal that closes.  Each worker must drain once, not take the parent's SIGTERM
    as a second signal."""

    server = runcomet("--workers", "2", db=demo_db, env={"COMET_BROKER": redis.url})
    try:
        slow = get_in_background(server.url + f"/t/sleep/?s=3&started={tmp_path / 'started'}")
        began(tmp_path)
        parent = psutil.Process(server.proc.pid)
        for process in [parent, *parent.children()]:
            process.send_signal(signum)
        assert (slow.result().status_code, slow.result().text) == (200, "slept")
        assert server.proc.wait(20) == 0
    finally:
        server.stop()


def test_a_second_sigterm_drains_and_a_sigint_after_it_cuts(redis, demo_db, tmp_path):
    """GNU timeout sends its SIGTERM to the parent, then to the process group: the same
    stop twice, whose second the parent took for "kill the workers", cutting the
    requests in flight.  A Ctrl-C after it still cuts."""
    server = runcomet("--workers", "2", db=demo_db, env={"COMET_BROKER": redis.url})
    try:
        slow = get_in_background(server.url + f"/t/sleep/?s=3&started={tmp_path / 'started'}")
        began(tmp_path)
        server.signal(signal.SIGTERM)
        server.wait_until_refused()  # the first was handled
        server.signal(signal.SIGTERM)
        assert slow.result().text == "slept"
        assert server.proc.wait(20) == 0
        assert not [line for line in server.output if "Second stop request" in line]
    finally:
        server.stop()
    server = runcomet("--workers", "2", db=demo_db, env={"COMET_BROKER": redis.url})
    try:
        with server.connect() as sock:
            sock.sendall(sleep_request(30, tmp_path / "again"))
            began(tmp_path, "again")
            server.signal(signal.SIGTERM)
            server.wait_until_refused()
            server.signal(signal.SIGINT)  # a new request: now
            assert server.logged("Second stop request: killing the workers.")
            sock.settimeout(30)
            assert sock.recv(4096) == b""  # cut, never answered
    finally:
        server.stop()


def test_workers_started_under_nohup_outlive_their_terminal(redis, demo_db):
    env = {"COMET_BROKER": redis.url}
    server = runcomet("--workers", "2", db=demo_db, env=env, prefix=("nohup",))
    server.signal(signal.SIGHUP)
    server.signal(signal.SIGTERM)
    assert server.stop() == 0
    assert "Stopped.\n" in server.output
    assert not [line for line in server.output if "Second stop request" in line]


def test_workers_that_cannot_start_stop_the_server_with_one_error(redis, demo_db):
    """Out of descriptors, say: the parent restarted them for ever (each failing the
    same way, a traceback each time) while, to its supervisor, the server looked up."""
    env = {"COMET_BROKER": redis.url, "TEST_WORKERS_CANNOT_START": "1"}
    server = runcomet("--workers", "2", db=demo_db, env=env)
    assert server.proc.wait(30) == 1
    server.stop()
    output = "".join(server.output)
    assert "could not start; stopping the server." in output
    assert "OSError: [Errno 24] Too many open files (TEST_WORKERS_CANNOT_START)" in output
    assert output.rstrip().endswith(
        "CommandError: A worker could not start (its error is above); the server stopped."
    )
    assert "starting another" not in output


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_stop_when_their_parent_is_killed(redis, demo_db):
    """A parent killed outright (SIGKILL, the OOM killer) must not leave its workers
    serving on, holding the address that a restarted server needs."""

    server = runcomet("--workers", "2", db=demo_db, env={"COMET_BROKER": redis.url})
    workers = []
    try:
        parent = psutil.Process(server.proc.pid)
        wait_until(lambda: len(parent.children()) == 2)  # forked after the banner
        workers = parent.children()
        parent.kill()
        _, alive = psutil.wait_procs(workers, timeout=20)
        assert alive == []
        with socket.socket() as again:  # the address is free again
            again.bind((server.host, server.port))
    finally:
        for worker in workers:  # orphans (a failure) would keep the output pipe open
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
        server.stop()


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_whose_parent_is_killed_remove_the_figures_directory(redis, demo_db, tmp_path):
    """The parent, killed outright, cannot remove the directory where its workers share
    their figures: the workers, stopping on their own, do (the last one out); it was
    left in the temporary directory."""

    env = {"COMET_BROKER": redis.url, "TMPDIR": str(tmp_path)}  # mkdtemp makes it there
    server = runcomet("--workers", "2", db=demo_db, env=env)
    workers = []
    try:
        parent = psutil.Process(server.proc.pid)
        wait_until(lambda: len(parent.children()) == 2)
        workers = parent.children()
        [figures] = glob.glob(str(tmp_path / "django-comet-figures-*"))
        wait_until(lambda: len(os.listdir(figures)) == 2)  # each worker wrote its own
        parent.kill()
        _, alive = psutil.wait_procs(workers, timeout=20)
        assert alive == []
        assert not os.path.exists(figures), (os.listdir(figures), "".join(server.output))
    finally:
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
        server.stop()


def test_a_stop_as_the_workers_start_stops_each_at_once(redis, demo_db, tmp_path):
    """SIGTERM just after the banner, while 24 workers are being forked: the parent
    exits 0 once each worker forked has stopped, forks no more, and no worker misses the
    stop (one would serve on until the SIGKILL after the 60 s of grace).  The parent
    died of the signal when it came before the parent's handler (rc -15), forked workers
    onto the socket its stop had closed (each failed: a Bad file descriptor traceback),
    and lost the stop of the one being forked when it came."""
    env = {"COMET_BROKER": redis.url, "TEST_GRACE_PERIOD": "60", "TMPDIR": str(tmp_path)}
    server = runcomet("--workers", "24", db=demo_db, env=env)
    try:
        server.signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0, "".join(server.output)
    finally:
        server.stop()
    output = "".join(server.output)
    assert "Traceback" not in output and "failed" not in output, output
    assert output.rstrip().endswith("Stopped."), output
    assert os.listdir(tmp_path) == []  # and the figures directory is gone


def test_a_successor_can_bind_while_workers_drain(redis, demo_db, tmp_path):
    """A restart: while the old workers finish a slow request, a new server binds the
    same port (the parent let go of its copy of the listening socket)."""
    env = {"COMET_BROKER": redis.url}
    old = runcomet("--workers", "2", db=demo_db, env=env)
    try:
        slow = old.connect()
        slow.sendall(sleep_request(6, tmp_path / "started"))
        began(tmp_path)
        old.signal(signal.SIGTERM)
        old.wait_until_refused()
        slow.setblocking(False)
        with pytest.raises(BlockingIOError):  # the request is still in flight
            slow.recv(1)
        slow.setblocking(True)
        new = runcomet(db=demo_db, env=env, addrport=f"127.0.0.1:{old.port}")
        try:
            assert requests.get(new.url + "/t/echo/", timeout=10).status_code == 200
            assert b"slept" in b"".join(iter(lambda: slow.recv(65536), b""))
            assert old.proc.wait(20) == 0
        finally:
            assert new.stop() == 0, "".join(new.output)
        slow.close()
    finally:
        old.stop()

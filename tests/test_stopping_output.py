"""A stop whose output goes nowhere: stdout or the terminal gone, a stderr nobody reads,
the project's log handlers stuck or slow."""

import contextlib
import os
import re
import signal
import subprocess
import sys

import pytest
import requests

from .processes import (
    ROOT,
    runcomet,
    wait_until,
)


def piped_runcomet(demo_db, *args, env=None):
    """runcomet with stdout and stderr pipes of the test's own (ServerProcess reads its
    output all the time), once its banner is out on stdout."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "DEMO_DB": demo_db,
        **(env or {}),
    }
    argv = [sys.executable, str(ROOT / "demo_site" / "manage.py"), "runcomet", "--noreload"]
    proc = subprocess.Popen(
        [*argv, *args, "127.0.0.1:0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # To the banner's last line (its warning): a reader gone while the banner is being
    # written fails the start, as under runserver.
    while "not been reviewed" not in (line := proc.stdout.readline()):
        assert line, "runcomet ended before its banner"
        if match := re.search(r"http://127\.0\.0\.1:(\d+)/", line):
            proc.url = match.group(0).rstrip("/")
    return proc


@contextlib.contextmanager
def stopped_at_the_end(proc, broker=None):
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if broker:
            broker.destroy()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_stop_exits_0_when_no_one_reads_stdout_any_more(demo_db, workers):
    """A log shipper that died, or `| head`: the server serves on (its log is stderr),
    and its last word, "Stopped.", going nowhere must not make a clean stop exit 1."""
    from .brokers import RedisServer

    broker = RedisServer() if workers != "1" else None
    env = {"COMET_BROKER": broker.url} if broker else {}
    with stopped_at_the_end(piped_runcomet(demo_db, "--workers", workers, env=env), broker) as proc:
        proc.stdout.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_a_stop_exits_0_when_its_terminal_closed(demo_db):
    """A terminal that closes sends SIGHUP, a clean stop; "Stopped." written to it then
    failed (EIO) with a traceback, and the process exited 1."""
    terminal, its_end = os.openpty()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PYTHONPATH": str(ROOT),
        "DEMO_DB": demo_db,
    }
    argv = [sys.executable, str(ROOT / "demo_site" / "manage.py"), "runcomet", "--noreload"]
    proc = subprocess.Popen([*argv, "127.0.0.1:0"], env=env, stdout=its_end, stderr=its_end)
    os.close(its_end)
    with stopped_at_the_end(proc):
        seen = b""
        # To the banner's last line, as in piped_runcomet: a terminal that goes while
        # the banner is being written fails the start.
        while b"before exposing it" not in seen:
            seen += os.read(terminal, 4096)
        os.close(terminal)  # the terminal goes: writes to it fail from now on
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(30) == 0


@pytest.mark.parametrize(
    "threads, console_log",
    [("8", ""), ("0", ""), ("8", "root"), ("0", "django_comet"), ("8", "django_comet.access")],
)
def test_a_server_whose_stderr_is_not_read_serves_on_and_stops(demo_db, threads, console_log):
    """Docker's blocking log mode, a stalled journald, `| less`: the access log's lines
    fill the pipe, and the loop thread, which wrote them, stopped every connection and
    the stop signals with them.  So did the project's own console handler (LOGGING's,
    on the root logger or on django_comet's) when the server's records went to it."""
    env = {"TEST_CONSOLE_LOG": console_log}
    with stopped_at_the_end(piped_runcomet(demo_db, "--threads", threads, env=env)) as proc:
        target = "/t/echo/?" + "x" * 4000  # a 4 KiB access-log line each
        with requests.Session() as session:
            for _ in range(100):  # 400 KiB of log, where a pipe holds 64
                assert session.get(proc.url + target, timeout=10).status_code == 200
        proc.send_signal(signal.SIGTERM)  # handled too, the pipe still full
        log = proc.stderr.read()  # (to the end: the process exits meanwhile)
        assert proc.wait(30) == 0
        assert log.count('"GET /t/echo/?xxxx') == 100  # kept, and written once read
        assert "Stopping: no new connections" in log


@pytest.mark.parametrize("threads", ["8", "0"])
def test_an_apps_wsgi_errors_on_a_stderr_not_read_stops_nothing(threads):
    """What an app writes to wsgi.errors (Bottle's and Falcon's tracebacks) went to
    stderr from the view's thread: a pipe nobody read stopped every view thread (and with
    --threads 0 the loop, stop signals too).  It goes out in order once read."""
    argv = [sys.executable, "-m", "django_comet.evloop", "tests.fixtureapps.apps:app"]
    proc = subprocess.Popen(
        [*argv, "127.0.0.1:0", "--no-access-log", "--threads", threads],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,  # never read until the process is gone
        text=True,
    )
    with stopped_at_the_end(proc):
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", proc.stdout.readline())
        assert match, "no banner"
        url = match.group(0) + "errors?4000"
        with requests.Session() as session:
            for _ in range(100):  # 400 KiB, where a pipe holds 64
                assert session.get(url, timeout=10).status_code == 200
        proc.send_signal(signal.SIGTERM)
        errors = proc.stderr.read()
        assert proc.wait(30) == 0
        assert errors.count("E" * 4000 + "\n") == 100


@pytest.mark.parametrize(
    "launch, console_log",
    [("runcomet", "root"), ("evloop", "root"), ("evloop", "django_comet")],
)
def test_a_stop_exits_while_the_projects_console_handler_is_stuck(demo_db, launch, console_log):
    """The project's console handler, stuck on a stderr nobody reads, holds its lock:
    logging.shutdown() at exit waited for it for ever (and with LOGGING naming
    django_comet, evloop's loop thread wrote the log itself, and stalled)."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PYTHONPATH": str(ROOT),
        "DEMO_DB": demo_db,
        "TEST_CONSOLE_LOG": console_log,
    }
    if launch == "runcomet":
        argv = [sys.executable, str(ROOT / "demo_site" / "manage.py"), "runcomet", "--noreload"]
    else:
        argv = [sys.executable, "-m", "django_comet.evloop", "demo_site.wsgi:application"]
    proc = subprocess.Popen(
        [*argv, "127.0.0.1:0"],
        cwd=ROOT / "demo_site",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,  # never read until the process is gone
        text=True,
    )
    with stopped_at_the_end(proc):
        while not (match := re.search(r"http://127\.0\.0\.1:(\d+)/", proc.stdout.readline())):
            assert proc.poll() is None, "the server ended before its banner"
        url = match.group(0).rstrip("/")
        target = "/t/echo/?" + "x" * 4000  # a 4 KiB access-log line each
        with requests.Session() as session:
            for _ in range(100):  # 400 KiB of log, where a pipe holds 64
                assert session.get(url + target, timeout=10).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        proc.stderr.close()


def test_a_stop_waits_for_the_projects_slow_log_handler(demo_db, tmp_path):
    """A handler that is slow (mailing, shipping its records) is not stuck: the stop's
    last lines reach it, where the process used to end after 2 s without them."""
    log = tmp_path / "slow.log"
    server = runcomet(db=demo_db, env={"TEST_SLOW_LOG": str(log)})
    server.signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    assert "Stopping: no new connections" in log.read_text()


def test_a_reload_restarts_while_the_projects_console_handler_is_stuck(demo_db, tmp_path):
    """Under the autoreloader, the process an edit restarts ended in logging.shutdown(),
    waiting for ever for the stuck handler's lock: it never ended, and never restarted.
    (The process started in its place then waits on that stderr too, in Django's own
    logging: the project's console handler is the project's.)"""
    import psutil

    watched = tmp_path / "watched.py"
    watched.write_text("# edited below\n")
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PYTHONPATH": str(ROOT),
        "DEMO_DB": demo_db,
        "TEST_CONSOLE_LOG": "root",
        "TEST_WATCHED_FILE": str(watched),
    }
    argv = [sys.executable, str(ROOT / "demo_site" / "manage.py"), "runcomet", "127.0.0.1:0"]
    proc = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,  # never read until the process is gone
        text=True,
        start_new_session=True,
    )
    try:
        while not (match := re.search(r"http://127\.0\.0\.1:(\d+)/", proc.stdout.readline())):
            assert proc.poll() is None, "the server ended before its banner"
        url = match.group(0).rstrip("/")
        serving = psutil.Process(proc.pid).children()[0]  # the autoreloader's child
        target = "/t/echo/?" + "x" * 4000  # a 4 KiB access-log line each
        with requests.Session() as session:
            for _ in range(100):  # 400 KiB of log, where a pipe holds 64
                assert session.get(url + target, timeout=10).status_code == 200

        def restarted():
            # Again until seen: an edit before the autoreloader's first look is not one.
            stat = watched.stat()
            os.utime(watched, (stat.st_atime, stat.st_mtime + 10))
            try:
                serving.wait(1)  # (it ends, for the autoreloader to start another)
            except psutil.TimeoutExpired:
                return False
            return True

        wait_until(restarted, 60)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()

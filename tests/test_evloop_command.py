"""`python -m django_comet.evloop` as a command: its command line, its address, and a
Django project served by it (its logging, its COMET_* settings)."""

import json
import os
import re
import subprocess
import sys

import pytest
import requests

from .processes import ROOT, evloop
from .sse_client import SSEClient


@pytest.mark.parametrize("debug", ["1", "0"])
def test_django_served_by_evloop_prints_each_error_once(demo_db, debug):
    """`python -m django_comet.evloop` prints the app's logging (from the root logger);
    Django's `django` logger has a console handler of its own, which prints under DEBUG
    only: each error's traceback was printed twice under DEBUG, and once that was
    mended, not at all without it (found by reviews)."""
    env = {"DEMO_DB": demo_db, "DJANGO_DEBUG": debug}
    server = evloop("demo_site.wsgi:application", cwd=ROOT / "demo_site", env=env)
    try:
        assert requests.get(server.url + "/t/boom/", timeout=10).status_code == 500
        assert server.logged("RuntimeError: boom")
        assert requests.get(server.url + "/t/echo/", timeout=10).status_code == 200
        assert server.logged('"GET /t/echo/ HTTP/1.1" 200')  # (logged after the error's)
    finally:
        assert server.stop() == 0, "".join(server.output)
    output = "".join(server.output)
    assert output.count("RuntimeError: boom") == 1, output


@pytest.mark.parametrize("logging_setting", ["TEST_APP_LOGGING", "TEST_CONSOLE_LOG"])
def test_django_served_by_evloop_keeps_its_log_under_the_projects_logging(demo_db, logging_setting):
    """The project's LOGGING, applied as its wsgi.py is imported, disabled the server's
    loggers (disable_existing_loggers) or replaced the root logger's handlers: no access
    log, no errors, no "Stopping" (found by a review)."""
    env = {
        "DEMO_DB": demo_db,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        logging_setting: "root",
    }
    server = evloop("demo_site.wsgi:application", cwd=ROOT / "demo_site", env=env)
    try:
        assert requests.get(server.url + "/t/echo/", timeout=10).status_code == 200
        assert server.logged('"GET /t/echo/ HTTP/1.1" 200')
    finally:
        assert server.stop() == 0, "".join(server.output)
    out = "".join(server.output)
    # (runserver stops at once: the message says how, while the grace period runs)
    assert "Stopping: no new connections" in out
    assert "(a second Ctrl-C stops at once)" in out


def test_django_served_by_evloop_takes_the_projects_comet_settings(demo_db):
    """A stream's first frame announces the project's heartbeat interval; the server beat
    at its default (15 s), and comet.js, going by the first frame, reopened the stream
    every three announced intervals (found by a review)."""
    env = {
        "DEMO_DB": demo_db,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "TEST_SSE_HEARTBEAT": "0.2",
    }
    server = evloop("demo_site.wsgi:application", cwd=ROOT / "demo_site", env=env)
    try:
        with SSEClient(server, "/t/stream/?channels=quiet", timeout=5) as client:
            frames = client.frames()
            announced = next(frames)  # (with a new client's cursor)
            assert re.fullmatch(rb"id: \d+\nevent: comet-heartbeat\ndata: 0.2", announced)
            assert next(frames) == b"event: comet-heartbeat\ndata: 0.2"  # and kept
    finally:
        assert server.stop() == 0, "".join(server.output)


def test_an_ipv6_server_name_is_bracketed():
    """Without a Host header, SERVER_NAME and SERVER_PORT stand for it: an IPv6 literal
    must be bracketed, or ``::1:8000`` cannot be split into host and port."""
    server = evloop("tests.fixtureapps.apps:dispatch", addrport="[::1]:0")
    try:
        with server.connect() as sock:
            sock.sendall(b"GET /environ HTTP/1.0\r\n\r\n")
            response = b"".join(iter(lambda: sock.recv(65536), b""))
        environ = json.loads(response.partition(b"\r\n\r\n")[2])
        assert environ["SERVER_NAME"] == "[::1]"
        assert environ["REMOTE_ADDR"] == "::1"
    finally:
        server.stop()


def test_trusted_proxies_of_any_wsgi_app():
    """--trusted-proxies, as gunicorn's --forwarded-allow-ips: an app that is not a
    Django project had no way to believe its proxy."""
    headers = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    for args, remote_addr, scheme in [
        ((), "127.0.0.1", "http"),
        (("--trusted-proxies", "10.0.0.1, 127.0.0.0/8"), "203.0.113.7", "https"),
    ]:
        server = evloop("tests.fixtureapps.apps:dispatch", *args)
        try:
            environ = requests.get(server.url + "/environ", headers=headers, timeout=10).json()
            assert (environ["REMOTE_ADDR"], environ["wsgi.url_scheme"]) == (remote_addr, scheme)
        finally:
            server.stop()


def evloop_command(*args):
    """``python -m django_comet.evloop ARGS`` run to its end (one that fails to start)."""
    return subprocess.run(
        [sys.executable, "-m", "django_comet.evloop", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["nosuchmodule:app", "0"], "error: cannot import 'nosuchmodule'"),
        (["tests.nosuchpackage.apps:app", "0"], "error: cannot import 'tests.nosuchpackage.apps'"),
        (["tests.fixtureapps.apps:nope", "0"], "error: 'tests.fixtureapps.apps' has no 'nope'"),
        (["tests.fixtureapps.apps:app", "::1"], "an IPv6 address goes in brackets"),
        (["tests.fixtureapps.apps:app", "0", "--threads", "-1"], "'-1' is not from 0 to 1024"),
        (["tests.fixtureapps.apps:app", "0", "--threads", "2000"], "'2000' is not from 0 to 1024"),
        (
            ["tests.fixtureapps.apps:app", "0", "--trusted-proxies", "nginx"],
            "'nginx', which is no IP address or network",
        ),
    ],
)
def test_bad_command_lines_are_one_line(args, message):
    result = evloop_command(*args)
    assert result.returncode != 0
    assert message in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_an_import_failing_inside_the_app_shows_where():
    """A dependency the app's module imports and that is not installed: its traceback,
    naming the file and line (it was one line, as for a typo in MODULE)."""
    result = evloop_command("tests.fixtureapps.broken_import:app", "0")
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert 'broken_import.py", line 3' in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == "ModuleNotFoundError: No module named 'a_dependency_that_is_not_installed'"


def test_an_apps_own_basic_config_is_its_logging():
    """The app's logging.basicConfig() did nothing (this command had put its own
    handler on the root logger first): its DEBUG lines were lost, and its format."""
    server = evloop("tests.fixtureapps.basic_config:app")
    try:
        assert requests.get(server.url + "/", timeout=10).text == "ok"
        assert server.logged("APP DEBUG basic_config: a debug line of the app's")
        # The server's own records (the access log) go to the app's handler too.
        assert server.logged("APP INFO django_comet.access: ")
    finally:
        assert server.stop() == 0


def test_what_an_app_logs_at_import_is_printed_as_the_servers_log():
    """(Not lost to logging's last resort, which prints WARNING and up, bare, while the
    command leaves the root logger without a handler for the app's basicConfig().)"""
    server = evloop("tests.fixtureapps.logs_at_import:app")
    try:
        assert server.logged("] configuration read at import")
    finally:
        assert server.stop() == 0

import signal
import subprocess
import sys

import pytest

from .brokers import PostgresServer, RedisServer
from .processes import ROOT, evloop, runcomet


def pytest_configure(config):
    """The servers the tests start inherit the signals this process ignores (a shell
    ignores SIGINT in a background job, nohup SIGHUP), and a server leaves an ignored
    stop signal ignored, as it should: the tests of those signals would fail there."""
    for signum, default in (
        (signal.SIGINT, signal.default_int_handler),
        (signal.SIGHUP, signal.SIG_DFL),
    ):
        if signal.getsignal(signum) is signal.SIG_IGN:
            signal.signal(signum, default)


@pytest.fixture(scope="session")
def demo_db(tmp_path_factory):
    db = str(tmp_path_factory.mktemp("db") / "demo.sqlite3")
    subprocess.run(
        [sys.executable, str(ROOT / "demo_site" / "manage.py"), "migrate", "--noinput", "-v0"],
        check=True,
        env={
            "DEMO_DB": db,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "PYTHONPATH": str(ROOT),
            "PATH": "/usr/bin:/bin",
        },
    )
    return db


@pytest.fixture(scope="session")
def comet(demo_db):
    """runcomet with the default thread pool, shared by the tests that leave it clean."""
    server = runcomet(db=demo_db)
    yield server
    assert server.stop() == 0, "".join(server.output)


@pytest.fixture(scope="session")
def comet_inline(demo_db):
    """runcomet --threads 0: views in the loop thread, as the 2007 original."""
    server = runcomet("--threads", "0", db=demo_db)
    yield server
    assert server.stop() == 0, "".join(server.output)


@pytest.fixture(scope="session")
def wsgi_server():
    """`python -m django_comet.evloop` serving tests/fixtureapps/apps.py:app."""
    server = evloop("tests.fixtureapps.apps:dispatch")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def wsgi_inline():
    """As wsgi_server, with --threads 0: the loop thread iterates the app's bodies."""
    server = evloop("tests.fixtureapps.apps:dispatch", "--threads", "0")
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["postgres", "redis"])
def broker(request):
    """A real PostgreSQL or Redis server for the tests of one module."""
    server = PostgresServer() if request.param == "postgres" else RedisServer()
    yield server
    server.destroy()


@pytest.fixture(scope="module")
def beating(demo_db):
    """A server with a 0.3 s heartbeat: comet.js takes 0.9 s of silence for a stall."""
    server = runcomet(db=demo_db, env={"TEST_SSE_HEARTBEAT": "0.3"})
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def tight(demo_db):
    """A server with a 5-event history, a 0.2 s heartbeat and a 64 KiB output bound."""
    import os

    os.environ.update(
        TEST_HISTORY_SIZE="5", TEST_SSE_HEARTBEAT="0.2", TEST_MAX_PENDING_OUTPUT=str(64 * 1024)
    )
    try:
        server = runcomet(db=demo_db)
    finally:
        for name in ("TEST_HISTORY_SIZE", "TEST_SSE_HEARTBEAT", "TEST_MAX_PENDING_OUTPUT"):
            del os.environ[name]
    yield server
    assert server.stop() == 0

"""runcomet and comet_publish: argument parsing, startup errors, system checks."""

import contextlib
import os
import socket
import subprocess
import sys
from io import StringIO

import pytest
import requests
from django.core.management import call_command

from django_comet.evloop.config import ServerConfig
from django_comet.management.commands.runcomet import Command

from .brokers import free_port
from .processes import ROOT, manage, runcomet, wait_until


def parsed(*args):
    cmd = Command(stdout=StringIO(), stderr=StringIO())
    cmd.run = lambda **options: setattr(cmd, "options", options)  # parse only
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


@pytest.mark.parametrize(
    "args, threads",
    [(("--threads", "3"), 3), (("--threads", "0"), 0), (("--nothreading",), 0), ((), None)],
)
def test_threads_option(args, threads):
    cmd = parsed(*args)
    expected = ServerConfig.threads if threads is None else threads  # (no COMET_THREADS)
    assert cmd.server_config(**cmd.options).threads == expected


def test_bad_address_is_one_line():
    result = manage("runcomet", "--noreload", "not an address")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        'CommandError: "not an address" is not a valid port number or address:port pair.'
    ]


@pytest.mark.parametrize(
    "args, env, message",
    [
        (("127.0.0.1:99999",), {}, 'CommandError: "99999" is not a valid port number.'),
        (("--threads=-1", "0"), {}, "CommandError: --threads must be from 0 to 1024."),
        (("--threads", "-1", "0"), {}, "CommandError: --threads must be from 0 to 1024."),
        (("--workers", "-2", "0"), {}, "CommandError: --workers must be 1 or more."),
        (("--threads=5000", "0"), {}, "CommandError: --threads must be from 0 to 1024."),
        (
            ("--threads=4", "--nothreading", "0"),
            {},
            "CommandError: --nothreading is --threads 0: give one or the other.",
        ),
        (
            ("0",),
            {"TEST_BAD_TIMEOUT": "soon"},
            "CommandError: A COMET_* setting is invalid (COMET_TIMEOUT must be int or float, "
            "not 'soon'); `manage.py check` names it.",
        ),
        (
            ("0",),
            {"COMET_LIBEVENT": "/nonexistent/libevent.so"},
            "CommandError: libevent 2.1 could not be loaded; tried: /nonexistent/libevent.so "
            "(/nonexistent/libevent.so: cannot open shared object file: No such file or "
            "directory). Install libevent 2.1 (Debian/Ubuntu: apt-get install libevent-2.1-7, "
            "or libevent-2.1-7t64 from Debian 13 and Ubuntu 24.04; Fedora: dnf install libevent; macOS: brew install libevent) or set COMET_LIBEVENT "
            "to the path of libevent's shared library.",
        ),
    ],
    ids=[
        "port-out-of-range",
        "negative-threads",
        "negative-threads-apart",
        "negative-workers-apart",
        "too-many-threads",
        "threads-and-nothreading",
        "bad-setting",
        "no-libevent",
    ],
)
@pytest.mark.parametrize("reload", [False, True], ids=["noreload", "autoreload"])
def test_bad_options_are_one_line_and_exit(args, env, message, reload):
    """Also under the autoreloader, whose server runs in a thread: an error there was a
    traceback, and a process left running that served nothing."""
    result = manage("runcomet", *(() if reload else ("--noreload",)), *args, env=env, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in result.stderr


def test_ipv6_flag_asks_for_ipv6_with_a_host_name():
    """runserver's -6 with a name (localhost) binds IPv6; a name alone chose IPv4.  (This
    machine's localhost has no IPv6 address to bind for real.)"""
    config = parsed("-6", "localhost:8004").server_config(threads=None, use_threading=True)
    assert config.ipv6 and config.host == "localhost"
    assert not parsed("localhost:8004").server_config(threads=None, use_threading=True).ipv6


def test_logs_reach_the_projects_root_handlers(demo_db, tmp_path):
    """With LOGGING sending the root logger to a file, django_comet's errors go there too
    (they went to stderr only)."""
    log = tmp_path / "root.log"
    server = runcomet(db=demo_db, env={"TEST_ROOT_LOG": str(log)})
    try:
        with contextlib.suppress(requests.exceptions.ChunkedEncodingError):
            requests.get(server.url + "/t/stage-404/", timeout=10)  # cut at the failed stage
        wait_until(lambda: "Error in deferred stage" in log.read_text())
    finally:
        assert server.stop() == 0, "".join(server.output)


def test_the_projects_handlers_get_the_servers_errors_whole(demo_db, tmp_path):
    """Handed to the project's handlers by a thread of their own, the server's records
    lost their exc_info (Django's AdminEmailHandler mailed "Traceback: None")."""
    log = tmp_path / "types.log"
    server = runcomet(db=demo_db, env={"TEST_EXCEPTION_LOG": str(log)})
    try:
        with server.connect() as sock:
            sock.sendall(b"GET /t/stage-raises/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            sock.settimeout(10)
            while sock.recv(65536):  # to the cut
                pass
        wait_until(lambda: log.exists() and "django_comet" in log.read_text())
        assert "django_comet.server StageError" in log.read_text().splitlines()
    finally:
        assert server.stop() == 0, "".join(server.output)


def test_the_access_log_survives_a_logging_setting_that_names_other_loggers(demo_db):
    """LOGGING's default disable_existing_loggers=True, applied again when the project's
    wsgi.py is imported, disabled django_comet's loggers: no access log, no errors."""
    server = runcomet(db=demo_db, env={"TEST_APP_LOGGING": "1"})
    try:
        assert requests.get(server.url + "/t/echo/?logged=yes", timeout=10).status_code == 200
        wait_until(lambda: any("/t/echo/?logged=yes" in line for line in server.output))
    finally:
        assert server.stop() == 0, "".join(server.output)


@pytest.mark.parametrize(
    "max_connections, reload", [("20000", False), ("1000000", False), ("20000", True)]
)
def test_port_in_use_is_one_line(max_connections, reload):
    """Also where the open-files limit is below COMET_MAX_CONNECTIONS: its warning, from
    the log's own thread, came before the error, or after it.  Under the autoreloader,
    which waits for an edit after a failed restart, a failed first start still ends it
    (nothing was edited)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = manage(
            "runcomet",
            *(() if reload else ("--noreload",)),
            "--skip-checks",
            f"127.0.0.1:{port}",
            env={"TEST_MAX_CONNECTIONS": max_connections},
        )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    if reload:  # (from the serving process, as runserver's, after the reloader's line)
        assert lines[1:] == ["Error: That port is already in use."]
    else:
        assert lines == ["CommandError: That port is already in use."]


def test_libevent_loads_by_its_soname_without_find_library():
    """On Linux, without libevent in ldconfig's cache, ``find_library`` runs a C compiler
    on a temporary file: in a read-only container nothing started, ``manage.py check``
    included (found by a review).  The sonames come first now."""
    code = (
        "import ctypes.util\n"
        "def refuse(name): raise FileNotFoundError('No usable temporary directory found')\n"
        "ctypes.util.find_library = refuse\n"
        "from django_comet.evloop import libevent_ctypes\n"
        "print(libevent_ctypes.load()._name)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "COMET_LIBEVENT"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("libevent"), result.stdout


def test_missing_libevent_is_a_system_check_error():
    result = manage("check", env={"COMET_LIBEVENT": "/nonexistent/libevent.so"})
    assert result.returncode == 1
    assert "django_comet.E001" in result.stderr
    assert "/nonexistent/libevent.so" in result.stderr


@pytest.mark.parametrize(
    "settings, warned", [("demo_site.settings", True), ("tests.settings", False)]
)
def test_channels_open_to_anyone_are_a_deploy_check_warning(settings, warned):
    """Unset, COMET_AUTHORIZE grants every channel: check --deploy says so (the demo's
    chat is public; the tests' settings name a callable)."""
    result = manage("check", "--deploy", env={"DJANGO_SETTINGS_MODULE": settings})
    assert ("django_comet.W001" in result.stderr) is warned, result.stderr
    assert (
        "django_comet.W001" not in manage("check", env={"DJANGO_SETTINGS_MODULE": settings}).stderr
    )


def test_a_comet_setting_django_comet_does_not_know_is_a_check_warning():
    """A typo left the default in force without a word (found by a review)."""
    result = manage("check", env={"TEST_MISNAMED_SETTINGS": "1"})
    assert result.returncode == 0, result.stderr
    said = result.stderr
    assert "COMET_HISTORY_SIZ is not a django-comet setting." in said, said
    assert "HINT: Did you mean COMET_HISTORY_SIZE?" in said, said
    assert "COMET_LIBEVENT is read from the environment, not from the settings." in said, said
    assert "COMET_API_KEY" not in said, said  # close to no name of ours: another library's
    assert "COMET_BROKER_URL is not a django-comet setting." in said, said
    assert "HINT: Did you mean COMET_BROKER?" in said, said
    assert "django_comet.W002" not in manage("check").stderr


@pytest.mark.parametrize("grace", ["inf", "nan", "1e12"])
def test_a_period_no_timer_can_hold_is_a_system_check_error(grace):
    result = manage("check", env={"TEST_GRACE_PERIOD": grace})
    assert result.returncode == 1
    assert "django_comet.E002" in result.stderr
    assert "COMET_GRACE_PERIOD must be at most" in result.stderr


def test_comet_publish_refuses_what_would_reach_nobody():
    """The memory broker lives in the command's own process; NaN is not JSON (a
    browser's JSON.parse would refuse every poll answer holding it)."""
    lonely = manage("comet_publish", "chat", '"hi"')
    assert lonely.returncode == 1
    assert "memory://" in lonely.stderr and "Traceback" not in lonely.stderr
    nan = manage(
        "comet_publish", "chat", '{"x": NaN}', env={"COMET_BROKER": "redis://127.0.0.1:1/0"}
    )
    assert nan.returncode == 1
    assert "NaN is not JSON" in nan.stderr


def test_an_unknown_broker_scheme_is_a_check_error_and_a_one_line_error():
    bogus = {"COMET_BROKER": "bogus://user:secret@x"}
    check = manage("check", env=bogus)
    assert check.returncode == 1
    assert "django_comet.E002" in check.stderr and "unknown scheme 'bogus'" in check.stderr
    assert "secret" not in check.stderr
    refused_in_one_line(bogus, "unknown scheme")


@pytest.mark.parametrize("url", ["postgres://u:secret@[::1/db", "redis://[::1/0"])
def test_a_broker_url_that_cannot_be_split_is_a_check_error_and_a_one_line_error(url):
    """urlsplit() refuses these (an unclosed IPv6 bracket): a traceback from
    every command that runs the checks (found by a review of settings)."""
    env = {"COMET_BROKER": url}
    check = manage("check", env=env)
    assert check.returncode == 1
    assert "django_comet.E002" in check.stderr and "COMET_BROKER is not a valid URL" in check.stderr
    assert "Traceback" not in check.stderr and "secret" not in check.stderr
    refused_in_one_line(env, "COMET_BROKER is not a valid URL")


def test_comet_publish_refuses_the_settings_publish_reads():
    """publish() reads COMET_HISTORY_SIZE and COMET_MAX_EVENT_SIZE too: a wrong one got
    a traceback or Redis's own words (found by a review of settings)."""
    env = {"COMET_BROKER": "redis://127.0.0.1:1/0", "TEST_HISTORY_SIZE": "-1"}
    result = manage("comet_publish", "chat", '"hi"', env=env)
    assert result.returncode == 1
    assert "COMET_HISTORY_SIZE cannot be negative" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_password_is_masked_only_where_the_message_quotes_it():
    from django_comet.brokers import _masked

    url = "postgres://u:p@host/db?bogus=1"
    assert _masked('invalid URI query parameter: "bogus"', url) == (
        'invalid URI query parameter: "bogus"'
    )
    assert _masked("cannot read postgres://u:p@host", url) == "cannot read postgres://u:***@host"


def refused_in_one_line(env, said):
    """runcomet and comet_publish refuse the broker setting in ``env`` in one line."""
    for command in (
        ("runcomet", "--noreload", "--skip-checks", "127.0.0.1:0"),
        ("comet_publish", "chat", '"hi"'),
    ):
        result = manage(*command, env=env)
        assert result.returncode == 1, result
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # one line
        assert said in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("url", "library", "extra"),
    [
        ("redis://127.0.0.1:1/0", "redis", "redis"),
        ("postgres://x@127.0.0.1/db", "psycopg", "postgres"),
    ],
)
def test_a_broker_whose_library_is_missing_says_which_extra_to_install(
    url, library, extra, tmp_path
):
    """A system check error, and one line from the commands, not a traceback."""
    (tmp_path / library).mkdir()
    (tmp_path / library / "__init__.py").write_text(f"raise ImportError('No module {library}')")
    env = {"COMET_BROKER": url, "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    check = manage("check", env=env)
    assert check.returncode == 1
    said = f"(django-comet's [{extra}] extra)"
    assert "django_comet.E002" in check.stderr and said in check.stderr, check.stderr
    refused_in_one_line(env, said)


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("postgresql://comet:secret@127.0.0.1:99999/db", "invalid port number '99999'"),
        ("postgres://comet:secret@127.0.0.1/db?sslmod=require", 'parameter: "sslmod"'),
        ("redis://:secret@127.0.0.1:6379/O", "must be a number (redis://host:port/0), not 'O'"),
        ("redis://:secret@127.0.0.1:abc/0", "Port could not be cast to integer value as 'abc'"),
    ],
)
def test_a_broker_url_its_client_would_refuse_or_misread_is_refused_at_startup(url, said):
    """It used to start: its listener retried a URL libpq refused every 5 s, and
    publishes failed; redis-py took a database that is not a number for database 0."""
    check = manage("check", env={"COMET_BROKER": url})
    assert check.returncode == 1
    assert "django_comet.E002" in check.stderr and said in check.stderr, check.stderr
    result = manage(
        "runcomet", "--noreload", "--skip-checks", "127.0.0.1:0", env={"COMET_BROKER": url}
    )
    assert result.returncode == 1, result
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # one line
    assert said in result.stderr and "secret" not in result.stderr, result.stderr


def test_a_bare_postgres_broker_needs_a_postgresql_database():
    check = manage("check", env={"COMET_BROKER": "postgres://"})
    assert check.returncode == 1
    assert "django_comet.E002" in check.stderr and "not PostgreSQL" in check.stderr


def test_comet_publish_refuses_json_nested_too_deep():
    deep = "[" * 50_000 + "]" * 50_000
    result = manage("comet_publish", "chat", deep, env={"COMET_BROKER": "redis://127.0.0.1:1/0"})
    assert result.returncode == 1
    assert "data is not JSON" in result.stderr and "Traceback" not in result.stderr


def test_publish_refuses_nan():
    from django_comet.events import publish

    with pytest.raises(ValueError):
        publish("chat", float("nan"))


@pytest.mark.parametrize(
    "scheme, path",
    [("postgresql", "/postgres"), ("redis", "/0")],
    ids=["postgres", "redis"],
)
def test_comet_publish_with_the_broker_down_is_one_line(scheme, path):
    """A broker that cannot be reached is a one-line error naming it and why (it was a
    traceback of 31 to 118 lines), without the password the setting may hold."""
    where = f"{scheme}://127.0.0.1:{free_port()}{path}"  # nothing listens there
    url = where.replace("://", "://comet:secret@") + "?password=secret"
    result = manage("comet_publish", "chat", '"hi"', env={"COMET_BROKER": url})
    assert result.returncode == 1
    assert result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"CommandError: Cannot publish through the broker at {where}: "), line
    assert "refused" in line and "secret" not in line, line


@pytest.mark.parametrize(
    "name",
    [
        "COMET_MAX_HEADER_SIZE",
        "COMET_MAX_REQUEST_LINE",
        "COMET_MAX_HEADER_COUNT",
        "COMET_HISTORY_CHANNELS",
        "COMET_MAX_PENDING_OUTPUT",
        "COMET_MAX_BODY_SIZE",
        "COMET_MAX_CHANNELS",
    ],
)
def test_a_limit_of_0_that_would_refuse_everything_is_a_settings_error(name):
    from django.test import override_settings

    from django_comet.conf import comet_settings

    with override_settings(**{name: 0}):
        assert [e for e in comet_settings.errors() if name in e and "at least 1" in e]


@pytest.mark.parametrize(
    "name, value, said",
    [
        ("COMET_MAX_BODY_SIZE", 2**64 + 10, "at most 1099511627776"),  # wrapped to 10 bytes
        ("COMET_MAX_HEADER_SIZE", sys.maxsize, "at most 1099511627776"),
        ("COMET_MAX_REQUEST_LINE", 2**63, "at most 1099511627776"),
        ("COMET_MAX_PENDING_OUTPUT", 2**41, "at most 1099511627776"),
        ("COMET_THREADS", 10**9, "at most 1024"),
        ("COMET_SSE_HEARTBEAT", 1e-9, "at least 0.1 seconds (or 0: none)"),
        ("COMET_HEADER_TIMEOUT", 0.01, "at least 0.1 seconds (or 0: none)"),
        ("COMET_MAX_HOLD", 1e-5, "at least 0.1 seconds (or 0: none)"),
        ("COMET_TIMEOUT", 1e-5, "at least 0.1 seconds, not"),
        ("COMET_TIMEOUT", 0, "at least 0.1 seconds, not"),
    ],
)
def test_a_value_that_would_break_serving_is_a_settings_error(name, value, said):
    """Sizes past what libevent takes (ctypes wrapped them: 2**64 + 10 was a 10-byte
    body limit), a billion threads (built before any ran), periods so short that
    every connection timed out or a stream got nothing but heartbeats."""
    from django.test import override_settings

    from django_comet.conf import comet_settings

    with override_settings(**{name: value}):
        assert [e for e in comet_settings.errors() if name in e and said in e], (
            comet_settings.errors()
        )


@pytest.mark.parametrize("name, value", [("COMET_SSE_HEARTBEAT", 0), ("COMET_MAX_HOLD", 0)])
def test_0_still_turns_a_period_off(name, value):
    from django.test import override_settings

    from django_comet.conf import comet_settings

    with override_settings(**{name: value}):
        assert not comet_settings.errors()


def test_a_host_that_does_not_resolve_is_named_in_one_line():
    result = manage("runcomet", "--noreload", "no-such-host.invalid:0")
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("CommandError: Cannot resolve 'no-such-host.invalid': "), line


def test_both_commands_say_django_comets_version():
    """runserver's --version says Django's; runcomet's says its own, and Django's."""
    import django

    import django_comet

    said = manage("runcomet", "--version")
    assert (
        said.stdout.strip()
        == f"django-comet {django_comet.__version__} (Django {django.get_version()})"
    )
    evloop = subprocess.run(
        [sys.executable, "-m", "django_comet.evloop", "--version"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert evloop.stdout.strip() == f"django-comet {django_comet.__version__}"

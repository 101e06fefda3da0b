"""Serve any WSGI callable:
``python -m django_comet.evloop MODULE:CALLABLE [HOST:]PORT`` (or ``unix:PATH``).

The current directory is importable, as with gunicorn.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .. import __version__
from .config import MAX_THREADS, ServerConfig
from .fdlimit import raise_open_files_limit
from .interrupt import ExitGuard
from .libevent_ctypes import LibeventMissing
from .listen import unix_path
from .logwriter import (
    LOG_DATE_FORMAT,
    LOG_FORMAT,
    StderrHandler,
    exit_if_stuck,
    forward_in_background,
    log_to_stderr,
)
from .proxies import TrustedProxies
from .server import Server


def parse_addrport(value: str) -> tuple[str, int] | str:
    """(host, port), or the path of a ``unix:PATH`` address."""
    path = unix_path(value)
    if path is not None:
        if not path:
            raise argparse.ArgumentTypeError("unix: needs a path, as in unix:/run/comet.sock")
        return path
    host, sep, port = value.rpartition(":")
    if not sep:
        host = ""
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise argparse.ArgumentTypeError(f"{value!r}: an IPv6 address goes in brackets, [::1]:8000")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a valid port or address:port")
    return host, int(port)


def threads_count(value: str) -> int:
    if not value.isdigit() or int(value) > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"{value!r} is not from 0 to {MAX_THREADS}")
    return int(value)


def trusted_proxies(value: str) -> TrustedProxies:
    try:
        return TrustedProxies(entry for entry in value.split(",") if entry.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def load_app(spec: str) -> object:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"error: {spec!r} is not MODULE:CALLABLE")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        app = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # The module itself, or a package on its way to it (a typo): one line.  An
        # import inside it that fails is the app's error: its traceback says where.
        if exc.name is None or not f"{module_name}.".startswith(f"{exc.name}."):
            raise
        raise SystemExit(f"error: cannot import {module_name!r}: {exc}") from None
    for part in attr.split("."):
        try:
            app = getattr(app, part)
        except AttributeError:
            raise SystemExit(f"error: {module_name!r} has no {attr!r}") from None
    if not callable(app):
        raise SystemExit(f"error: {spec} is not callable")
    return app


def load_app_printing_its_log(spec: str) -> object:
    """``load_app``, with what is logged meanwhile printed as the server's log is (INFO
    and up), but from no handler on the root logger: an app's own
    ``logging.basicConfig()`` found one there, and did nothing."""
    logging.root.setLevel(logging.INFO)  # (the app's configuration may set another)
    printer = StderrHandler()  # (for records that find no handler: none configured yet)
    printer.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
    printer.addFilter(not_printed_on_the_way)
    last_resort, logging.lastResort = logging.lastResort, printer
    try:
        return load_app(spec)
    finally:
        logging.lastResort = last_resort


def not_printed_on_the_way(record: logging.LogRecord) -> bool:
    """Whether no console handler printed a record on its way up to the root logger,
    where this command prints the app's logging too: Django's `django` logger has one of
    its own under DEBUG, and each error was printed twice.  (Under DEBUG = False that
    handler prints nothing, and neither does a handler whose level or filter refuses the
    record, or one that writes to a file: the record is printed here.)"""
    logger: logging.Logger | None = logging.getLogger(record.name)
    consoles = (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
    while logger is not None and logger is not logging.root:
        for each in logger.handlers:
            for handler in getattr(each, "handlers", [each]):  # (a ForwardingHandler's)
                if (
                    getattr(handler, "stream", None) in consoles
                    and record.levelno >= handler.level
                    and handler.filter(record)
                ):
                    return False
        logger = logger.parent if logger.propagate else None
    return True


def keep_server_logs() -> None:
    """The app's import may have configured logging (a Django project's LOGGING, a
    ``basicConfig``): a ``dictConfig`` disables the loggers it does not name, the
    server's among them.  The server's loggers log again, from a thread of their own:
    to the handlers the configuration gave them or the root logger, or else (with the
    app's records, as runcomet does) to stderr."""
    for name, each in list(logging.root.manager.loggerDict.items()):
        if name.partition(".")[0] == "django_comet" and isinstance(each, logging.Logger):
            each.disabled = False
    ours = not logging.root.handlers
    if ours:  # (the app configured no root handler)
        stderr = log_to_stderr(logging.root, LOG_FORMAT, LOG_DATE_FORMAT)
        stderr.addFilter(not_printed_on_the_way)
    server = logging.getLogger("django_comet")
    if not ours and server.level == logging.NOTSET:
        server.setLevel(logging.INFO)  # (the access log: --no-access-log turns it off)
    if not ours or any(
        isinstance(each, logging.Logger) and each.handlers
        for name, each in logging.root.manager.loggerDict.items()
        if name.partition(".")[0] == "django_comet"
    ):
        forward_in_background(server)  # the project's handlers: from a thread


def project_config() -> ServerConfig:
    """The server's options from the COMET_* settings when the app is a Django project
    with django_comet installed (its side of a held response reads them: a stream's
    first frame announced the project's heartbeat interval while the server beat at the
    default, and comet.js reopened the stream every three announced intervals); else
    the defaults.  (Django is imported here only when the app imported it already.)"""
    conf = sys.modules.get("django.conf")
    if conf is None or not conf.settings.configured:
        return ServerConfig()
    from django.apps import apps

    if not apps.ready or not apps.is_installed("django_comet"):
        return ServerConfig()
    from ..conf import comet_settings

    errors = comet_settings.errors()
    if errors:
        raise SystemExit(f"error: {errors[0]}")
    return comet_settings.server_config()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m django_comet.evloop",
        description="Serve any WSGI callable on libevent (the current directory is "
        "importable, as with gunicorn).",
    )
    parser.add_argument("--version", action="version", version=f"django-comet {__version__}")
    parser.add_argument("app", help="MODULE:CALLABLE of a WSGI application")
    parser.add_argument(
        "addrport",
        nargs="?",
        default="8000",
        type=parse_addrport,
        help="[HOST:]PORT or unix:PATH to listen on (default 127.0.0.1:8000)",
    )
    parser.add_argument(
        "--threads",
        type=threads_count,
        help=f"worker threads for the application (0: run it in the loop thread; default "
        f"{ServerConfig.threads}, or a Django project's COMET_THREADS)",
    )
    parser.add_argument(
        "--trusted-proxies",
        type=trusted_proxies,
        metavar="LIST",
        help="comma-separated addresses or networks (10.0.0.0/8) of reverse proxies whose "
        "X-Forwarded-For and X-Forwarded-Proto are believed (default: none, or a Django "
        "project's COMET_TRUSTED_PROXIES)",
    )
    parser.add_argument("--no-access-log", action="store_true", help="do not log each request")
    args = parser.parse_intermixed_args(argv)  # options may come before or after addrport
    app = load_app_printing_its_log(args.app)
    keep_server_logs()
    config = project_config()
    config.access_log = not args.no_access_log
    if args.threads is not None:
        config.threads = args.threads
    if args.trusted_proxies is not None:
        config.trusted_proxies = args.trusted_proxies
    raise_open_files_limit(config.max_connections)
    if isinstance(args.addrport, str):
        config.unix_socket = args.addrport
        where = f"unix:{config.unix_socket}"
    else:
        config.host, config.port = args.addrport
        host = f"[{config.host}]" if ":" in config.host else config.host
        where = f"{host}:{config.port}"
    try:
        server = Server(app, config)  # type: ignore[arg-type]
    except OSError as exc:
        raise SystemExit(f"error: cannot listen on {where}: {exc.strerror or exc}") from None
    except LibeventMissing as exc:
        raise SystemExit(f"error: {exc}") from None
    if not server.unix:
        host = f"[{config.host}]" if ":" in config.host else config.host
        where = f"http://{host}:{server.address[1]}/"
    exit_guard = ExitGuard()  # (before the server's signal handlers)
    server.handle_signals()  # before the banner: a stop signal from then on drains
    print(f"Serving {args.app} on {where} ({config.threads or 'no'} threads)", flush=True)
    server.serve_forever()
    exit_if_stuck(0)
    exit_guard.arm(0)


if __name__ == "__main__":
    main()

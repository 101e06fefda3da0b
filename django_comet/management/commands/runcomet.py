"""``manage.py runcomet [addrport]``: runserver's interface, served by the comet server.

Argument forms, autoreload, --ipv6, and (with staticfiles) --nostatic/--insecure are
runserver's own; this command swaps the server for django_comet's libevent server.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import django
from django.apps import apps
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management import get_commands, load_command_class
from django.core.management.base import CommandError, CommandParser
from django.db import connections
from django.utils import autoreload

from ... import __version__
from ...brokers import get_broker
from ...conf import comet_settings
from ...evloop import Server, libevent_ctypes
from ...evloop.config import MAX_THREADS, ServerConfig
from ...evloop.fdlimit import raise_open_files_limit
from ...evloop.interrupt import ExitGuard, StopWhileStarting
from ...evloop.listen import listen_socket, remove_unix_socket, unix_path, unix_socket_id
from ...evloop.logwriter import (
    LOG_DATE_FORMAT,
    LOG_FORMAT,
    exit_if_stuck,
    flush_all,
    forward_in_background,
    log_to_stderr,
)
from ...evloop.prefork import BOOT_FAILED, Supervisor, parent_gone
from ..autoreloading import DrainBeforeRestart, say_loaded, start_again_after_failed_edits

if apps.is_installed("django.contrib.staticfiles"):
    from django.contrib.staticfiles.management.commands.runserver import (
        Command as RunserverCommand,
    )
else:  # pragma: no cover - demo_site and tests have staticfiles
    from django.core.management.commands.runserver import (  # type: ignore[assignment]
        Command as RunserverCommand,
    )

_ERRORS = {
    errno.EACCES: "You don't have permission to access that port.",
    errno.EADDRINUSE: "That port is already in use.",
    errno.EADDRNOTAVAIL: "That IP address can't be assigned to.",
}


class Command(RunserverCommand):
    help = "Starts the django-comet server (libevent) for this Django project."
    comet_server_cls = Server
    # Set by runserver's handle() from the addrport argument.
    addr: str
    port: str
    use_ipv6: bool
    _raw_ipv6: bool
    unix_socket: str | None = None  # from a unix:PATH addrport, instead of addr and port
    _socket_id: tuple[int, int] | None = None  # that socket file's, to remove only it
    config: ServerConfig  # built by run(), in the main thread

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        # runserver's help for two of its arguments, said as runcomet understands them.
        for action in parser._actions:
            if action.dest == "addrport":
                action.help = (
                    "Optional port number, or ipaddr:port, or unix:PATH for a Unix socket "
                    "(default 127.0.0.1:8000)."
                )
            elif action.dest == "use_threading":
                action.help = "Run views in the event loop thread: the same as --threads 0."
        if parser.get_default("use_static_handler") and not _project_serves_static():
            # (whitenoise.runserver_nostatic: static files are the project's middleware's)
            parser.set_defaults(use_static_handler=False)
        parser.add_argument(
            "--threads",
            type=int,
            default=None,
            help="Threads running views (default: COMET_THREADS or 8). "
            "0 runs views in the event loop thread, as the 2007 original did.",
        )
        parser.add_argument(
            "--workers",
            type=int,
            default=1,
            help="Pre-fork this many worker processes sharing the port (needs --noreload "
            "and a shared COMET_BROKER such as postgres:// or redis://).",
        )
        parser.add_argument(
            "--no-access-log",
            action="store_true",
            dest="no_access_log",
            help="Do not log one line per request.",
        )

    _starting: StopWhileStarting | None = None  # (set by handle())

    def get_version(self) -> str:
        return f"django-comet {__version__} (Django {django.get_version()})"

    def run_from_argv(self, argv: list[str]) -> None:
        super().run_from_argv(_negative_values_attached(argv))

    def server_config(self, **options: Any) -> Any:
        threads = options.get("threads")
        if not options.get("use_threading", True):  # runserver's --nothreading
            if threads not in (None, 0):
                raise CommandError("--nothreading is --threads 0: give one or the other.")
            threads = 0
        if threads is not None and not 0 <= threads <= MAX_THREADS:
            raise CommandError(f"--threads must be from 0 to {MAX_THREADS}.")
        return comet_settings.server_config(
            host=self.addr,
            port=int(self.port),
            threads=threads,
            access_log=not options.get("no_access_log", False),
            unix_socket=self.unix_socket,
            ipv6=bool(self.use_ipv6) and not self.unix_socket,
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not options["use_reloader"]:  # (the reloader's parent keeps Django's ways)
            self._starting = StopWhileStarting()  # a container's PID 1: stops until served
        workers = options.get("workers", 1)
        if workers < 1:
            raise CommandError("--workers must be 1 or more.")
        if workers > 1:
            if options["use_reloader"]:
                raise CommandError("--workers needs --noreload (the autoreloader cannot fork).")
            if urlsplit(str(comet_settings.BROKER)).scheme == "memory":  # (case-blind)
                raise CommandError(
                    "--workers above 1 needs a shared broker: with COMET_BROKER = 'memory://' "
                    "events published in one worker would never reach the others. Set "
                    "COMET_BROKER to postgres://... or redis://..."
                )
        self.unix_socket = unix_path(options.get("addrport") or "")
        if self.unix_socket is not None:
            if not self.unix_socket:
                raise CommandError("unix: needs a path, as in unix:/run/comet.sock")
            if options.get("use_ipv6"):
                raise CommandError("--ipv6 does not apply to a Unix socket.")
            options["addrport"] = None  # runserver's parser knows only addresses and ports
        super().handle(*args, **options)

    def run(self, **options: Any) -> None:
        """Check what can be wrong with the address and the settings here, in the main
        thread: under the autoreloader, inner_run's errors come from a thread (a
        traceback, and a process left serving nothing)."""
        restarted = os.environ.get(autoreload.DJANGO_AUTORELOAD_ENV) == "true"
        if restarted:
            say_loaded()  # (to the reloader's process: the project loaded)
        if not self.unix_socket and not 0 <= int(self.port) <= 65535:
            raise CommandError(f'"{self.port}" is not a valid port number.')
        try:  # (an edit cannot fix it: the autoreloader need not wait for one)
            libevent_ctypes.load()
        except libevent_ctypes.LibeventMissing as exc:
            raise CommandError(str(exc)) from None
        # A setting's error is one line here, at startup (in the reloader's parent too).
        # In a server the reloader restarted after an edit, it is raised in inner_run
        # instead, as runserver's are, so that the reloader waits for the fix (an error
        # here ended it, though the edit that caused it was to a file it watches).
        self._settings_error: CommandError | None = None
        self._socket_id = None
        try:
            errors = comet_settings.errors()  # (all of them, whatever --skip-checks says)
            if errors:
                raise ValueError("; ".join(errors))
            self.config = self.server_config(**options)
            get_broker()
        except (TypeError, ValueError, ImproperlyConfigured) as exc:
            self._settings_error = CommandError(
                f"A COMET_* setting is invalid ({exc}); `manage.py check` names it."
            )
            if not (options["use_reloader"] and restarted):
                raise self._settings_error from None
        if options["use_reloader"] and not restarted:
            start_again_after_failed_edits()
        try:
            super().run(**options)
        finally:
            # Under the autoreloader the server runs in a daemon thread, which a stop
            # signal ends with the process, before it could remove its socket file.
            if self.unix_socket and self._socket_id is not None:
                remove_unix_socket(self.unix_socket, self._socket_id, still_listening=True)

    def inner_run(self, *args: Any, **options: Any) -> None:
        autoreload.raise_last_exception()
        if self._settings_error is not None:
            raise self._settings_error
        config = self.config
        if not options["skip_checks"]:
            self.stdout.write("Performing system checks...\n\n")
            self.check(display_num_errors=True)
        self.check_migrations()
        for conn in connections.all(initialized_only=True):
            conn.close()
        handler = _refusing_escapes(self.get_handler(*args, **options))
        # After get_handler: importing the project's wsgi.py runs django.setup() again,
        # which applies LOGGING again and, by default, disables every logger it does not
        # name, ours included (the access log, the server's errors).
        _configure_logging(config.access_log)
        try:
            libevent_ctypes.load()
            sock = listen_socket(config)
        except libevent_ctypes.LibeventMissing as exc:
            self._fail(str(exc))
        except socket.gaierror as exc:  # (an OSError whose errno is no errno)
            self._fail(f"Cannot resolve {config.host!r}: {exc.strerror or exc}")
        except OSError as exc:
            if config.unix_socket:
                self._fail(f"Cannot listen on unix:{config.unix_socket}: {exc.strerror or exc}")
            self._fail(_ERRORS.get(exc.errno or 0, str(exc)))
        self._socket_id = unix_socket_id(config.unix_socket) if config.unix_socket else None
        # Once listening: a start that fails says so in one line, and that line only.
        raise_open_files_limit(config.max_connections)
        workers = options.get("workers", 1)
        if workers > 1:
            self._run_workers(workers, sock, handler, config)
            return
        try:
            server = self.comet_server_cls(handler, config, sock=sock)
        except (TypeError, ValueError) as exc:  # a setting --skip-checks let through
            self._fail(f"Cannot start the server ({exc}); `manage.py check` names the setting.")
        except (RuntimeError, MemoryError, OSError) as exc:  # no thread, memory, descriptor
            self._fail(f"Cannot start the server: {exc or type(exc).__name__}")
        get_broker().start_listening(server.loop)
        in_main_thread = threading.current_thread() is threading.main_thread()
        # Under the autoreloader this runs in a thread: Ctrl-C then ends the process as
        # it does runserver; with --noreload, SIGINT/SIGTERM drain gracefully, from the
        # banner on.
        reload = DrainBeforeRestart(server)
        if self._starting is not None:
            self._starting.done()
        exit_guard = ExitGuard()  # (before the server's signal handlers)
        if in_main_thread:
            server.handle_signals()
        else:
            reload.install()
        self.on_bind(server.address[1], server)
        try:
            server.serve_forever(handle_signals=in_main_thread)
        finally:
            reload.stopped.set()
        if config.unix_socket:
            remove_unix_socket(config.unix_socket, self._socket_id)
            self._socket_id = None
        if reload.asked:
            return  # the autoreloader's thread ends the process, for its restart
        self._say_stopped()
        if not in_main_thread:
            logging.shutdown()  # (what waits to be logged: no atexit after os._exit)
            os._exit(0)
        exit_guard.arm(0)  # (an async view still awaiting: its thread is joined at exit)

    def _run_workers(self, workers: int, sock: Any, handler: Any, config: Any) -> None:
        port = 0 if config.unix_socket else sock.getsockname()[1]

        config.multiprocess = True
        parent = os.getpid()

        def child(number: int) -> None:
            try:
                server = self.comet_server_cls(handler, config, sock=sock)
            except Exception:  # (out of descriptors, of memory): its siblings would be too
                logging.getLogger("django_comet.server").exception(
                    "Worker %d could not start", number
                )
                sys.exit(BOOT_FAILED)
            server.share_figures(figures, number)
            get_broker().start_listening(server.loop)
            server.serve_forever(handle_signals=True, worker=True)
            if parent_gone(parent):  # orphaned: the parent cannot remove the directory
                _leave_figures(figures, number)

        # Once stopping, the parent lets go of the socket: when the workers have too, a
        # successor can bind the address while they drain.
        supervisor = Supervisor(workers, child, config.grace, on_stop=sock.close)
        # A stop signal from the banner on (or while the directory exists) stops the
        # server gracefully: it no longer kills the parent before it handles signals.
        if self._starting is not None:
            self._starting.done()
        supervisor.handle_signals()
        try:
            figures = tempfile.mkdtemp(prefix="django-comet-figures-")
        except OSError as exc:  # (a container's read-only root, with no tmpfs on /tmp)
            self._fail(
                f"--workers needs a writable temporary directory for the workers' figures "
                f"(TMPDIR, else /tmp: in a container, --tmpfs /tmp): {exc.strerror or exc}"
            )
        try:
            self.on_bind(port, None, workers=workers, threads=config.threads)
            supervisor.run()
        finally:
            shutil.rmtree(figures, ignore_errors=True)
        if config.unix_socket:
            remove_unix_socket(config.unix_socket, self._socket_id)
            self._socket_id = None
        if supervisor.boot_failed:
            self._fail("A worker could not start (its error is above); the server stopped.")
        self._say_stopped()

    def _say_stopped(self) -> None:
        """The last word of a clean stop, unless no one reads it any more (stdout a pipe
        whose reader is gone: a log shipper that died, ``| head``; a terminal that
        closed, which sent the SIGHUP that stopped it: EIO), which is no failure of the
        server's: it still exits 0."""
        _flush_log()  # ("Stopping: ..." comes first: the log is written by a thread)
        try:
            self.stdout.write("Stopped.")
            self.stdout.flush()
        except (OSError, ValueError):  # (ValueError: a stream closed)
            with contextlib.suppress(OSError):  # what is left unflushed goes nowhere
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        exit_if_stuck(0)  # (the project's log handlers stuck on a stderr nobody reads)

    def _fail(self, message: str) -> None:
        _flush_log()  # (a worker's own error, "Worker 0 could not start", comes first)
        if threading.current_thread() is threading.main_thread():
            raise CommandError(message)
        self.stderr.write(f"Error: {message}")
        exit_if_stuck(1)
        logging.shutdown()
        os._exit(1)  # sys.exit cannot end the process from the autoreloader's thread

    def on_bind(  # type: ignore[override]
        self, server_port: int, server: Any = None, workers: int = 1, threads: int = 0
    ) -> None:
        quit_command = "CTRL-BREAK" if sys.platform == "win32" else "CONTROL-C"
        addr = (
            f"[{self.addr}]" if self._raw_ipv6 else ("0.0.0.0" if self.addr == "0" else self.addr)
        )
        where = (
            f"unix:{self.unix_socket}"
            if self.unix_socket
            else f"{self.protocol}://{addr}:{server_port}/"
        )
        libevent = libevent_ctypes.lib().event_get_version().decode()
        if server is not None:
            backend = libevent_ctypes.lib().event_base_get_method(server.loop.base).decode()
            shape = f"{backend}, {server.config.threads} threads"
        else:
            shape = f"{workers} workers of {threads} threads"
        self.stdout.write(
            f"{datetime.now().strftime('%B %d, %Y - %X')}\n"
            f"Django version {django.get_version()}, using settings {settings.SETTINGS_MODULE!r}\n"
            f"Starting comet server (django-comet {__version__}, libevent {libevent}, {shape}) "
            f"at {where}\n"
            f"Quit the server with {quit_command}."
        )
        self.stdout.write(
            self.style.WARNING(
                "WARNING: django-comet's server has not been reviewed for production use; "
                "see its README before exposing it."
            )
        )
        self.stdout.flush()


def _project_serves_static() -> bool:
    """Whether the project's own ``runserver`` serves static files by default.  An app
    listed before staticfiles may override runserver to say no (WhiteNoise's
    ``runserver_nostatic``, so that its middleware serves them, hashed names, ranges and
    compressed variants included): runcomet follows it."""
    app = get_commands().get("runserver")
    if app in (None, "django.core", "django.contrib.staticfiles"):
        return True
    try:
        command = load_command_class(app, "runserver")
        if isinstance(command, Command):  # (runcomet as the project's runserver)
            return True
        parser = command.create_parser("manage.py", "runserver")
    except (Exception, SystemExit):  # (its own problem, which its runserver would show)
        return True
    return parser.get_default("use_static_handler") is not False


def _negative_values_attached(argv: list[str]) -> list[str]:
    """``--threads -1`` as ``--threads=-1``: runserver's ``-6`` option makes argparse
    take any ``-<digits>`` for an option, so the value was "missing" instead of refused
    with the option's own message."""
    joined: list[str] = []
    for arg in argv:
        if joined and joined[-1] in _NUMERIC_OPTIONS and arg[:1] == "-" and arg[1:].isdigit():
            joined[-1] += "=" + arg
        else:
            joined.append(arg)
    return joined


_NUMERIC_OPTIONS = ("--threads", "--workers")


def _refusing_escapes(handler: Any) -> Any:
    """Static files (DEBUG, --insecure): a path that leaves the static root ("/static/../
    settings.py") is refused with 400, logged on django.security as Django does for a
    view.  Django's static handler catches only Http404: it was a 500 with a traceback."""
    if not apps.is_installed("django.contrib.staticfiles"):
        return handler
    from django.contrib.staticfiles.handlers import StaticFilesHandler
    from django.core.exceptions import SuspiciousOperation
    from django.core.handlers.exception import response_for_exception

    if type(handler) is not StaticFilesHandler:
        return handler

    class RefusingEscapes(StaticFilesHandler):
        def get_response(self, request: Any) -> Any:
            try:
                return super().get_response(request)
            except SuspiciousOperation as exc:
                return response_for_exception(request, exc)

    return RefusingEscapes(handler.application)


def _leave_figures(directory: str, number: int) -> None:
    """A worker stopping after its parent died (killed: the kernel's SIGTERM): remove
    its figures file, and the directory once that leaves it empty.  Each orphaned worker
    does so as it ends, so the last one removes the directory."""
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(directory, f"{number}.json"))
    with contextlib.suppress(OSError):
        os.rmdir(directory)


def _configure_logging(access_log: bool) -> None:
    """Send django_comet's logs to stderr like runserver's, unless LOGGING gave them handlers
    (its own, or the root logger's: then they go there).  Either way they are handled by
    a thread of their own (logwriter.py), never by the loop thread."""
    logger = logging.getLogger("django_comet")
    named = getattr(settings, "LOGGING", {}).get("loggers", {})
    for name, each in logging.root.manager.loggerDict.items():
        if (
            name.partition(".")[0] == "django_comet"
            and isinstance(each, logging.Logger)
            and name not in named
        ):
            each.disabled = False  # LOGGING did not mean these: it does not name them
    if not logger.handlers and logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO if access_log else logging.WARNING)
    # LOGGING's handlers (the logger's own, its children's, the root logger's): to them.
    to_its_handlers = logger.hasHandlers()
    forward_in_background(logger)
    if to_its_handlers:
        return
    log_to_stderr(logger, LOG_FORMAT, LOG_DATE_FORMAT)  # (never waits: logwriter.py)
    logger.propagate = False


def _flush_log() -> None:
    """What the server logged is written out (a bounded wait: stderr may not be read
    any more) before runcomet's last word: its log is written by threads of its own."""
    flush_all()

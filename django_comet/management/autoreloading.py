"""What runcomet adds to Django's autoreloader (``django.utils.autoreload``).

- In the serving process: an edit that restarts it first ends its held responses as a
  stop does (a stream's ``retry:``, a poll's answer) and gives requests in flight a
  moment; they were all cut.
- In the reloader's process: a server that fails to start again after an edit is
  started again at the next change.  runserver waits for the fix in the failing process;
  for any other command Django sets the apps up before the command's code runs, so an
  app that no longer loads (a typo in ``INSTALLED_APPS``, an error in ``ready()``, in a
  ``models.py``, in ``LOGGING``) ended the reloader with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import site
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from django.apps import apps
from django.utils import autoreload

from ..evloop.interrupt import ExitGuard
from ..evloop.logwriter import exit_if_stuck
from ..evloop.server import POOL_SHUTDOWN_WAIT

if TYPE_CHECKING:
    from ..evloop import Server

logger = logging.getLogger("django_comet.server")

# Seconds an edit under the autoreloader gives requests in flight before the restart.
RELOAD_GRACE = 2.0
# Names the file the serving process touches once runcomet's code runs in it.
LOADED_ENV = "DJANGO_COMET_LOADED_MARK"
# Python files of the project watched while the reloader waits for a fix (and
# directories looked through for them).
PROJECT_FILES = 10_000


class DrainBeforeRestart:
    """In the serving process, under the autoreloader: the restart an edit asks for
    drains the server first, in the autoreloader's thread (Django's ``trigger_reload``,
    called once the edit is known to restart the process: its own receivers of
    ``file_changed`` cancel the restart for a template or a translation, and the server
    must then go on)."""

    def __init__(self, server: Server):
        self.server = server
        self.asked = False
        self.stopped = threading.Event()
        self._draining = threading.Event()

    def install(self) -> None:
        restart = autoreload.trigger_reload
        exit_guard = ExitGuard()

        def drain_then_restart(filename: str) -> None:
            self.asked = True
            # The grace, then the server's closing (its view threads), with room to spare:
            # a response cut then must still get its access-log line.
            deadline = time.monotonic() + RELOAD_GRACE + POOL_SHUTDOWN_WAIT + 2
            self.server.loop.call_soon_threadsafe(self._drain, Path(filename).name)
            if not self._draining.wait(RELOAD_GRACE):
                # (--threads 0: a view running in the loop thread, which nothing here can
                # interrupt; the process goes at the wait's end, cutting what it holds.)
                logger.warning(
                    "Reloading waits for a view running in the loop thread (--threads 0); "
                    "held responses will be cut if it does not end within %g s.",
                    POOL_SHUTDOWN_WAIT + 2,
                )
            self.stopped.wait(max(0.0, deadline - time.monotonic()))
            exit_if_stuck(3)  # (3: the autoreloader's "restart me")
            exit_guard.arm(3)  # (an async view still awaiting: its thread is joined at exit)
            restart(filename)

        autoreload.trigger_reload = drain_then_restart

    def _drain(self, name: str) -> None:
        self._draining.set()
        self.server.shutdown(RELOAD_GRACE, f"Reloading ({name} changed)")


def start_again_after_failed_edits() -> None:
    """In the reloader's process: when the serving process exits with an error before
    runcomet's code ran (Django's setup failed: the project no longer loads), wait for
    the next change and start it again.  One that got as far (a port in use, a crash
    later) ends the reloader, as it ends runserver's.  Django's loop, restarting the
    serving process for as long as it asks with status 3, is this one's (Django's own
    cannot say which of its processes got how far)."""

    def restart_until_it_ends_well() -> int:
        args = autoreload.get_child_arguments()
        handle, name = tempfile.mkstemp(prefix="django-comet-loaded-")
        os.close(handle)
        loaded = Path(name)
        environ = {**_child_environ(), LOADED_ENV: name}
        try:
            while True:
                loaded.unlink(missing_ok=True)
                code = subprocess.run(args, env=environ, close_fds=False).returncode
                if code == 3:  # (an edit: "restart me")
                    continue
                if code <= 0 or loaded.exists():  # (negative: ended by a signal)
                    return code
                sys.stderr.write(
                    "The server could not load the project (above). It starts again when "
                    "a Python file of the project changes; Ctrl-C to quit.\n"
                )
                sys.stderr.flush()
                _wait_for_a_change()
        finally:
            loaded.unlink(missing_ok=True)

    autoreload.restart_with_reloader = restart_until_it_ends_well


def say_loaded() -> None:
    """In the serving process, once runcomet's code runs: the project loaded."""
    name = os.environ.get(LOADED_ENV)
    if name:
        with contextlib.suppress(OSError):
            Path(name).touch()


def _child_environ() -> dict[str, str]:
    """The serving process's environment, as Django's reloader makes it (an interpreter
    started with -u starts it unbuffered too)."""
    environ = {**os.environ, autoreload.DJANGO_AUTORELOAD_ENV: "true"}
    for option in getattr(sys, "orig_argv", [])[1:]:
        if not option.startswith("-"):
            break  # (the script: the interpreter's options come before it)
        flags = option[1:]
        if not option.startswith(("--", "-X", "-W")) and flags.isalpha() and "u" in flags:
            environ.setdefault("PYTHONUNBUFFERED", "1")
    return environ


def _wait_for_a_change() -> None:
    """Until Django's reloader sees a change to a module this process loaded (the
    settings, the apps' modules) or to a Python file of the project (one the failed
    start imported first, perhaps of an app new since this process started); its
    ``trigger_reload`` ends the wait with ``SystemExit(3)``."""
    reloader = autoreload.get_reloader()
    reloader.extra_files.update(_project_files())
    autoreload.autoreload_started.send(sender=reloader)
    try:
        reloader.run_loop()
    except SystemExit as exc:
        if exc.code != 3:
            raise


def _project_files() -> list[Path]:
    """The Python files under the project's directories as they are now: the import
    path's first one (manage.py's), its apps', the rest of the import path's; not under
    the interpreter, a virtual environment, site-packages, a hidden directory or
    ``node_modules``, nor under a directory holding the interpreter (``/``); at most
    ``PROJECT_FILES`` of them (looked at once a second), in as many directories."""
    libraries = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, *site.getsitepackages())}
    interpreter = Path(sys.base_prefix).resolve()
    roots = dict.fromkeys(  # (in this order, once each)
        [
            *(Path(entry or ".").resolve() for entry in sys.path[:1]),
            *(Path(config.path).resolve() for config in apps.get_app_configs()),
            *(Path(entry or ".").resolve() for entry in sys.path[1:]),
        ]
    )
    found: list[Path] = []
    walked = 0
    for root in roots:
        if (
            not root.is_dir()
            or interpreter.is_relative_to(root)
            or any(root.is_relative_to(library) for library in libraries)
        ):
            continue
        for directory, subdirectories, files in os.walk(root):
            walked += 1
            subdirectories[:] = [
                name
                for name in subdirectories
                if not (name.startswith(".") or name in ("node_modules", "__pycache__"))
                and Path(directory, name) not in libraries
                and not os.path.exists(os.path.join(directory, name, "pyvenv.cfg"))
            ]
            found.extend(Path(directory, name) for name in files if name.endswith(".py"))
            if len(found) >= PROJECT_FILES or walked >= PROJECT_FILES:
                logger.warning(
                    "Watching the first %d Python files of the project only.", len(found)
                )
                return found[:PROJECT_FILES]
    return found

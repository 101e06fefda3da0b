"""runcomet under Django's autoreloader: an edit drains the server before the restart,
a template edit restarts nothing, and a restart that fails waits for the fix."""

import contextlib
import json
import os
from pathlib import Path

import requests

from .processes import BANNER, ServerProcess, read_chunked, runcomet, wait_until
from .publishing import publish, subscribed
from .sse_client import SSEClient


def edit(path: Path, text: str | None = None) -> None:
    """Change ``path`` (to ``text``), its modification time later than any before."""
    if text is not None:
        path.write_text(text)
    stat = path.stat()
    os.utime(path, (stat.st_atime, stat.st_mtime + 10))


def edit_until_logged(server: ServerProcess, path: Path, text: str, said: str, times: int):
    """Edit again until the server has logged ``said`` ``times`` times: an edit before
    the autoreloader's first look at the file is not one."""

    def edited() -> bool:
        edit(path, text)
        return server.logged(said, timeout=1, times=times)

    wait_until(edited, 60)


def test_an_edit_under_the_autoreloader_ends_held_responses_properly(demo_db, tmp_path):
    """The restart after an edit ends held responses as a stop does, before the process
    goes (they were cut: no retry:, no last chunk, and no access log line).  A request
    still running when the reload's grace is over is cut, and logged as cut (the
    process went before the line was written)."""
    watched = tmp_path / "watched.py"
    watched.write_text("# edited below\n")
    server = runcomet(db=demo_db, reload=True, env={"TEST_WATCHED_FILE": str(watched)})
    try:
        stream = SSEClient(server, "/t/stream/?channels=reloading")
        poll = server.connect()
        poll.sendall(
            b"GET /t/fastpoll/?channel=reloading&timeout=60 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        slow = server.connect()
        slow.sendall(b"GET /t/sleep/?s=30 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        server.wait_for_status(lambda s: s["held"] == 2 and s["in_flight"] == 4)  # (+ itself)

        def edited():
            # Again until seen: an edit before the autoreloader's first look is not one.
            stat = watched.stat()
            os.utime(watched, (stat.st_atime, stat.st_mtime + 10))
            return server.logged("watched.py changed, reloading", timeout=1)

        wait_until(edited, 30)
        frames = list(stream.frames())
        assert frames[-1].startswith(b"retry: "), frames
        assert stream.ended  # a last chunk, not a cut
        _, chunks = read_chunked(poll)
        assert json.loads(b"".join(chunks))["events"] == []  # as on a timeout: poll again
        stream.close()
        poll.close()
        # The access log has them: they ended, rather than died with the process.
        assert server.logged("GET /t/stream/?channels=reloading")
        assert server.logged("GET /t/fastpoll/?channel=reloading")
        # (not "Stopping", and no "second Ctrl-C": under the autoreloader the first stops)
        assert server.logged("Reloading (watched.py changed): no new connections; ")
        assert not server.logged("a second Ctrl-C", timeout=0)
        slow.settimeout(30)
        assert slow.recv(4096) == b""  # cut
        slow.close()
        assert server.logged("(cut by the server)")
        cut = [line for line in server.output if "(cut by the server)" in line]
        assert len(cut) == 1 and '"GET /t/sleep/?s=30 HTTP/1.1"' in cut[0], cut
        wait_until(lambda: "".join(server.output).count("Starting comet server") == 2, 60)
    finally:
        server.stop()


def test_a_template_edit_under_the_autoreloader_leaves_the_server_serving(demo_db, tmp_path):
    """Django's autoreloader does not restart for a template (it resets the template
    loaders): the server goes on (it drained on any edit, and stayed down)."""
    (tmp_path / "edited.html").write_text("edited below")
    server = runcomet(db=demo_db, reload=True, env={"TEST_TEMPLATE_DIR": str(tmp_path)})
    try:
        with SSEClient(server, "/t/stream/?channels=templates") as stream:
            subscribed(server, "templates")
            assert server.logged("edited.html first seen", timeout=30)
            stat = (tmp_path / "edited.html").stat()
            os.utime(tmp_path / "edited.html", (stat.st_atime, stat.st_mtime + 10))
            assert server.logged("edited.html notified as changed")
            event_id = publish(server, "templates", "still here")
            assert stream.next_event() == {"id": str(event_id), "data": '"still here"'}
    finally:
        server.stop()


def test_a_restart_that_fails_after_an_edit_starts_again_once_the_fix_is_saved(demo_db, tmp_path):
    """An edit that makes the project fail to load (here an app, new since the server
    started, whose models.py raises) fails Django's setup in the restarted process,
    before runcomet's code runs: the reloader's process waits for the next change to a
    Python file of the project, the new app's included, and starts it again, as
    runserver does (runcomet's reloader used to end with it, and then to watch only the
    files it had loaded itself: found by reviews)."""
    extra = tmp_path / "comet_extra_apps.py"
    extra.write_text("EXTRA_APPS = []\n")
    (tmp_path / "newapp").mkdir()
    (tmp_path / "newapp" / "__init__.py").write_text("")
    models = tmp_path / "newapp" / "models.py"
    models.write_text("raise ImportError('newapp is broken')\n")
    server = runcomet(db=demo_db, reload=True, env={"TEST_EXTRA_APPS_FILE": str(extra)})
    try:
        assert requests.get(server.url + "/t/echo/", timeout=10).status_code == 200
        said = "comet_extra_apps.py changed, reloading"
        edit_until_logged(server, extra, "EXTRA_APPS = ['newapp']\n", said, times=1)
        assert server.logged("newapp is broken", timeout=60)
        assert server.logged("It starts again when a Python file of the project changes", 60)
        assert server.proc.poll() is None  # the reloader waits
        edit_until_logged(server, models, "", "models.py changed, reloading", times=1)
        assert server.logged("Starting comet server", timeout=60, times=2)
        banners = [m for line in server.output if (m := BANNER.search(line))]
        answer = requests.get(f"http://127.0.0.1:{banners[-1].group(2)}/t/echo/", timeout=10)
        assert answer.status_code == 200
    finally:
        server.stop()


def test_an_edit_while_a_view_holds_the_loop_thread_says_why_the_restart_waits(demo_db, tmp_path):
    """With --threads 0 a view running in the loop thread holds the drain back, and
    nothing can interrupt it from the reloader's thread: the log says so (the restart
    came 6 s later, silently), and the process restarts anyway."""
    watched = tmp_path / "watched.py"
    watched.write_text("# edited below\n")
    server = runcomet(
        "--threads", "0", db=demo_db, reload=True, env={"TEST_WATCHED_FILE": str(watched)}
    )
    try:
        started = tmp_path / "started"
        slow = server.connect()
        slow.sendall(
            b"GET /t/sleep/?s=60&started=%s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % bytes(started)
        )
        wait_until(started.exists, 30)
        said = "Reloading waits for a view running in the loop thread (--threads 0)"
        edit_until_logged(server, watched, "# edited\n", said, times=1)
        assert server.logged("Starting comet server", timeout=60, times=2)
        slow.settimeout(30)
        assert slow.recv(4096) == b""  # cut with the process
        slow.close()
    finally:
        server.stop()


def test_an_edit_while_an_async_view_awaits_restarts_the_server(demo_db, tmp_path):
    """asgiref runs an async view's coroutine in a thread the interpreter's exit joins:
    the process that was to restart stayed up, serving nothing, until the view
    returned."""
    watched = tmp_path / "watched.py"
    watched.write_text("# edited below\n")
    server = runcomet(db=demo_db, reload=True, env={"TEST_WATCHED_FILE": str(watched)})
    try:
        started = tmp_path / "started"
        waiting = server.connect()
        waiting.sendall(
            b"GET /t/async-sleep/?s=600&started=%s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            % bytes(started)
        )
        wait_until(started.exists, 30)
        edit_until_logged(server, watched, "# edited\n", "watched.py changed, reloading", 1)
        assert server.logged("Starting comet server", timeout=60, times=2)
        assert server.logged("Exiting without waiting for 1 thread(s) still running")
        waiting.settimeout(30)
        assert waiting.recv(4096) == b""  # cut with the process
        waiting.close()
    finally:
        server.stop()


def test_a_server_that_fails_after_it_started_ends_the_reloader(demo_db):
    """Only a process that never got as far as runcomet's code (the project did not
    load) is waited for: one that ends with an error later (a crash, here) ends the
    reloader as runserver's does, rather than leave it waiting for an edit (found by a
    review: the reloader went by the exit status alone)."""
    server = runcomet(db=demo_db, reload=True)
    try:
        with contextlib.suppress(requests.ConnectionError):
            requests.get(server.url + "/t/crash/", timeout=10)
        assert server.proc.wait(30) == 1
        assert not server.logged("could not load the project", timeout=0)
    finally:
        server.stop()

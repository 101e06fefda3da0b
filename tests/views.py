"""Views the tests call through a real runcomet: plain ones (the stages' are in
stage_views.py, the events' in event_views.py)."""

import asyncio
import contextlib
import io
import os
import stat
import tempfile
import time
import weakref

from django.core.files import File
from django.db import connection
from django.db.backends.signals import connection_created
from django.http import FileResponse, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from django_comet import defer_in_time


@csrf_exempt
def echo(request):
    """What Django parsed: method, GET, POST, files, body length, a few META keys."""
    files = {
        name: [f.name, f.size, f.read().decode("latin-1")] for name, f in request.FILES.items()
    }
    return JsonResponse(
        {
            "method": request.method,
            "path": request.path,
            "GET": request.GET.dict(),
            "POST": request.POST.dict(),
            "FILES": files,
            "body_length": len(request.body) if not request.FILES else None,
            "content_length": request.META.get("CONTENT_LENGTH"),
            "cookies": request.COOKIES,
            "remote_addr": request.META.get("REMOTE_ADDR"),
            "server_protocol": request.META.get("SERVER_PROTOCOL"),
            "scheme": request.scheme,
        }
    )


@csrf_exempt
def uploaded(request):
    """The sizes of the uploaded files (Django keeps those over 2.5 MB on disk); with
    ?stage, as the first part of a staged response."""
    response = JsonResponse({name: f.size for name, f in request.FILES.items()})
    if "stage" in request.GET:
        return defer_in_time(response, 0.01, "/t/counted-stage/")
    return response


def crash(request):
    """The serving process ends at once, with status 1 (a crash, after it started)."""
    os._exit(1)


def sleep(request):
    if "started" in request.GET:  # a file the test waits for: the view is running
        open(request.GET["started"], "w").close()
    if "until" in request.GET:  # a file the test makes when the view may end
        deadline = time.monotonic() + 60
        while not os.path.exists(request.GET["until"]) and time.monotonic() < deadline:
            time.sleep(0.01)
    else:
        time.sleep(float(request.GET.get("s", "1")))
    return HttpResponse("slept")


def fork_holder(request):
    """Fork a child that keeps a copy of every descriptor of the server (its listening
    socket among them) until killed, as a pre-forked sibling does.  (A forked child
    closes the server's sockets: the copies it keeps are made before the fork.)"""
    copies = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # (the listing's own, closed by now)
            if stat.S_ISSOCK(os.fstat(int(fd)).st_mode):  # (not the output the tests read)
                copies.append(os.dup(int(fd)))
    pid = forked_child()
    for fd in copies:
        os.close(fd)
    return HttpResponse(str(pid))


def fork_child(request):
    """Fork a child that lives on (until killed), as a view starting a daemon does."""
    return HttpResponse(str(forked_child()))


def forked_child() -> int:
    pid = os.fork()
    if pid == 0:
        quiet = os.open(os.devnull, os.O_WRONLY)  # not the server's output: the tests read
        os.dup2(quiet, 1)  # it to its end, which would wait for this child
        os.dup2(quiet, 2)
        time.sleep(60)
        os._exit(0)
    return pid


def boom(request):
    raise RuntimeError("boom (a test of the 500 path)")


def big(request):
    """A lazily produced 4 MiB body (streamed, no Content-Length), in items of 1 MiB
    (?kib= another size)."""
    size = int(request.GET.get("mb", "4")) * 1024 * 1024
    item = int(request.GET.get("kib", "1024")) * 1024
    return StreamingHttpResponse(b"x" * item for _ in range(size // item))


def big_from_the_database(request):
    """``big``, after a query: the view's thread has its database connection."""
    connection.ensure_connection()
    return big(request)


# Every database connection Django opened in this process, open or closed since.
_connections = weakref.WeakSet()
connection_created.connect(lambda sender, connection, **kwargs: _connections.add(connection))


def open_connections(request):
    """How many of them are open, in any thread (read, not used, from this one)."""
    connection.ensure_connection()  # this thread's, so that it counts too
    return JsonResponse({"open": sum(c.connection is not None for c in list(_connections))})


def pattern(size):
    """The bytes of the test files: a period of 251 shows a misplaced or repeated block."""
    return (bytes(range(251)) * (size // 251 + 1))[:size]


def pattern_file(size):
    path = os.path.join(tempfile.gettempdir(), f"django-comet-test-pattern-{size}")
    if not os.path.exists(path):
        # Written in blocks: one large transient allocation would raise glibc's mmap
        # threshold for the rest of the server's life and blur the RSS checks of others.
        block = pattern(251 * 256)
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), delete=False) as tmp:
            for _ in range(size // len(block)):
                tmp.write(block)
            tmp.write(block[: size % len(block)])
        os.replace(tmp.name, path)
    return path


class ReversingFile(File):
    """A storage's file whose ``read`` changes the bytes (as one that decrypts would)."""

    def read(self, *args):
        return self.file.read(*args)[::-1]


def file_view(request):
    """A FileResponse of the ``size``-byte pattern file from byte ``skip`` on; with
    ``memory=1``, of the same bytes in a BytesIO (no descriptor to send); with
    ``reversing=1``, through a ReversingFile."""
    size, skip = int(request.GET["size"]), int(request.GET.get("skip", "0"))
    if request.GET.get("memory"):
        f = io.BytesIO(pattern(size))
    else:
        f = open(pattern_file(size), "rb")  # noqa: SIM115 (FileResponse closes it)
    f.seek(skip)
    if request.GET.get("reversing"):
        return FileResponse(ReversingFile(f), content_type="application/octet-stream")
    return FileResponse(f, content_type="application/octet-stream")


async def async_view(request):
    """An async view: Django runs it through asgiref's async_to_sync under WSGI."""
    await asyncio.sleep(0)
    return JsonResponse({"async": True, "path": request.path})


async def async_sleep(request):
    """An async view that awaits ``s`` seconds, touching the file ``started`` first: its
    coroutine runs in a thread of asgiref's, which the interpreter's exit joins."""
    if "started" in request.GET:
        open(request.GET["started"], "w").close()
    await asyncio.sleep(float(request.GET.get("s", "1")))
    return HttpResponse("slept")


def paced_big(request):
    """2 MiB items, one every 0.3 s, for a minute; the file ?closed= is written when the
    body is closed."""

    def items():
        try:
            for _ in range(200):
                time.sleep(0.3)
                yield b"p" * (2 * 1024 * 1024)
        finally:
            with open(request.GET["closed"], "w") as f:
                f.write("closed")

    return StreamingHttpResponse(items())


def db_rows(request):
    """?rows= numbered lines of 1 KiB, read from the database as the body goes: the
    cursor needs its view thread's connection until the last row."""
    count = int(request.GET["rows"])
    numbers = (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < %s) "
        "SELECT i FROM n"
    )

    def lines():
        with connection.cursor() as cursor:
            cursor.execute(numbers, [count])
            while rows := cursor.fetchmany(100):
                for (i,) in rows:
                    yield b"%08d%s\n" % (i, b"." * 1015)

    return StreamingHttpResponse(lines())

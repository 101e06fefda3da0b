"""Tiny WSGI apps served by `python -m django_comet.evloop` in the server tests."""

import collections
import gc
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "13")])
    return [b"Hello, world!"]


# Bodies closed, by the X-Tag header of their request: each test counts its own (a
# body may be closed just after its response is out, while the next test begins).
closed: collections.Counter[str] = collections.Counter()


class _Body:
    def __init__(self, parts, environ=None):
        self.parts = parts
        self.tag = (environ or {}).get("HTTP_X_TAG", "")

    def __iter__(self):
        return iter(self.parts)

    def close(self):
        closed[self.tag] += 1


def app(environ, start_response):
    """Routes on PATH_INFO to exercise the WSGI contract."""
    path = environ["PATH_INFO"]
    if path == "/errors":  # ?n characters to wsgi.errors, in one line (as a traceback)
        n = int(environ["QUERY_STRING"] or "10")
        environ["wsgi.errors"].write("E" * n + "\n")
        environ["wsgi.errors"].flush()
        return hello(environ, start_response)
    if path == "/traceback":  # a traceback of ?tag, written in parts (as Bottle does)
        for line in ("Traceback (most recent call last):\n", *["  a frame\n"] * 20):
            environ["wsgi.errors"].write(line)
        environ["wsgi.errors"].write(f"ValueError: {environ['QUERY_STRING']}\n")
        return hello(environ, start_response)
    if path == "/hello":
        return hello(environ, start_response)
    if path == "/rewrite-content-length":  # the environ is the app's to change (PEP 3333)
        environ["CONTENT_LENGTH"] = environ["QUERY_STRING"] or 1234
        return hello(environ, start_response)
    if path.startswith("/environ"):
        body = json.dumps({k: v for k, v in environ.items() if isinstance(v, str)}).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]
    if path == "/gc":
        body = json.dumps({"frozen": gc.get_freeze_count()})
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body.encode()]
    if path == "/write":
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written;")
        return [b"returned"]
    if path == "/write-streaming":  # write() before and while a large body streams
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"A;")

        def body():
            yield b"x" * 300_000  # past the streaming threshold
            write(b"MID;")
            yield b"y"
            write(b"END;")

        return body()
    if path == "/write-then-wait":  # written bytes, then nothing until /release
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"early;")
        _released(environ).wait(60)
        return [b"late"]
    if path == "/write-many":  # ?n writes of 1 MiB, counted as written under X-Tag
        write = start_response("200 OK", [("Content-Type", "application/octet-stream")])
        for _ in range(int(environ["QUERY_STRING"])):
            write(b"W" * (1024 * 1024))
            yielded[environ.get("HTTP_X_TAG", "")] += 1
        return []
    if path == "/write-then-fail":  # exc_info once write() has sent the head: re-raised
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"partial;")
        try:
            raise ValueError("after the head")
        except ValueError:
            start_response("500 Internal Server Error", [], sys.exc_info())
        return [b"never"]
    if path == "/write-forever":  # until write() raises; its exception kept under X-Tag
        write = start_response("200 OK", [("Content-Type", "application/octet-stream")])
        try:
            while True:
                write(b"F" * 65536)
        except Exception as exc:
            write_ended[environ.get("HTTP_X_TAG", "")] = type(exc).__name__
            raise
    if path == "/write-past-length":  # writes on past its length, and past ClientGone
        write = start_response("200 OK", [("Content-Length", "10")])
        try:
            for _ in range(400):
                write(b"x" * 8192)
        except ConnectionError as exc:  # the response is over: the app returns normally
            write_ended[environ.get("HTTP_X_TAG", "")] = type(exc).__name__
        return _Body([], environ)
    if path == "/write-from-thread":  # write() from a thread of the app's own: refused

        def other():
            try:
                write(b"from another thread")
            except Exception as exc:
                write_ended[environ.get("HTTP_X_TAG", "")] = type(exc).__name__

        write = start_response("200 OK", [("Content-Type", "text/plain")])
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        return [b"mine"]
    if path == "/write-ended":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [write_ended.get(environ.get("HTTP_X_TAG", ""), "").encode()]
    if path == "/generator":

        def gen():
            start_response("200 OK", [("Content-Type", "text/plain")])
            yield b"a"
            yield b""
            yield b"b"

        return gen()
    if path == "/closed":  # how many bodies of requests with this X-Tag were closed
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(closed[environ.get("HTTP_X_TAG", "")]).encode()]
    if path == "/close-counter":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _Body([b"counted"], environ)
    if path == "/raise-before":
        raise RuntimeError("before start_response")
    if path == "/exit-before":
        raise SystemExit("a view called sys.exit()")
    if path == "/exit-after":

        def exiting():
            start_response("200 OK", [("Content-Type", "text/plain")])
            yield b"x" * 300_000
            raise SystemExit("sys.exit() while streaming")

        return exiting()
    if path == "/raise-after":

        def gen():
            start_response("200 OK", [("Content-Type", "text/plain")])
            yield b"x" * 300_000  # past the streaming threshold: headers go out
            raise RuntimeError("after the headers")

        return gen()
    if path == "/bad-header":
        start_response("200 OK", [("X-Evil", "a\r\nSet-Cookie: pwned=1")])
        return [b"never"]
    if path == "/bad-status":
        start_response("OK", [])
        return [b"never"]
    if path == "/no-start":
        return [b"never"]
    if path == "/short-length":
        start_response("200 OK", [("Content-Length", "10")])
        return [b"12345"]
    if path == "/exc-info":
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise ValueError("late error")
        except ValueError:
            start_response(
                "503 Service Unavailable", [("Content-Type", "text/plain")], sys.exc_info()
            )
        return [b"replaced"]
    if path == "/stream":

        def gen():
            start_response("200 OK", [("Content-Type", "text/plain")])
            for i in range(3):
                yield b"%d" % i * 200_000

        return gen()
    if path in ("/overlong", "/short-stream"):  # a streamed body off its Content-Length
        length = 10 if path == "/overlong" else 400_000
        start_response("200 OK", [("Content-Length", str(length))])
        return _Body([b"o" * 300_000])  # past the streaming threshold
    if path == "/overlong-items":  # small items of a generator, past Content-Length 10
        start_response("200 OK", [("Content-Length", "10")])
        return (b"%d2345" % i for i in range(3))
    if path == "/with-empties":  # a generator with empty items between its bytes
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (part for part in (b"a", b"", b"b", b"", b"c"))
    if path == "/slow-end":  # a streamed body with a length, whose end comes late

        def gen():
            start_response("200 OK", [("Content-Length", str(300_000))])
            yield b"e" * 300_000  # past the streaming threshold: sent at once
            time.sleep(0.3)  # the app's own work after its last chunk

        return gen()
    if path == "/no-content":  # an app that sends a length and a body with its 204
        start_response("204 No Content", [("Content-Length", "5")])
        return [b"hello"]
    if path == "/raise-later":  # fails after its first part has left, and a pause

        def failing():
            start_response("200 OK", [("Content-Type", "text/plain")])
            yield b"x" * 300_000  # past the streaming threshold: it goes out at once
            time.sleep(0.3)
            raise RuntimeError("failed after the first part had left")

        return failing()
    if path == "/bytes":  # ?N: N bytes, whole, with their length
        size = int(environ["QUERY_STRING"])
        start_response("200 OK", [("Content-Length", str(size))])
        return [b"B" * size]
    if path == "/large":  # 4 MiB in 64 KiB pieces; ?length: with Content-Length; ?304, ?199
        headers = [("Content-Type", "application/octet-stream")]
        if environ["QUERY_STRING"] == "length":
            headers.append(("Content-Length", str(64 * 65536)))
        statuses = {"304": "304 Not Modified", "199": "199 Not Final"}
        status = statuses.get(environ["QUERY_STRING"], "200 OK")
        start_response(status, headers)
        return _Body([b"L" * 65536] * 64, environ)
    if path == "/odd-result":  # a result whose attributes fail with more than AttributeError
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _Touchy([b"never"])
    if path == "/dated":
        start_response("200 OK", [("Date", "Tue, 01 Jan 2030 00:00:00 GMT")])
        return [b"dated"]
    if path == "/empty-str-later":  # "" after streaming began: not bytes, an error
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _Body([b"s" * 300_000, "", b"tail"])
    if path == "/exc-info-after-yield":  # its error page comes after bytes went out

        def gen():
            start_response("200 OK", [("Content-Type", "text/plain")])
            yield b"body-part-one;"
            try:
                raise ValueError("late")
            except ValueError:
                start_response("500 Oops", [("Content-Type", "text/plain")], sys.exc_info())
            yield b"error page"

        return gen()
    if path == "/overlong-large":  # past its Content-Length with more than 1 MiB unsent
        start_response("200 OK", [("Content-Length", "300000")])
        return _Body([b"a" * 100_000] * 3 + [b"x" * 2_000_000], environ)
    if path == "/reset-content":  # a 205 with a body, which must not go out; ?file, ?large
        how = environ["QUERY_STRING"]
        if how == "file":  # by descriptor (sendfile), with the file's length
            start_response(
                "205 Reset Content", [("Content-Length", str(os.path.getsize(__file__)))]
            )
            return environ["wsgi.file_wrapper"](open(__file__, "rb"))
        body = [b"r" * 300_000] if how == "large" else [b"hello world"]  # large: streamed
        start_response("205 Reset Content", [("Content-Length", str(len(body[0])))])
        return iter(body)
    if path == "/head-empty":  # as werkzeug: no length, and no body for a HEAD
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [] if environ["REQUEST_METHOD"] == "HEAD" else [b"content"]
    if path == "/app-close":  # the app asks to close (?its Connection header's value)
        connection = urllib.parse.unquote(environ["QUERY_STRING"]) or "close"
        start_response("200 OK", [("Content-Length", "5"), ("Connection", connection)])
        return [b"hello"]
    if path == "/child-terminated":  # how a process this view starts ends at SIGTERM
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        child.terminate()
        try:
            body = str(child.wait(10)).encode()
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            body = b"ignored SIGTERM"
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]
    if path == "/sleep":  # ?seconds: a view that blocks its thread
        time.sleep(float(environ["QUERY_STRING"]))
        start_response("200 OK", [("Content-Length", "5")])
        return [b"slept"]
    if path == "/body-length":
        body = str(len(environ["wsgi.input"].read())).encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]
    if path == "/rows":  # small items, as a CSV export yields them; counted as yielded
        start_response("200 OK", [("Content-Type", "text/csv")])
        return _Body(_rows(environ.get("HTTP_X_TAG", "")), environ)
    if path == "/yielded":  # how many rows the /rows bodies of this X-Tag yielded
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(yielded[environ.get("HTTP_X_TAG", "")]).encode()]
    if path == "/first-then-wait":  # a first item, then nothing until /release
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _first_then_wait(_released(environ))
    if path == "/first-then-signal":  # as /first-then-wait, released by the client's
        # listener on ?PORT (with --threads 0 no other request is served meanwhile)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _first_then_signal(int(environ["QUERY_STRING"]))
    if path == "/big-item-then-signal":  # ?PORT,SIZE: a first item, then SIZE bytes, then
        port, size = map(int, environ["QUERY_STRING"].split(","))  # as above
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _first_then_signal(port, b"B" * size + b";")
    if path == "/big-first-then-signal":  # ?PORT,SIZE: a first item of SIZE bytes, then
        port, size = map(int, environ["QUERY_STRING"].split(","))  # as above
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _first_then_signal(port, first=b"B" * size + b";")
    if path == "/items-then-count":  # ?COUNT,SIZE, under an X-Tag: see _items_then_count
        count, size = map(int, environ["QUERY_STRING"].split(","))
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return _items_then_count(environ, count, size)
    if path == "/mark":  # counted under its X-Tag
        marked[environ.get("HTTP_X_TAG", "")] += 1
        start_response("200 OK", [("Content-Length", "6")])
        return [b"marked"]
    if path == "/wait-for-release":  # an answer once /release is asked with its X-Tag
        _released(environ).wait(60)
        start_response("200 OK", [("Content-Length", "6")])
        return [b"waited"]
    if path == "/release":
        _released(environ).set()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"released"]
    if path == "/big-then-wait":  # 2 MiB (it pauses once on the way), then nothing
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return _big_then_wait()
    if path == "/ticks":  # a line now and then for ever, as an event stream's heartbeat
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _Body(_ticks(), environ)
    if path == "/bad-deferral":  # "more later", said in a way the server cannot hold
        from django_comet.evloop.deferral import Deferral

        start_response("200 OK", [("Content-Type", "text/plain")])
        body = _Body([b"first;"], environ)
        body.comet_deferral = Deferral(lambda: [b"never;"], delay=1)
        body.comet_deferral.delay = "soon"  # (past the check its constructor makes)
        return body
    if path == "/thread-names":  # ?n pieces of 64 KiB, each naming the thread it came from
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return _thread_names(int(environ["QUERY_STRING"]), environ.get("HTTP_X_TAG", ""))
    if path == "/closed-in":  # the thread that closed the /thread-names body of this X-Tag
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [closed_in.get(environ.get("HTTP_X_TAG", ""), "").encode()]
    if path == "/endless":  # 64 KiB pieces for as long as the client reads them
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return iter(lambda: b"E" * 65536, None)
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found: " + path.encode("latin-1")]


def _thread_names(n, tag):
    try:
        for _ in range(n):
            yield threading.current_thread().name.encode().ljust(65536, b".")
    finally:
        closed_in[tag] = threading.current_thread().name  # close() too: the same thread


closed_in: dict[str, str] = {}  # X-Tag -> the thread that closed a /thread-names body
yielded: collections.Counter[str] = collections.Counter()
marked: collections.Counter[str] = collections.Counter()  # X-Tag -> /mark requests
write_ended: dict[str, str] = {}  # X-Tag -> the exception /write-forever's write() raised
_releases: dict[str, threading.Event] = {}


def _rows(tag):
    while True:
        yielded[tag] += 1
        yield b"%063d\n" % yielded[tag]


def _released(environ) -> threading.Event:
    return _releases.setdefault(environ.get("HTTP_X_TAG", ""), threading.Event())


def _first_then_wait(released):
    yield b"first;"
    released.wait(60)
    yield b"second"


def _first_then_signal(port, then=b"", first=b"first;"):
    yield first
    if then:
        yield then
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.recv(1)  # the client's go (or its close)
    yield b"second"


def _items_then_count(environ, count, size):
    """A first item; then, having sent a request of its own to this server (/mark),
    ``count`` items of ``size`` bytes; then the index of the item at which it first saw
    that request answered (-1: never).  With --threads 0 the loop thread runs both: it
    answers /mark only when it stops pumping this body to serve the others."""
    tag = environ.get("HTTP_X_TAG", "")
    yield b"first;"
    port = int(environ["SERVER_PORT"])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as other:
        other.sendall(b"GET /mark HTTP/1.1\r\nHost: x\r\nX-Tag: %s\r\n\r\n" % tag.encode())
        seen = -1
        for i in range(count):
            if seen < 0 and marked[tag]:
                seen = i
            yield b"x" * size
        yield b";seen=%d;" % seen


def _big_then_wait():
    for _ in range(32):
        yield b"B" * 65536
    threading.Event().wait(60)
    yield b"late"


def _ticks():
    never = threading.Event()
    while True:
        yield b"tick\n"
        never.wait(0.02)


class _Touchy(list):
    """A response iterable whose attribute lookups fail (a proxy object gone wrong)."""

    def __getattr__(self, name):
        raise RuntimeError(f"no {name} here")


class _RaisingClose(_Body):
    def close(self):
        raise RuntimeError("close() failed (a test)")


def raising_close(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return _RaisingClose([b"body before a failing close"])


def dispatch(environ, start_response):
    """app plus a few more routes for the hardening tests."""
    if environ["PATH_INFO"] == "/close-raises":
        return raising_close(environ, start_response)
    return app(environ, start_response)

"""Start real servers for the tests: runcomet (demo_site) or `python -m django_comet.evloop`.

Each server listens on port 0 (the kernel picks a free port) and the helper reads the
port from the startup banner, so tests never race for ports.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import requests

ROOT = Path(__file__).resolve().parent.parent
BANNER = re.compile(
    r"(?:Starting comet server .* at|Serving .* on) (?:http://([^/]+):(\d+)/|unix:(\S+))"
)
# What the banner says of the views' threads: "(epoll, 0 threads)", "(no threads)".
BANNER_THREADS = re.compile(r"\b(\d+|no) threads\)")


class ServerProcess:
    def __init__(
        self,
        argv: list[str],
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
        startup_timeout: float = 90,
    ):
        self.argv = argv
        self.output: list[str] = []
        self._more_output = threading.Condition()
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self._ready = threading.Event()
        self.port = 0
        self.unix = ""  # the socket's path when it listens on unix:PATH
        self._banner = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(startup_timeout) or not (self.port or self.unix):
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.output))
        if "--threads" in argv:  # a test of the loop thread must get the loop thread
            asked = argv[argv.index("--threads") + 1]
            said = BANNER_THREADS.search(self._banner)
            if said is None or said.group(1).replace("no", "0") != asked:
                self.stop()
                raise RuntimeError(f"asked for {asked} threads, the banner says: {self._banner}")
        banner_host = getattr(self, "_banner_host", "")
        self.host = banner_host.strip("[]") if banner_host.startswith("[") else "127.0.0.1"
        self.url = f"http://{banner_host if self.host != '127.0.0.1' else self.host}:{self.port}"

    def logged(self, text: str, timeout: float = 20.0, times: int = 1) -> bool:
        """Whether the server logs a line containing ``text`` (``times`` such lines)
        within ``timeout`` seconds (its output is read on a thread: a line just written
        may not be here yet)."""
        with self._more_output:
            return self._more_output.wait_for(
                lambda: sum(text in line for line in self.output) >= times, timeout
            )

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._more_output:
                self.output.append(line)
                self._more_output.notify_all()
            match = BANNER.search(line)
            if match and not self._ready.is_set():
                self._banner = line
                if match.group(3):
                    self.unix = match.group(3)
                else:
                    self.port = int(match.group(2))
                    self._banner_host = match.group(1)
                self._ready.set()
        self._ready.set()  # EOF: the process ended

    def status(self) -> dict:
        if self.unix:
            with self.connect() as sock:
                sock.sendall(
                    b"GET /comet/status/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                )
                response = b"".join(iter(lambda: sock.recv(65536), b""))
            head, _, body = response.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), head
            return json.loads(body)
        with urllib.request.urlopen(self.url + "/comet/status/", timeout=10) as response:
            return json.load(response)

    def wait_for_status(self, predicate, timeout: float = 10.0) -> dict:
        """Poll /comet/status/ until ``predicate(status)`` holds (an awaited condition,
        with a deadline), and return that status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"status never satisfied the condition: {status}")
            time.sleep(0.02)

    def connect(self) -> socket.socket:
        if self.unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(self.unix)
            return sock
        return socket.create_connection((self.host, self.port), timeout=10)

    def wait_until_refused(self, timeout: float = 10.0) -> None:
        """Until the server stops accepting (its drain has begun), with a deadline."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.connect().close()
            except OSError:
                return
            time.sleep(0.02)
        raise AssertionError("the server never stopped accepting")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def runcomet(
    *args: str,
    settings: str = "tests.settings",
    db: str | None = None,
    env: dict[str, str] | None = None,
    prefix: tuple[str, ...] = (),
    addrport: str = "127.0.0.1:0",
    reload: bool = False,
) -> ServerProcess:
    """``manage.py runcomet --noreload`` (or with its autoreloader) with ``env`` added
    (and ``prefix`` before the interpreter, e.g. prlimit)."""
    env = {
        "DJANGO_SETTINGS_MODULE": settings,
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    if db:
        env["DEMO_DB"] = db
    argv = [
        *prefix,
        sys.executable,
        str(ROOT / "demo_site" / "manage.py"),
        "runcomet",
        *([] if reload else ["--noreload"]),
        *args,
    ]
    argv.append(addrport)
    return ServerProcess(argv, env=env)


def manage(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run ``demo_site/manage.py`` with the tests' settings (and ``env`` added)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "demo_site" / "manage.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
        env={
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "PYTHONPATH": str(ROOT),
            "PATH": "/usr/bin:/bin",
            **(env or {}),
        },
    )


def evloop(
    app: str,
    *args: str,
    cwd: Path = ROOT,
    prefix: tuple[str, ...] = (),
    addrport: str = "127.0.0.1:0",
    env: dict[str, str] | None = None,
) -> ServerProcess:
    env = {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
    return ServerProcess(
        [*prefix, sys.executable, "-m", "django_comet.evloop", app, addrport, *args],
        env=env,
        cwd=cwd,
    )


def get_in_background(url: str, timeout: float = 30) -> concurrent.futures.Future:
    """``requests.get(url)`` on a thread of its own (a request in flight while the test
    stops the server): its Future, whose ``result()`` is the response."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(requests.get, url, timeout=timeout)
    finally:
        pool.shutdown(wait=False)


def read_until_closed(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            more = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not more:
            return out
        out += more


def raw(server: Any, data: bytes, *, until_close: bool = True) -> bytes:
    """Send ``data`` on a new connection to ``server``; what came back, until the server
    closed (or, with ``until_close`` False, through the first head)."""
    with server.connect() as sock:
        sock.sendall(data)
        out = b""
        while True:
            more = sock.recv(65536)
            if not more:
                return out
            out += more
            if not until_close and b"\r\n\r\n" in out:
                return out


def wait_until(condition: Callable[[], Any], timeout: float = 20.0) -> Any:
    """``condition()``'s first true value, polled until a deadline (what it waits for
    happens in another process, which tells nothing when it does)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.02)
    return value


def read_chunked(sock: socket.socket | BinaryIO) -> tuple[bytes, list[bytes]]:
    """Read one chunked response: (head, [chunk, ...]) with the framing checked."""
    f = sock.makefile("rb") if isinstance(sock, socket.socket) else sock
    head = read_head(f)
    assert b"transfer-encoding: chunked" in head.lower(), head
    chunks = []
    while (chunk := read_chunk(f)) is not None:
        chunks.append(chunk)
    return head, chunks


def read_cut_stream(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read a streamed response that its server cuts, until the connection closes (a
    reset counts as the close): (head, the body's data as far as it came).  Asserts
    the cut: a 200 with chunked framing, and no last chunk."""
    out = b""
    try:
        while more := sock.recv(65536):
            out += more
    except ConnectionResetError:
        pass
    head, blank_line, rest = out.partition(b"\r\n\r\n")
    assert blank_line and head.startswith(b"HTTP/1.1 200 "), out[:300]
    assert b"transfer-encoding: chunked" in head.lower(), head
    data, ended = dechunked(rest)
    assert not ended, "a clean last chunk: the stream was not cut"
    return head, data


def dechunked(rest: bytes) -> tuple[bytes, bool]:
    """A chunked body's data as far as it came, and whether its last chunk ended it."""
    data = b""
    while rest:
        size_line, crlf, rest = rest.partition(b"\r\n")
        if not crlf:
            break  # cut inside a size line
        size = int(size_line, 16)
        if not size:
            return data, rest == b"\r\n"
        data, rest = data + rest[:size], rest[size + 2 :]
    return data, False


def read_head(f: BinaryIO) -> bytes:
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = f.readline()
        if not line:
            raise AssertionError("connection closed inside the head: %r" % head)
        head += line
    return head


def read_chunk(f: BinaryIO) -> bytes | None:
    """The next chunk of a chunked body, its framing checked; None for the last."""
    size_line = f.readline()
    assert size_line.endswith(b"\r\n"), size_line
    size = int(size_line, 16)
    data = f.read(size)
    assert f.read(2) == b"\r\n"
    return data if size else None


def read_body(sock: socket.socket) -> bytes:
    """The body of one chunked response, its framing checked."""
    _, chunks = read_chunked(sock)
    return b"".join(chunks)


def reset_on_close(sock: socket.socket) -> None:
    """Make ``sock.close()`` send a reset, as a client that vanishes does (not a FIN)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def closed_but_watched(pid: int) -> list[tuple[int, int]]:
    """Descriptors process ``pid`` has closed that its epoll instances still watch:
    (number, inode) of each entry whose number is not that file now.  Kept open in
    another process (a forked child), such an entry goes on being reported, and a loop
    that cannot remove it any more spins."""
    stale = []
    instances = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[eventpoll]":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                entries = [line.split() for line in info if line.startswith("tfd:")]
        except FileNotFoundError:  # closed meanwhile
            continue
        instances += 1
        for fields in entries:  # "tfd: 7 events: 19 data: 7 pos:0 ino:1a2b sdev:8"
            number = int(fields[1])
            inode = int(next(f for f in fields if f.startswith("ino:"))[4:], 16)
            try:
                if os.stat(f"/proc/{pid}/fd/{number}").st_ino == inode:
                    continue
            except FileNotFoundError:
                pass
            stale.append((number, inode))
    assert instances, f"process {pid} has no epoll instance: it is ending"
    return stale


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


# -- the fixture WSGI app's answers (tests/fixtureapps/apps.py) --------------------------


def closes(server, tag: str, expected: int) -> int:
    """How many bodies of requests sent with ``X-Tag: tag`` were closed: once that is
    ``expected``, or after a deadline (a body may be closed just after its response is
    out, from the thread that ran it)."""
    deadline = time.monotonic() + 10
    while True:
        count = int(requests.get(server.url + "/closed", headers={"X-Tag": tag}).content)
        if count >= expected or time.monotonic() > deadline:
            return count
        time.sleep(0.02)


def assert_clean_hellos(sock, f):
    """Two hellos on ``sock``: each exactly itself, no stray byte of an earlier body."""
    for _ in range(2):
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert f.readline() == b"HTTP/1.1 200 OK\r\n"
        while f.readline() != b"\r\n":
            pass
        assert f.read(13) == b"Hello, world!"


def body_of(response: bytes) -> bytes:
    """The body of one response read until the connection closed, de-chunked if need be."""
    head, _, rest = response.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in head.lower():
        return rest
    body, ended = dechunked(rest)
    assert ended, "no clean end"
    return body

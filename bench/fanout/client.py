"""A lean asyncio HTTP client for thousands of held connections from one process.

Each connection is a raw asyncio Protocol: it writes one request and notes the time
(``time.perf_counter``) at which each of its ``markers`` shows up in the response, in
order.  Nothing is parsed beyond the status line: a marker is a byte string the server
writes once per response (an event's payload, a stage's content).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
import urllib.parse
from collections.abc import Sequence

HOST = "127.0.0.1"


def get(path: str, keep_alive: bool = False) -> bytes:
    connection = "keep-alive" if keep_alive else "close"
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: {connection}\r\n\r\n".encode()


def post_form(path: str, fields: dict[str, str], keep_alive: bool = False) -> bytes:
    body = urllib.parse.urlencode(fields).encode()
    connection = "keep-alive" if keep_alive else "close"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: {connection}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Watcher(asyncio.Protocol):
    """One request; ``times[i]`` is when ``markers[i]`` arrived.  ``done`` (shared by a
    group of watchers) is called once when the last marker arrives."""

    __slots__ = ("_buf", "_done", "_request", "closed", "markers", "status", "times", "transport")

    def __init__(self, request: bytes, markers: Sequence[bytes], done=None):
        self._request = request
        self.markers = markers
        self.times: list[float] = []
        self.status = b""
        self.closed = False
        self._buf = b""
        self._done = done
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self._buf + data
        if not self.status:
            self.status = buf[9:12]
        markers, times = self.markers, self.times
        while len(times) < len(markers):
            at = buf.find(markers[len(times)])
            if at < 0:
                break
            times.append(now)
            buf = buf[at + len(markers[len(times) - 1]) :]
            if len(times) == len(markers) and self._done is not None:
                self._done()
        self._buf = buf[-64:]  # enough to find a marker split across two reads

    def connection_lost(self, exc) -> None:
        self.closed = True

    def reset(self) -> None:
        """Close with an RST (SO_LINGER 0), as a client that vanishes does."""
        if self.transport is None or self.closed:
            return
        sock = self.transport.get_extra_info("socket")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


class Group:
    """Many watchers of one kind; ``complete`` resolves when all saw every marker."""

    def __init__(self, request: bytes, markers: Sequence[bytes], size: int):
        self.request, self.markers, self.size = request, markers, size
        self.watchers: list[Watcher] = []
        self.finished = 0
        self.complete = asyncio.get_running_loop().create_future()
        self.failed = 0

    def _one_done(self) -> None:
        self.finished += 1
        if self.finished == self.size and not self.complete.done():
            self.complete.set_result(None)

    async def open(self, port: int, parallel: int = 256, spread: float = 0.0) -> None:
        """Open ``size`` connections, at most ``parallel`` handshakes at a time; with
        ``spread``, the i-th starts i * spread / size seconds after the first (arrivals
        at a steady rate instead of one burst)."""
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(parallel)
        first = loop.time()

        async def one(i: int) -> None:
            if spread:
                await asyncio.sleep(max(0.0, first + i * spread / self.size - loop.time()))
            async with gate:
                watcher = Watcher(self.request, self.markers, self._one_done)
                try:
                    await loop.create_connection(lambda: watcher, HOST, port)
                except OSError:
                    self.failed += 1
                    return
                self.watchers.append(watcher)

        await asyncio.gather(*(one(i) for i in range(self.size)))

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self.complete), timeout)
        except asyncio.TimeoutError:
            pass

    def close(self) -> None:
        for watcher in self.watchers:
            if watcher.transport is not None:
                watcher.transport.abort()


async def request(port: int, data: bytes, timeout: float = 30) -> tuple[float, bytes]:
    """Send one request on a new connection; return the time it was written and the
    whole response (the server closes: ``Connection: close``)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    try:
        sent = time.perf_counter()
        writer.write(data)
        return sent, await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def get_json(port: int, path: str, timeout: float = 30) -> dict:
    _, response = await request(port, get(path), timeout)
    head, _, body = response.partition(b"\r\n\r\n")
    if head[9:12] != b"200":
        raise OSError(f"GET {path}: {head[:12]!r}")
    if b"transfer-encoding: chunked" in head.lower():
        body = dechunk(body)
    return json.loads(body)


def dechunk(body: bytes) -> bytes:
    out = []
    while True:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(rest[:size])
        body = rest[size + 2 :]

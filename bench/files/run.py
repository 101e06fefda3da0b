"""Downloads through Django's FileResponse on django-comet and on its peers, in one run.

    .venv/bin/python bench/files/run.py [--mib 256] [--downloads 5] [--stalled 16]

Every server serves the same Django view returning ``FileResponse(open(file))`` for a
file of random bytes, pinned to CPU 0 with the client on CPU 1, over 127.0.0.1.  Two
measurements per server:

- throughput: ``--downloads`` downloads one after another, each read to its end; the
  median MiB/s, and the server's CPU seconds per GiB sent (its whole process group);
- stalled downloads: ``--stalled`` clients start the download and stop reading, then
  20 requests for a small JSON view are timed.  A server that gives a thread or a worker
  to each download until it ends cannot answer them; each gets 5 s.

Results are printed as Markdown and written to bench/results/files.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fanout"))

from harness import (  # the benches' shared process helpers
    PY,
    ROOT,
    cpu_seconds,
    environment,
    free_port,
    prepare_client,
    rss_kib,
    server,
    snapshot_source,
)

HERE = Path(__file__).resolve().parent
CACHE = ROOT / "bench" / ".cache" / "files"
RESULTS = ROOT / "bench" / "results" / "files.md"
MIB = 1024 * 1024
HELLO_TIMEOUT = 5.0


@dataclass
class Server:
    name: str
    command: Callable[[str], list[str]]  # "127.0.0.1:port" -> argv


@dataclass
class Result:
    server: Server
    mib_per_s: list[float] = field(default_factory=list)
    cpu_per_gib: float = 0.0
    hello_ms: list[float] = field(default_factory=list)  # answered ones
    hello_missed: int = 0
    rss_stalled_mib: float = 0.0


def servers(threads: int) -> list[Server]:
    app = "hello_site.wsgi:application"
    gunicorn = [PY, "-m", "gunicorn", "-w", "1", "--log-level", "warning", "-b"]
    uvicorn = [PY, "-m", "uvicorn", "hello_site.asgi:application", "--workers", "1"]
    uvicorn += ["--no-access-log", "--log-level", "warning", "--lifespan", "off"]
    return [
        Server(
            f"runcomet ({threads} threads, default)",
            lambda addr: [PY, "-m", "django_comet.evloop", app, addr, "--no-access-log"],
        ),
        Server("gunicorn -w 1 -k sync", lambda addr: [*gunicorn, addr, "-k", "sync", app]),
        Server(
            f"gunicorn -w 1 -k gthread --threads {threads}",
            lambda addr: [*gunicorn, addr, "-k", "gthread", "--threads", str(threads), app],
        ),
        Server(
            "uvicorn, ASGI (Django's async FileResponse)",
            lambda addr: [*uvicorn, "--host", "127.0.0.1", "--port", addr.rpartition(":")[2]],
        ),
    ]


def ensure_file(mib: int) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"random-{mib}MiB"
    if not path.exists() or path.stat().st_size != mib * MIB:
        with open(path, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(MIB))
    return path


def request(port: int, target: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return sock


def read_head(sock: socket.socket) -> tuple[int, bytes]:
    """(Content-Length, body bytes already read) of the response on ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError(f"closed after {data[:200]!r}")
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"answered {head[:200]!r}")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1]), body
    raise ConnectionError("no Content-Length")


def download(port: int, expected: int) -> float:
    """Seconds to download the file once, reading every byte."""
    started = time.perf_counter()
    with request(port, "/file/") as sock:
        length, body = read_head(sock)
        if length != expected:
            raise ConnectionError(f"Content-Length {length}, not {expected}")
        left = length - len(body)
        buf = bytearray(4 * MIB)
        while left > 0:
            n = sock.recv_into(buf)
            if not n:
                raise ConnectionError(f"closed with {left} bytes left")
            left -= n
    return time.perf_counter() - started


def hello_ms(port: int) -> float | None:
    started = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=HELLO_TIMEOUT) as sock:
            sock.sendall(b"GET /json/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            read_head(sock)
    except OSError:
        return None
    return (time.perf_counter() - started) * 1000


def measure(result: Result, env: dict[str, str], args: argparse.Namespace) -> None:
    log = CACHE / (result.server.name.split(",")[0].replace(" ", "_") + ".log")
    size, port = args.mib * MIB, free_port()
    argv = result.server.command(f"127.0.0.1:{port}")
    with server(argv, env, port, "/json/", log) as proc:
        download(port, size)  # warm: the page cache, the view, the connection path
        cpu = cpu_seconds(proc.pid)
        for _ in range(args.downloads):
            result.mib_per_s.append(args.mib / download(port, size))
        sent_gib = args.downloads * args.mib / 1024
        result.cpu_per_gib = (cpu_seconds(proc.pid) - cpu) / sent_gib
        stalled = []
        try:
            for _ in range(args.stalled):
                sock = request(port, "/file/")
                stalled.append(sock)
            time.sleep(1)  # let each server take them up (nothing to await from outside)
            result.rss_stalled_mib = rss_kib(proc.pid) / 1024
            for _ in range(20):
                ms = hello_ms(port)
                if ms is None:
                    result.hello_missed += 1
                else:
                    result.hello_ms.append(ms)
        finally:
            for sock in stalled:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
    answered = f"{statistics.median(result.hello_ms):.1f} ms" if result.hello_ms else "-"
    print(
        f"  {result.server.name:<46} {statistics.median(result.mib_per_s):>7,.0f} MiB/s"
        f"  {result.cpu_per_gib:5.2f} CPU s/GiB  hello while stalled: "
        f"{len(result.hello_ms)}/20 answered (median {answered})",
        flush=True,
    )


def report(header: list[str], results: list[Result], args: argparse.Namespace) -> str:
    base = next(r for r in results if r.server.name.startswith("gunicorn -w 1 -k sync"))
    base_rate = statistics.median(base.mib_per_s)
    lines = [
        "# Downloads: Django FileResponse",
        "",
        *header,
        "",
        f"A {args.mib} MiB file of random bytes, `FileResponse(open(path, 'rb'))`, "
        "DEBUG=False. Server pinned to CPU 0, the client to CPU 1, over 127.0.0.1. "
        f"Throughput is the median of {args.downloads} downloads, one after another; "
        "CPU is the server's process group's per GiB sent. Then "
        f"{args.stalled} clients start the download and stop reading, and 20 requests "
        f"for a small JSON view are made one after another, each given {HELLO_TIMEOUT:.0f} s.",
        "",
        "| server | MiB/s | vs gunicorn sync | server CPU s per GiB | small view answered "
        f"while {args.stalled} downloads stall | its median ms | RSS then (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rate = statistics.median(r.mib_per_s)
        median = f"{statistics.median(r.hello_ms):.1f}" if r.hello_ms else "-"
        lines.append(
            f"| {r.server.name} | {rate:,.0f} | {rate / base_rate:.2f} | {r.cpu_per_gib:.2f} "
            f"| {len(r.hello_ms)} / 20 | {median} | {r.rss_stalled_mib:.0f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=256, help="file size (default 256 MiB)")
    parser.add_argument("--downloads", type=int, default=5, help="timed downloads (default 5)")
    parser.add_argument("--stalled", type=int, default=16, help="stalled clients (default 16)")
    parser.add_argument("--only", default="", help="run only servers whose name contains this")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"default {RESULTS}")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    prepare_client()
    path = ensure_file(args.mib)
    snapshot = snapshot_source()
    sys.path.insert(0, str(snapshot))
    from django_comet.evloop.config import ServerConfig

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(snapshot), str(HERE.parent / "hello")]),
        "BENCH_FILE": str(path),
    }
    header = environment()  # before anything runs: it notes uncommitted changes
    results = [Result(s) for s in servers(ServerConfig.threads) if args.only in s.name]
    try:
        for result in results:
            measure(result, env, args)
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    text = report(header, results, args)
    print("\n" + text)
    if not args.only:
        args.out.write_text(text)
        print(f"Written to {args.out}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())

"""Soak: one runcomet under clients that come and go; does anything pile up?

    .venv/bin/python bench/soak/run.py [--seconds 300] [--quick]

For ``--seconds``, actors loop against one runcomet (CPU 0) from this process (CPU 1):
SSE streams that stay 1-30 s, long-polls with 1-10 s timeouts, staged responses,
ordinary requests, 4 MiB file downloads (a FileResponse, sent by descriptor), clients that
send half a request; a fifth of streams, a third of downloads and a tenth of the others
leave with a reset (RST) rather than a close.  A publisher posts an event every
0.1 s to one of five channels.  Every second the server's RSS, open fds and held count
(/comet/status/) are sampled; after the load, the clients leave and the figures are read
once more after 5 s.  Errors count a non-2xx answer, and a poll, staged, plain or download
request (all sent with "Connection: close") whose connection the server did not close in
time.

Writes bench/results/soak.md and docs/soak.png.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fanout"))

import client
from harness import (
    DOCS,
    RESULTS,
    comet_env,
    environment,
    fd_count,
    free_port,
    migrate,
    prepare_client,
    rss_kib,
    runcomet_argv,
    server,
    snapshot_source,
    wait_until_idle,
)

LOG = Path(tempfile.gettempdir()) / "comet-bench-soak" / "runcomet.log"
CHANNELS = [f"soak-{i}" for i in range(5)]
# kind: (actors, chance of leaving with a reset)
ACTORS = {"sse": (200, 0.2), "poll": (100, 0.1), "staged": (20, 0.1), "plain": (10, 0.0)}
ACTORS |= {"download": (5, 0.3), "half-request": (5, 1.0)}


@dataclass
class Sample:
    t: float
    rss_kib: int
    fds: int
    held: int
    in_flight: int  # requests being answered (waiting for or on a view thread)


class Soak:
    def __init__(self, port: int, pgid: int, seconds: float):
        self.port, self.pgid = port, pgid
        self.end = time.monotonic() + seconds
        self.samples: list[Sample] = []
        self.clients: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.published = 0

    async def visit(self, kind: str, request: bytes, stay: float, reset: bool) -> client.Watcher:
        """One client: connect, send ``request``, stay until the server closes or ``stay``
        seconds pass, then leave (close, or reset)."""
        loop = asyncio.get_running_loop()
        watcher = client.Watcher(request, [])
        try:
            await loop.create_connection(lambda: watcher, client.HOST, self.port)
        except OSError as exc:
            self.errors[f"{kind}: connect {type(exc).__name__}"] += 1
            return watcher
        self.clients[kind] += 1
        deadline = time.monotonic() + stay
        while not watcher.closed and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if not reset and not watcher.closed and kind not in ("sse", "half-request"):
            # Connection: close was asked, and the response has an end: the server
            # should have closed within the stay (a poll's timeout + 10 s; 10 s else).
            self.errors[f"{kind}: left open by the server"] += 1
        if reset:
            watcher.reset()
        elif watcher.transport is not None:
            watcher.transport.close()
        return watcher

    async def actor(self, kind: str, reset_chance: float) -> None:
        await asyncio.sleep(random.uniform(0, 2))  # do not all arrive at once
        while time.monotonic() < self.end:
            reset = random.random() < reset_chance
            channel = random.choice(CHANNELS)
            if kind == "sse":
                request = client.get(f"/t/stream/?channels={channel}")
                await self.visit(kind, request, random.uniform(1, 30), reset)
                continue
            if kind == "half-request":
                request = b"GET /t/echo/?half=1 HTTP/1.1\r\nHost: 127.0"
                await self.visit(kind, request, random.uniform(0, 0.5), True)
                continue
            if kind == "poll":
                timeout = random.uniform(1, 10)
                path = f"/t/poll/?channel={channel}&timeout={timeout:.1f}"
                stay = random.uniform(0, timeout) if reset else timeout + 10
            elif kind == "staged":
                path, stay = "/t/quick-stages/?delay=0.2", random.uniform(0, 0.3) if reset else 10
            elif kind == "download":
                path, stay = f"/t/file/?size={4 << 20}", random.uniform(0, 0.05) if reset else 10
            else:
                path, stay = f"/t/echo/?n={random.randrange(1000)}", 10
            watcher = await self.visit(kind, client.get(path), stay, reset)
            if not reset and watcher.transport is not None and watcher.status != b"200":
                self.errors[f"{kind}: status {watcher.status.decode() or 'none'}"] += 1
            if kind == "plain":
                await asyncio.sleep(random.uniform(0, 0.2))

    async def publisher(self) -> None:
        while time.monotonic() < self.end:
            data = json.dumps({"n": self.published, "pad": "x" * random.randrange(200)})
            fields = {"channel": random.choice(CHANNELS), "data": data}
            try:
                await client.request(self.port, client.post_form("/t/publish/", fields))
                self.published += 1
            except OSError as exc:
                self.errors[f"publish: {type(exc).__name__}"] += 1
            await asyncio.sleep(0.1)

    async def sample(self, started: float) -> None:
        try:
            status = await client.get_json(self.port, "/comet/status/", timeout=5)
        except (OSError, asyncio.TimeoutError):
            status = {"held": -1, "in_flight": -1}
            self.errors["status: no answer within 5 s"] += 1
        t = time.monotonic() - started
        fds, rss = fd_count(self.pgid), rss_kib(self.pgid)
        self.samples.append(Sample(t, rss, fds, status["held"], status["in_flight"] - 1))

    async def sampler(self, started: float) -> None:
        while time.monotonic() < self.end:
            await self.sample(started)
            await asyncio.sleep(max(0.0, 1 - (time.monotonic() - started) % 1))

    async def run(self) -> Sample:
        """The load; returns the sample taken 5 s after every client left."""
        started = time.monotonic()
        await self.sample(started)
        tasks = [self.actor(kind, chance) for kind, (n, chance) in ACTORS.items() for _ in range(n)]
        await asyncio.gather(self.sampler(started), self.publisher(), *tasks)
        await asyncio.sleep(5)
        await self.sample(started)
        return self.samples.pop()


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def report(header: list[str], soak: Soak, settled: Sample, seconds: float) -> str:
    s = soak.samples
    start, last = s[0], s[-1]
    peak_rss = max(x.rss_kib for x in s)
    half = [x.rss_kib for x in s if x.t >= seconds / 2]
    rows = [
        "| | start | max | end of load | 5 s after the clients left |",
        "|---|---:|---:|---:|---:|",
        f"| RSS MiB | {mib(start.rss_kib)} | {mib(peak_rss)} | {mib(last.rss_kib)} "
        f"| {mib(settled.rss_kib)} |",
        f"| open fds | {start.fds} | {max(x.fds for x in s)} | {last.fds} | {settled.fds} |",
        f"| held | {start.held} | {max(x.held for x in s)} | {last.held} | {settled.held} |",
        f"| in flight | {start.in_flight} | {max(x.in_flight for x in s)} | {last.in_flight} "
        f"| {settled.in_flight} |",
    ]
    kinds = ", ".join(f"{kind} {n:,}" for kind, n in soak.clients.items())
    errors = ", ".join(f"{what}: {n}" for what, n in soak.errors.items()) or "none"
    actors = ", ".join(f"{kind} {n}" for kind, (n, _) in ACTORS.items())
    return "\n".join(
        [
            f"# Soak: {seconds:.0f} s of clients arriving and leaving",
            "",
            *header,
            "",
            f"One runcomet (CPU 0, memory broker, heartbeat 60 s); client on CPU 1. Actors "
            f"({actors}) loop for {seconds:.0f} s: SSE streams stay 1-30 s (a fifth leave "
            "with an RST), long-polls with 1-10 s timeouts, quick staged responses "
            "(delay 0.2 s), ordinary GET /t/echo/, 4 MiB FileResponse downloads (a third "
            "reset within 50 ms), and half-sent requests reset after 0-0.5 s; a tenth of "
            "polls and staged responses are reset early. One publish "
            "every 0.1 s to one of 5 channels. Sampled every second: VmRSS, entries in "
            "/proc/PID/fd, `held` and `in_flight` (minus the status request itself) "
            "from /comet/status/.",
            "",
            *rows,
            "",
            f"- RSS over the second half of the load: min {mib(min(half))}, "
            f"max {mib(max(half))} MiB",
            f"- clients: {kinds}; events published: {soak.published:,}",
            f"- errors: {errors}",
            "",
        ]
    )


def plot(samples: list[Sample], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [x.t for x in samples]
    fig, (rss, fds) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    rss.plot(t, [x.rss_kib / 1024 for x in samples], color="tab:blue")
    rss.set(ylabel="RSS (MiB)", title="runcomet under arriving and leaving clients")
    fds.plot(t, [x.fds for x in samples], color="tab:orange", label="open fds")
    fds.plot(t, [x.held for x in samples], color="tab:green", label="held responses")
    fds.plot(t, [x.in_flight for x in samples], color="tab:red", label="requests in flight")
    fds.set(xlabel="seconds", ylabel="count")
    fds.legend(fontsize=8)
    for ax in (rss, fds):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, help="duration of the load (default 300)")
    parser.add_argument("--quick", action="store_true", help="60 s")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for bench/hello")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.md")
    parser.add_argument("--plot", type=Path, default=DOCS / "soak.png")
    args = parser.parse_args()
    seconds = args.seconds or (60 if args.quick else 300)

    prepare_client()
    snapshot = snapshot_source()
    db = snapshot / "bench.sqlite3"
    env = comet_env(snapshot, db)
    try:
        migrate(env)
        if not args.no_wait:
            wait_until_idle()
        header = environment()
        port = free_port()
        with server(runcomet_argv(port), env, port, "/comet/status/", LOG) as proc:
            soak = Soak(port, proc.pid, seconds)
            settled = asyncio.run(soak.run())
    except KeyboardInterrupt:
        print("interrupted; server stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(snapshot, ignore_errors=True)
    text = report(header, soak, settled, seconds)
    print(text)
    args.out.write_text(text)
    plot(soak.samples, args.plot)
    print(f"Written to {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

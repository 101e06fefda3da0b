"""Publish-to-deliver latency and events/second through each broker.

    .venv/bin/python bench/broker/run.py [--quick] [--events N] [--burst N]

memory://: one runcomet; publish (POST /t/publish/) and receive (an SSE stream) on it.
postgres:// and redis://: two runcomet processes A and B on one throwaway PostgreSQL /
redis-server (tests/brokers.py); publish on A, receive on an SSE stream of B.
Latency: ``--events`` publishes one after another, each waiting for its arrival on the
stream (time it arrived minus time the POST was written).  Events/second: ``--burst``
publishes from 8 concurrent publishers, from the first POST to the last arrival.
Both runcomets on CPU 0, this client on CPU 1, the brokers unpinned.

Writes bench/results/broker.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fanout"))

import client
from harness import (
    RESULTS,
    comet_env,
    environment,
    free_port,
    migrate,
    percentile,
    prepare_client,
    runcomet_argv,
    server,
    snapshot_source,
    wait_until_idle,
)

from tests.brokers import PostgresServer, RedisServer

LOGS = Path(tempfile.gettempdir()) / "comet-bench-broker"
CHANNEL = "bench"
PUBLISHERS = 8


@dataclass
class Result:
    broker: str
    latencies_ms: list[float] = field(default_factory=list)
    sent: int = 0
    events_per_s: float = 0.0
    burst: int = 0
    burst_received: int = 0


async def publish(port: int, data: dict) -> float:
    fields = {"channel": CHANNEL, "data": json.dumps(data)}
    sent, response = await client.request(port, client.post_form("/t/publish/", fields))
    if response[9:12] != b"200":
        raise RuntimeError(f"publish failed: {response[:300]!r}")
    return sent


async def stream(port: int, markers: list[bytes]) -> client.Group:
    """One SSE client on ``port``, subscribed (as the server reports) before returning."""
    group = client.Group(client.get(f"/t/stream/?channels={CHANNEL}"), markers, 1)
    await group.open(port)
    deadline = time.monotonic() + 10
    while (await client.get_json(port, "/comet/status/"))["channels"].get(CHANNEL, 0) < 1:
        if time.monotonic() > deadline:
            raise RuntimeError("the SSE client was not subscribed within 10 s")
        await asyncio.sleep(0.05)
    return group


async def latency(pub: int, sub: int, events: int, result: Result) -> None:
    markers = [f'"lat-{i}"'.encode() for i in range(events)]
    group = await stream(sub, markers)
    watcher = group.watchers[0]
    try:
        for i in range(events):
            sent = await publish(pub, {"n": f"lat-{i}"})
            deadline = time.perf_counter() + 10
            while len(watcher.times) <= i:
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"event {i} not delivered within 10 s")
                await asyncio.sleep(0.0005)
            result.latencies_ms.append((watcher.times[i] - sent) * 1000)
    finally:
        group.close()


async def throughput(pub: int, sub: int, burst: int, result: Result) -> None:
    group = await stream(sub, [b'"burst"'] * burst)
    watcher = group.watchers[0]
    todo = iter(range(burst))

    async def publisher() -> None:
        for _ in todo:
            await publish(pub, {"n": "burst"})

    try:
        started = time.perf_counter()
        await asyncio.gather(*(publisher() for _ in range(PUBLISHERS)))
        await group.wait(30)
        result.burst, result.burst_received = burst, len(watcher.times)
        if watcher.times:
            result.events_per_s = len(watcher.times) / (watcher.times[-1] - started)
    finally:
        group.close()


def measure(name: str, env_a: dict[str, str], env_b: dict[str, str] | None, args) -> Result:
    """Start A (and B), measure; B is None for one process publishing to itself."""
    result = Result(name)
    with contextlib.ExitStack() as stack:
        ports = []
        for label, env in (("a", env_a), ("b", env_b)):
            if env is None:
                continue
            port = free_port()
            log = LOGS / f"{name.split(':')[0]}-{label}.log"
            stack.enter_context(server(runcomet_argv(port), env, port, "/comet/status/", log))
            ports.append(port)
        pub, sub = ports[0], ports[-1]
        asyncio.run(latency(pub, sub, 20, Result(name)))  # warm-up
        asyncio.run(latency(pub, sub, args.events, result))
        asyncio.run(throughput(pub, sub, args.burst, result))
    lat = result.latencies_ms
    print(
        f"  {name:<10} p50 {percentile(lat, 50):6.2f} ms  p99 {percentile(lat, 99):6.2f} ms"
        f"  {result.events_per_s:7.0f} events/s ({result.burst_received}/{result.burst})",
        flush=True,
    )
    return result


def report(header: list[str], results: list[Result], args) -> str:
    rows = [
        "| broker | processes | latency p50 ms | p99 ms | max ms | events/s | burst delivered |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lat = r.latencies_ms
        shape = "one (publish and receive)" if r.broker == "memory" else "publish on A, SSE on B"
        rows.append(
            f"| {r.broker} | {shape} | {percentile(lat, 50):.2f} | {percentile(lat, 99):.2f} "
            f"| {percentile(lat, 100):.2f} | {r.events_per_s:,.0f} "
            f"| {r.burst_received:,}/{r.burst:,} |"
        )
    return "\n".join(
        [
            "# Brokers: publish-to-deliver latency and events/second",
            "",
            *header,
            "",
            f"Latency: {args.events} publishes (POST /t/publish/, a Django request on the "
            "publishing runcomet) one after another, each waiting for its SSE frame; time the "
            "frame arrived minus time the POST was written. Events/s: "
            f"{args.burst} publishes from {PUBLISHERS} concurrent publishers (a new "
            "connection each), counted from the first POST to the last frame received. "
            "runcomets on CPU 0, client on CPU 1, broker servers unpinned (throwaway "
            "PostgreSQL with fsync off / redis-server, tests/brokers.py), 127.0.0.1.",
            "",
            *rows,
            "",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="100 events, burst of 500")
    parser.add_argument("--events", type=int, help="sequential publishes (default 500)")
    parser.add_argument("--burst", type=int, help="concurrent publishes (default 3000)")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for bench/hello")
    parser.add_argument("--out", type=Path, default=RESULTS / "broker.md")
    args = parser.parse_args()
    args.events = args.events or (100 if args.quick else 500)
    args.burst = args.burst or (500 if args.quick else 3000)

    snapshot = snapshot_source()
    db = snapshot / "bench.sqlite3"
    brokers: list = []
    try:
        migrate(comet_env(snapshot, db))
        if not args.no_wait:
            wait_until_idle()
        for kind in (PostgresServer, RedisServer):  # unpinned: started before pinning
            brokers.append(kind())
        prepare_client()
        header = environment()
        results = [measure("memory", comet_env(snapshot, db), None, args)]
        for name, broker in zip(("postgres", "redis"), brokers, strict=True):
            env = comet_env(snapshot, db, COMET_BROKER=broker.url)
            results.append(measure(name, env, dict(env), args))
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    finally:
        for broker in brokers:
            broker.destroy()
        shutil.rmtree(snapshot, ignore_errors=True)
    text = report(header, results, args)
    print("\n" + text)
    args.out.write_text(text)
    print(f"Written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The staged-response part of bench/fanout (runcomet only): N concurrent staged
responses (the tests' quick-stages and the demo's 1 s stages), each run repeated on a
fresh server; the lateness of each stage's chunk, the server's CPU, its RSS per held
response, and Django's own cost per stage without a server (stage_floor.py)."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import client
from harness import (
    HERE,
    PY,
    WARM_UP_CLIENTS,
    cpu_seconds,
    free_port,
    percentile,
    rss_kib,
    server,
)


@dataclass
class Staged:
    name: str
    n: int
    complete: int
    first_ms: list[float]  # lateness of the stage after the first delay
    later_ms: list[float]  # lateness of every later stage, vs the previous one
    cpu_percent: float
    cpu_ms_per_stage: float
    wall_s: float
    step_s: float  # the delay between later stages
    spread_s: float  # arrivals spread over this many seconds (0: all at once)
    floor_ms_per_stage: float = float("nan")  # the Django requests alone (stage_floor.py)
    round_p99s: list[float] = field(default_factory=list)  # every round's, when repeated
    rss_per_held_kb: float = float("nan")  # (RSS once all have started - RSS before) / held

    @property
    def p99(self) -> float:
        """Lateness p99 over every stage, the first and the later ones."""
        return percentile(self.first_ms + self.later_ms, 99)


async def one_round(
    port: int,
    pgid: int,
    name: str,
    path: str,
    markers: list[bytes],
    delays: tuple[float, float],
    n: int,
    spread: float = 0.0,
) -> Staged:
    """``n`` concurrent staged responses: how late is each stage after the one before?
    All start at once, or, with ``spread``, at a steady rate over that many seconds."""
    first_delay, step = delays
    group = client.Group(client.get(path), markers, n)
    rss_before = rss_kib(pgid)
    cpu_before, started = cpu_seconds(pgid), time.perf_counter()
    try:
        await group.open(port, parallel=n, spread=spread)
        rss_per_held = await rss_per_held_response(group, port, pgid, rss_before)
        await group.wait(30 + first_delay + step * len(markers))
    finally:
        group.close()
    wall = time.perf_counter() - started
    cpu = cpu_seconds(pgid) - cpu_before
    first, later = [], []
    for w in group.watchers:
        t = w.times
        if len(t) > 1:
            first.append((t[1] - t[0] - first_delay) * 1000)
        later += [(t[k] - t[k - 1] - step) * 1000 for k in range(2, len(t))]
    requests = n * len(markers)
    return Staged(
        name,
        n,
        group.finished,
        first,
        later,
        100 * cpu / wall,
        1000 * cpu / requests,
        wall,
        step,
        spread,
        rss_per_held_kb=rss_per_held,
    )


async def rss_per_held_response(
    group: client.Group, port: int, pgid: int, rss_before: int
) -> float:
    """KiB of server RSS per held response, once every client has its first chunk."""
    deadline = time.monotonic() + 60
    while any(not w.times for w in group.watchers) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    rss = rss_kib(pgid)
    held = int((await client.get_json(port, "/comet/status/"))["held"])
    return (rss - rss_before) / held if held else float("nan")


def stage_floor_ms(env: dict[str, str], path: str, stages: int, gap_ms: float = 0.0) -> float:
    """CPU ms per stage of ``path``'s staged response run in-process, with no server:
    back to back, or idle for ``gap_ms`` after each request."""
    paths = [env["PYTHONPATH"], str(HERE.parent.parent / "demo_site")]
    env = {**env, "PYTHONPATH": os.pathsep.join(paths)}
    argv = ["taskset", "-c", "0", PY, "stage_floor.py", path, str(stages), "1000", str(gap_ms)]
    out = subprocess.run(argv, cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        print(f"  stage_floor.py failed:\n{out.stdout}{out.stderr}", flush=True)
        return float("nan")
    return float(out.stdout.split()[-1])


def runs() -> list[tuple[str, str, list[bytes], tuple[float, float], float, tuple[str, ...]]]:
    """(name, path, markers, (first delay, later delays), arrivals spread over s, runcomet's
    extra options)."""
    quick = [b"s0;", b"s1:", b"s2:", b"s3:", b"s4:"]
    demo = [b"First content", b"stage1", b"stage2", b"stage3", b"last_stage4"]
    return [
        (
            "quick-stages, delay 0.5 s then 0.02 s",
            "/t/quick-stages/?delay=0.5",
            quick,
            (0.5, 0.02),
            0.0,
            (),
        ),
        ("demo `/`, 1 s stages, all at once", "/", demo, (1.0, 1.0), 0.0, ()),
        # The same with the stage views run in the loop thread: no view thread sharing
        # the GIL with it, so each stage goes out as soon as its view returns.
        (
            "demo `/`, 1 s stages, all at once, `--threads 0`",
            "/",
            demo,
            (1.0, 1.0),
            0.0,
            ("--threads", "0"),
        ),
        ("demo `/`, 1 s stages, arrivals spread over 1 s", "/", demo, (1.0, 1.0), 1.0, ()),
    ]


async def run_all(
    argv: Callable[[int], list[str]],
    env: dict[str, str],
    ready: str,
    args: argparse.Namespace,
    logs: Path,
) -> list[Staged]:
    """Every run of ``runs()``, ``args.staged_rounds`` times each, ``args.staged`` clients."""
    stages: list[Staged] = []
    for name, path, markers, delays, spread, options in runs():
        rounds = []
        for _ in range(args.staged_rounds):  # a fresh server each round
            port = free_port()
            log = logs / f"runcomet-staged-{delays[0]}.log"
            with server([*argv(port), *options], env, port, ready, log) as proc:
                await one_round(port, proc.pid, "warm-up", path, markers, delays, WARM_UP_CLIENTS)
                rounds.append(
                    await one_round(
                        port, proc.pid, name, path, markers, delays, args.staged, spread
                    )
                )
        # The VM's speed wanders: report the round with the median p99, and every p99.
        s = sorted(rounds, key=lambda r: r.p99)[len(rounds) // 2]
        s.round_p99s = [r.p99 for r in rounds]
        # Spread out, the server's stages come one at a time with the CPU idle between
        # them, and Django's code runs colder than back to back: time it at that pace.
        gap_ms = 1000 * delays[1] / args.staged if spread else 0.0
        s.floor_ms_per_stage = stage_floor_ms(env, path, len(markers), gap_ms)
        stages.append(s)
        print(
            f"  {name}: {s.complete}/{s.n} complete, lateness p99 over all stages "
            f"{s.p99:.1f} ms (rounds: {', '.join(f'{p:.0f}' for p in s.round_p99s)}), "
            f"CPU {s.cpu_percent:.1f}%",
            flush=True,
        )
    return stages


def table(results: list[Staged]) -> list[str]:
    rows = [
        "| run | clients | complete | 1st stage lateness min / p50 / p99 / max ms "
        "| later stages p99 ms | server CPU% | CPU ms per stage "
        "| Django alone, ms per stage | RSS per held response KiB | wall s "
        "| all stages p99 ms, each round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in results:
        f = s.first_ms
        rows.append(
            f"| {s.name} | {s.n:,} | {s.complete:,} "
            f"| {min(f, default=float('nan')):.1f} / {percentile(f, 50):.1f} "
            f"/ {percentile(f, 99):.1f} / {percentile(f, 100):.1f} "
            f"| {percentile(s.later_ms, 99):.1f} | {s.cpu_percent:.1f} "
            f"| {s.cpu_ms_per_stage:.2f} | {s.floor_ms_per_stage:.2f} "
            f"| {s.rss_per_held_kb:.1f} | {s.wall_s:.1f} "
            f"| {' / '.join(f'{p:.0f}' for p in s.round_p99s)} |"
        )
    return rows


def section(stages: list[Staged]) -> list[str]:
    """The report's section on staged responses (nothing when none ran)."""
    if not stages:
        return []
    return [
        "## Concurrent staged responses (runcomet)",
        "",
        "Lateness: arrival of a stage's chunk minus (arrival of the previous chunk + "
        "the stage delay); negative: the previous chunk reached the client after the "
        "server had armed the stage's timer. CPU%: server utime+stime over the run's "
        "wall time, from the first connect to the last chunk (every stage is a full "
        "Django request). RSS per held response: (server RSS once every client has its "
        "first chunk - RSS before the run) / `held` from /comet/status/ at that moment. "
        "Django alone: the same staged response run in-process with no server "
        "(stage_floor.py), back to back, or, for spread arrivals, one request at a time "
        "with the CPU idle for the time between two of the server's stages (1 ms for "
        "1,000 a second), since Django's code then runs colder. Each run is repeated on "
        "a fresh server; the table shows the round with the median p99 over all "
        "stages, and the last column every round's.",
        "",
        *table(stages),
        "",
    ]


def goals(stages: list[Staged]) -> list[str]:
    lines = []
    for s in stages:
        ok = "met" if s.p99 < 20 and s.cpu_percent < 5 else "missed"
        lines.append(
            f"- {s.name}: lateness p99 {s.p99:.1f} ms over all stages (< 20), "
            f"CPU {s.cpu_percent:.1f}% (< 5): {ok}"
        )
        if s.floor_ms_per_stage == s.floor_ms_per_stage:  # measured
            rate = s.n / s.step_s
            burst = (
                f", and a burst of {s.n:,} keeps the last one waiting "
                f"{s.n * s.floor_ms_per_stage:,.0f} ms"
                if not s.spread_s
                else ""
            )
            pace = (
                f", one every {1000 * s.step_s / s.n:g} ms with the CPU idle in between"
                if s.spread_s
                else ""
            )
            lines.append(
                f"  - its stage requests cost {s.floor_ms_per_stage:.2f} ms of CPU each in "
                f"Django alone, with no server{pace}: {s.n:,} every {s.step_s:g} s need "
                f"{rate * s.floor_ms_per_stage / 10:,.0f}% of a CPU before the server does "
                f"anything{burst}"
            )
    return lines

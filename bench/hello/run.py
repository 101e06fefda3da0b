"""Requests/second of "Hello, world!" on django-comet and on its peers, in one run.

    .venv/bin/python bench/hello/run.py [--quick] [--duration S] [--rounds N] [--only TEXT]

Every server serves the same Django view (and, separately, a bare WSGI callable); each is
pinned to CPU 0 and wrk to CPU 1, over 127.0.0.1.  A server must answer one request with
200 "Hello, world!" before it is measured.  A measurement is a warm-up, then one wrk run;
rounds go through every server in turn, so a burst of noise from other processes hits one
run rather than one server, and the median of the rounds is reported.  Each round also
times the application alone, called in-process (floor.py): subtracting it from a server's
time per request shows what the server itself costs.  Results are printed
as Markdown and written to bench/results/hello.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import http.client
import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fanout"))

from harness import build_c, free_port, stop, tail  # the benches' shared helpers

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CACHE = ROOT / "bench" / ".cache"
RESULTS = ROOT / "bench" / "results" / "hello.md"
SNAPSHOT = CACHE / "src"  # django_comet as it was when the run started
PY = sys.executable
SERVER_CPU, WRK_CPU = "0", "1"
BODY = b"Hello, world!"
DJANGO_WSGI = "hello_site.wsgi:application"
BARE_WSGI = "bare_wsgi:app"
ERROR_KINDS = ("status", "connect", "read", "write", "timeout")  # wrk's error counters


class BenchError(Exception):
    pass


@dataclass
class Server:
    name: str
    command: Callable[[int], list[str]]  # port -> argv
    threads: int | None = None  # runcomet's --threads (None: not runcomet)
    env: dict[str, str] = field(default_factory=dict)  # added to the environment


@dataclass
class Result:
    """One server's wrk runs, one per round."""

    server: Server
    runs: list[dict[str, int]] = field(default_factory=list)

    @property
    def all_rps(self) -> list[float]:
        return [r["requests"] / (r["duration_us"] / 1e6) for r in self.runs]

    @property
    def rps(self) -> float:
        return statistics.median(self.all_rps)

    def latency_ms(self, key: str) -> float:
        return statistics.median(r[key] for r in self.runs) / 1000

    @property
    def errors(self) -> dict[str, int]:
        totals = {kind: sum(r[kind] for r in self.runs) for kind in ERROR_KINDS}
        return {kind: n for kind, n in totals.items() if n}


# -- the servers --------------------------------------------------------------------------


def runcomet(app: str, threads: int, default: int) -> Server:
    """The evloop CLI serving ``app``; ``--threads`` is left out when it is the default."""
    is_default = threads == default
    name = f"runcomet --threads {threads}" + (" (default)" if is_default else "")
    extra = [] if is_default else ["--threads", str(threads)]
    cmd = [PY, "-m", "django_comet.evloop", app]
    return Server(
        name, lambda port: [*cmd, f"127.0.0.1:{port}", "--no-access-log", *extra], threads
    )


def django_servers(default: int, skipped: list[str]) -> list[Server]:
    sweep = dict.fromkeys([default, *sorted({0, 1, 4, 16})])
    servers = [runcomet(DJANGO_WSGI, n, default) for n in sweep]
    gunicorn = f"{PY} -m gunicorn -w 1 -k sync --log-level warning {DJANGO_WSGI} -b".split()
    servers.append(Server("gunicorn -w 1 -k sync", lambda port: [*gunicorn, f"127.0.0.1:{port}"]))
    uvicorn = (
        f"{PY} -m uvicorn hello_site.asgi:application --workers 1 --no-access-log"
        " --log-level warning --lifespan off --host 127.0.0.1 --port"
    ).split()
    servers.append(Server(f"uvicorn, ASGI ({uvicorn_flavour()})", lambda p: [*uvicorn, str(p)]))
    why = ensure_bjoern()
    if why:
        skipped.append(f"bjoern skipped: {why}")
    else:
        bjoern = [PY, "serve_bjoern.py", DJANGO_WSGI]
        servers.append(Server("bjoern", lambda port: [*bjoern, str(port)]))
    return servers


def bare_servers(default: int, skipped: list[str]) -> list[Server]:
    servers = [runcomet(BARE_WSGI, n, default) for n in dict.fromkeys([0, default])]
    binary, why = build_c(HERE / "evhttp_hello.c", "evhttp_hello")
    if why:
        skipped.append(f"C evhttp_hello skipped: {why}")
    else:
        servers.append(Server("C evhttp_hello (no Python)", lambda port: [binary, str(port)]))
        # runcomet turns on epoll's changelist; the bar's C program runs with libevent's
        # defaults, and this row shows what the same flag gives it.
        servers.append(
            Server(
                "C evhttp_hello, epoll changelist",
                lambda port: [binary, str(port)],
                env={"EVENT_EPOLL_USE_CHANGELIST": "1"},
            )
        )
    return servers


def uvicorn_flavour() -> str:
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"{http}, {loop}"


def ensure_bjoern() -> str:
    """Install bjoern if it is missing; return why it is unavailable ("" if it is)."""
    if importlib.util.find_spec("bjoern"):
        return ""
    print("Installing bjoern (it needs libev headers: apt-get install libev-dev)", flush=True)
    try:
        out = subprocess.run(
            [PY, "-m", "pip", "install", "-q", "bjoern"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        return "pip install bjoern timed out"
    if out.returncode != 0:
        lines = (out.stdout + out.stderr).strip().splitlines() or [""]
        hint = next((ln for ln in lines if "ev.h" in ln), lines[-1])
        return f"pip install bjoern failed: {hint.strip()}"
    importlib.invalidate_caches()
    return ""


# -- running and measuring ----------------------------------------------------------------


def snapshot_source() -> int:
    """Copy django_comet aside, so that every server of the run serves the same code even
    if the working tree is edited meanwhile; return its default thread count."""
    shutil.rmtree(SNAPSHOT, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "django_comet", SNAPSHOT / "django_comet", ignore=ignore)
    sys.path.insert(0, str(SNAPSHOT))
    from django_comet.evloop.config import ServerConfig

    return ServerConfig.threads


def fetch(port: int) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@contextlib.contextmanager
def running(server: Server, port: int) -> Iterator[None]:
    """Start ``server`` on CPU 0, check that it answers correctly, always stop it."""
    CACHE.mkdir(parents=True, exist_ok=True)
    log_path = CACHE / (re.sub(r"\W+", "-", server.name).strip("-") + ".log")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(SNAPSHOT)]), **server.env}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, *server.command(port)],
            cwd=HERE,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: gunicorn's worker goes with it
        )
        try:
            check_answer(server, port, proc, log_path)
            yield
        finally:
            stop(proc)


def check_answer(server: Server, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise BenchError(f"{server.name} exited with {proc.returncode}:\n{tail(log)}")
        try:
            status, body = fetch(port)
            break
        except OSError:
            if time.monotonic() > deadline:
                msg = f"{server.name} did not answer within 30 s:\n{tail(log)}"
                raise BenchError(msg) from None
            time.sleep(0.1)
    if status != 200 or body != BODY:
        msg = f"{server.name} answered {status} {body[:200]!r}, not 200 {BODY!r}"
        raise BenchError(f"{msg}:\n{tail(log)}")


def app_floor_us(app: str) -> float:
    """CPU microseconds per request of ``app`` called in-process (floor.py), on CPU 0."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(SNAPSHOT)])}
    argv = ["taskset", "-c", SERVER_CPU, PY, "floor.py", app]
    out = subprocess.run(argv, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise BenchError(f"floor.py {app} failed:\n{out.stdout}{out.stderr}")
    return float(out.stdout.split()[-1])


def wrk(port: int, seconds: int, connections: int) -> dict[str, int]:
    load = f"wrk -t1 -c{connections} -d{seconds}s".split()
    script, url = str(HERE / "report.lua"), f"http://127.0.0.1:{port}/"
    argv = ["taskset", "-c", WRK_CPU, *load, "-s", script, url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    match = re.search(r"^WRK_RESULT (.*)$", out.stdout, re.MULTILINE)
    if out.returncode != 0 or not match:
        raise BenchError(f"wrk failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    return {k: int(v) for k, v in (kv.split("=") for kv in match.group(1).split())}


def measure(result: Result, args: argparse.Namespace) -> None:
    port = free_port()
    with running(result.server, port):
        wrk(port, args.warmup, args.connections)
        run = wrk(port, args.duration, args.connections)
    result.runs.append(run)
    errors = {kind: run[kind] for kind in ERROR_KINDS if run[kind]}
    print(
        f"  {result.server.name:<36} {result.all_rps[-1]:>9,.0f} req/s"
        f"  errors: {fmt_errors(errors)}",
        flush=True,
    )


# -- reporting ----------------------------------------------------------------------------


def fmt_errors(errors: dict[str, int]) -> str:
    names = {"status": "non-2xx/3xx"}
    return ", ".join(f"{names.get(k, k)} {n}" for k, n in errors.items()) or "0"


def ratio(value: float, base: Result | None) -> str:
    return f"{value / base.rps:.2f}" if base else "n/a"


def spread(r: Result) -> str:
    rps = r.all_rps
    return f"{min(rps):,.0f}-{max(rps):,.0f}" if len(rps) > 1 else "-"


def table(
    results: list[Result], base: Result | None, base_label: str, floor: float | None
) -> list[str]:
    """One row per server; with the app's in-process floor (µs), what each server adds
    per request on top of the app (the server is saturated on its one CPU, so 1/rps is
    its CPU time per request)."""
    rows = [
        f"| server | req/s | vs {base_label} | µs/request | server µs over the app "
        "| min-max | p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        per_request = 1e6 / r.rps
        app = 0.0 if r.server.name.startswith("C ") else floor  # the C program has no app
        over = f"{per_request - app:.1f}" if app is not None else "n/a"
        rows.append(
            f"| {r.server.name} | {r.rps:,.0f} | {ratio(r.rps, base)} | {per_request:.1f} "
            f"| {over} | {spread(r)} | {r.latency_ms('p50_us'):.2f} "
            f"| {r.latency_ms('p99_us'):.2f} | {fmt_errors(r.errors)} |"
        )
    if floor is not None:
        rows.append(
            f"| the app alone, in-process (no server, no HTTP) | {1e6 / floor:,.0f} "
            f"| {ratio(1e6 / floor, base)} | {floor:.1f} | 0 | | | | |"
        )
    return rows


def bar_arithmetic(django: list[Result], bare: list[Result], floors: dict[str, float]) -> list[str]:
    """What the issue's two missed bars would take, from this run's own figures."""
    bjoern = next((r for r in django if r.server.name == "bjoern"), None)
    zero = next((r for r in django if r.server.threads == 0), None)
    c_prog = next((r for r in bare if r.server.name.startswith("C ")), None)
    bare_zero = next((r for r in bare if r.server.threads == 0), None)
    if not (bjoern and zero and c_prog and bare_zero and "django" in floors):
        return []
    bjoern_over = 1e6 / bjoern.rps - floors["django"]
    evhttp = 1e6 / c_prog.rps
    ours_over = 1e6 / zero.rps - floors["django"]
    budget = 1e6 / (0.8 * c_prog.rps) - evhttp
    python_bare = 1e6 / bare_zero.rps - evhttp - floors.get("bare", 0)
    return [
        f"- Django hello, `--threads 0` at least as fast as bjoern: runcomet may add at most "
        f"what bjoern adds to the app, {bjoern_over:.1f} µs per request.  evhttp alone "
        f"(the C program, socket work included) takes {evhttp:.1f} µs per request before any "
        f"Python runs; runcomet adds {ours_over:.1f} µs.",
        f"- Bare WSGI at 0.8x the C program: {1e6 / (0.8 * c_prog.rps):.1f} µs per request "
        f"in all, which leaves {budget:.1f} µs for every Python step of a request (the ctypes "
        f"callback, the environ, start_response, the reply); runcomet's take "
        f"{python_bare:.1f} µs.",
    ]


def sweep_table(results: list[Result]) -> list[str]:
    comet = sorted(
        (r for r in results if r.server.threads is not None), key=lambda r: r.server.threads or 0
    )
    if not comet:
        return []
    zero = next((r for r in comet if r.server.threads == 0), None)
    best = max(comet, key=lambda r: r.rps)
    rows = ["| --threads | req/s | vs --threads 0 | p99 ms |", "|---:|---:|---:|---:|"]
    for r in comet:
        label = str(r.server.threads)
        label += " (default)" if "(default)" in r.server.name else ""
        label += " **best**" if r is best else ""
        rows.append(
            f"| {label} | {r.rps:,.0f} | {ratio(r.rps, zero)} | {r.latency_ms('p99_us'):.2f} |"
        )
    return rows


def environment(args: argparse.Namespace) -> list[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "?")
    versions = [f"Python {platform.python_version()}"]
    for dist in ("django", "gunicorn", "uvicorn", "bjoern"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
    versions.append(f"libevent {libevent_version()}")
    versions.append(" ".join(command_output(["wrk", "-v"]).split()[:2]))
    commit = command_output(["git", "rev-parse", "--short", "HEAD"]) or "?"
    diff = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "django_comet"], cwd=ROOT)
    commit += " with uncommitted changes to django_comet" if diff.returncode else ""
    return [
        f"{datetime.datetime.now():%Y-%m-%d %H:%M} · {cpu} · nproc {os.cpu_count()} · "
        f"Linux {platform.release()} · commit {commit}",
        "",
        " · ".join(versions),
        "",
        f"Server pinned to CPU {SERVER_CPU}, wrk to CPU {WRK_CPU}, over 127.0.0.1: "
        f"`wrk -t1 -c{args.connections}`, {args.warmup} s warm-up then {args.duration} s "
        f"measured; {args.rounds} round(s), req/s and latencies are medians over rounds, "
        "errors are totals.",
    ]


def command_output(argv: list[str]) -> str:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True).stdout.strip()


def libevent_version() -> str:
    try:
        fn = ctypes.CDLL("libevent-2.1.so.7").event_get_version
    except OSError:
        return "?"
    fn.restype = ctypes.c_char_p
    return str(fn().decode())


def report(
    header: list[str],
    django: list[Result],
    bare: list[Result],
    floors: dict[str, float],
    skipped: list[str],
) -> str:
    gunicorn = next((r for r in django if r.server.name.startswith("gunicorn")), None)
    c_prog = next((r for r in bare if r.server.name.startswith("C ")), None)
    lines = ["# Hello, world: requests/second", "", *header, ""]
    if django:
        lines += [
            '## Django view (`HttpResponse("Hello, world!")`, DEBUG=False)',
            "",
            *table(django, gunicorn, "gunicorn sync", floors.get("django")),
            "",
        ]
        if sweep := sweep_table(django):
            lines += ["### runcomet thread sweep (Django view)", "", *sweep, ""]
    if bare:
        lines += ["## Bare WSGI callable (no Django)", ""]
        lines += [*table(bare, c_prog, "C evhttp", floors.get("bare")), ""]
    if arithmetic := bar_arithmetic(django, bare, floors):
        lines += ["## What the missed bars need", "", *arithmetic, ""]
    lines += [f"- {s}" for s in skipped]
    return "\n".join(lines).rstrip() + "\n"


# -- main ---------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one round of 3 s runs")
    parser.add_argument("--duration", type=int, help="seconds measured per run (default 10)")
    parser.add_argument("--warmup", type=int, help="seconds of warm-up per run (default 2)")
    parser.add_argument("--rounds", type=int, help="runs per server (default 3)")
    parser.add_argument("--connections", type=int, default=50, help="wrk -c (default 50)")
    parser.add_argument("--only", default="", help="run only servers whose name contains this")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"default {RESULTS}")
    args = parser.parse_args()
    args.duration = args.duration or (3 if args.quick else 10)
    args.warmup = args.warmup or (1 if args.quick else 2)
    args.rounds = args.rounds or (1 if args.quick else 3)
    return args


def main() -> int:
    args = parse_args()
    for tool, package in (("wrk", "wrk"), ("taskset", "util-linux"), ("git", "git")):
        if not shutil.which(tool):
            print(f"error: `{tool}` not found (apt-get install {package})", file=sys.stderr)
            return 1
    if (os.cpu_count() or 1) < 2:
        print("warning: fewer than 2 CPUs: server and wrk share one", file=sys.stderr)
    # Ctrl-C and SIGTERM end the run through the `finally` that stops the current server.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    default = snapshot_source()
    header = environment(args)
    skipped: list[str] = []
    groups = {"django": django_servers(default, skipped), "bare": bare_servers(default, skipped)}
    results = {
        g: [Result(s) for s in servers if args.only in s.name] for g, servers in groups.items()
    }
    apps = {"django": DJANGO_WSGI, "bare": BARE_WSGI}
    floor_runs: dict[str, list[float]] = {g: [] for g in apps if results[g]}
    try:
        for n in range(1, args.rounds + 1):
            print(f"Round {n}/{args.rounds}:", flush=True)
            for group, runs in floor_runs.items():
                runs.append(app_floor_us(apps[group]))
                print(f"  {group} app alone, in-process: {runs[-1]:.1f} µs/request", flush=True)
            for result in results["django"] + results["bare"]:
                measure(result, args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    floors = {g: statistics.median(runs) for g, runs in floor_runs.items()}
    text = report(header, results["django"], results["bare"], floors, skipped)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"Written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

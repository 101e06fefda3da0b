"""Requests/second of "Hello, world!" on django-comet and on its peers, in one run.

    .venv/bin/python bench/hello/run.py [--quick] [--duration S] [--connections N] [--only TEXT]

Every server serves the same Django view (and, separately, a bare WSGI callable); each is
pinned to CPU 0 and wrk to CPU 1, over 127.0.0.1.  A server must answer one request with
200 "Hello, world!" before it is measured.  Each measurement is a warm-up, then one wrk
run.  Results are printed as Markdown and written to bench/results/hello.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import datetime
import http.client
import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CACHE = ROOT / "bench" / ".cache"
RESULTS = ROOT / "bench" / "results" / "hello.md"
PY = sys.executable
SERVER_CPU, WRK_CPU = "0", "1"
BODY = b"Hello, world!"
DJANGO_WSGI = "hello_site.wsgi:application"
BARE_WSGI = "bare_wsgi:app"

sys.path.insert(0, str(ROOT))
from django_comet.evloop.config import ServerConfig  # noqa: E402

DEFAULT_THREADS = ServerConfig.threads


class BenchError(Exception):
    pass


@dataclass
class Server:
    name: str
    command: Callable[[int], list[str]]  # port -> argv
    threads: int | None = None  # runcomet's --threads (None: not runcomet)


@dataclass
class Result:
    server: Server
    rps: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int] = field(default_factory=dict)


# -- the servers --------------------------------------------------------------------------


def runcomet(app: str, threads: int | None = None) -> Server:
    shown = DEFAULT_THREADS if threads is None else threads
    name = f"runcomet --threads {shown}" + (" (default)" if threads is None else "")
    extra = [] if threads is None else ["--threads", str(threads)]
    return Server(
        name,
        lambda port: [PY, "-m", "django_comet.evloop", app, f"127.0.0.1:{port}",
                      "--no-access-log", *extra],
        threads=shown,
    )


def django_servers(skipped: list[str]) -> list[Server]:
    servers = [runcomet(DJANGO_WSGI)]
    servers += [runcomet(DJANGO_WSGI, n) for n in sorted({0, 1, 4, 16} - {DEFAULT_THREADS})]
    servers.append(Server(
        "gunicorn -w 1 -k sync",
        lambda port: [PY, "-m", "gunicorn", "-w", "1", "-k", "sync", "-b", f"127.0.0.1:{port}",
                      "--log-level", "warning", DJANGO_WSGI],
    ))
    servers.append(Server(
        f"uvicorn, ASGI ({uvicorn_flavour()})",
        lambda port: [PY, "-m", "uvicorn", "hello_site.asgi:application", "--host", "127.0.0.1",
                      "--port", str(port), "--workers", "1", "--no-access-log",
                      "--log-level", "warning", "--lifespan", "off"],
    ))
    why = ensure_bjoern()
    if why:
        skipped.append(f"bjoern skipped: {why}")
    else:
        servers.append(Server(
            "bjoern", lambda port: [PY, "serve_bjoern.py", DJANGO_WSGI, str(port)]
        ))
    return servers


def bare_servers(skipped: list[str]) -> list[Server]:
    servers = [runcomet(BARE_WSGI, 0), runcomet(BARE_WSGI)]
    binary, why = build_evhttp_hello()
    if why:
        skipped.append(f"C evhttp_hello skipped: {why}")
    else:
        servers.append(Server("C evhttp_hello (no Python)", lambda port: [binary, str(port)]))
    return servers


def uvicorn_flavour() -> str:
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"{http}, {loop}"


def ensure_bjoern() -> str:
    """Install bjoern if it is missing; return why it is unavailable ("" if it is)."""
    if importlib.util.find_spec("bjoern"):
        return ""
    print("Installing bjoern (needs libev headers: apt-get install libev-dev) ...", flush=True)
    try:
        out = subprocess.run([PY, "-m", "pip", "install", "-q", "bjoern"], capture_output=True,
                             text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "pip install bjoern timed out"
    if out.returncode != 0:
        lines = (out.stdout + out.stderr).strip().splitlines()
        hint = next((ln for ln in lines if "ev.h" in ln), lines[-1] if lines else "")
        return f"pip install bjoern failed: {hint.strip()}"
    importlib.invalidate_caches()
    return ""


def build_evhttp_hello() -> tuple[str, str]:
    """Compile evhttp_hello.c; return (binary, "") or ("", why not)."""
    if not shutil.which("gcc"):
        return "", "gcc not found"
    CACHE.mkdir(parents=True, exist_ok=True)
    binary = CACHE / "evhttp_hello"
    base = ["gcc", "-O2", "-Wall", "-o", str(binary), str(HERE / "evhttp_hello.c")]
    for lib in ("-levent", "-l:libevent-2.1.so.7"):
        out = subprocess.run([*base, lib], capture_output=True, text=True, timeout=60)
        if out.returncode == 0:
            return str(binary), ""
    return "", f"gcc failed: {out.stderr.strip().splitlines()[-1:]}"


# -- running and measuring ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    """Start ``server`` on CPU 0, wait until it answers correctly, always stop it."""
    CACHE.mkdir(parents=True, exist_ok=True)
    log_path = CACHE / (re.sub(r"[^\w]+", "-", server.name).strip("-") + ".log")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, *server.command(port)], cwd=HERE, env=env,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
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
                raise BenchError(f"{server.name} did not answer within 30 s:\n{tail(log)}")
            time.sleep(0.1)
    if status != 200 or body != BODY:
        raise BenchError(f"{server.name} answered {status} {body[:200]!r}, "
                         f"not 200 {BODY!r}:\n{tail(log)}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):  # anything left in its group
        os.killpg(proc.pid, signal.SIGKILL)


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wrk(port: int, seconds: int, connections: int) -> dict[str, int]:
    argv = ["taskset", "-c", WRK_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
            "-s", str(HERE / "report.lua"), f"http://127.0.0.1:{port}/"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    match = re.search(r"^WRK_RESULT (.*)$", out.stdout, re.MULTILINE)
    if out.returncode != 0 or not match:
        raise BenchError(f"wrk failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    return {k: int(v) for k, v in (kv.split("=") for kv in match.group(1).split())}


def measure(server: Server, args: argparse.Namespace) -> Result:
    port = free_port()
    with running(server, port):
        wrk(port, args.warmup, args.connections)
        w = wrk(port, args.duration, args.connections)
    errors = {k: w[k] for k in ("status", "connect", "read", "write", "timeout") if w[k]}
    result = Result(server, w["requests"] / (w["duration_us"] / 1e6),
                    w["p50_us"] / 1000, w["p99_us"] / 1000, errors)
    print(f"  {server.name:<42} {result.rps:>9,.0f} req/s  {fmt_errors(errors)}", flush=True)
    return result


# -- reporting ----------------------------------------------------------------------------


def fmt_errors(errors: dict[str, int]) -> str:
    names = {"status": "non-2xx/3xx"}
    return ", ".join(f"{names.get(k, k)} {v}" for k, v in errors.items()) or "0"


def ratio(value: float, base: Result | None) -> str:
    return f"{value / base.rps:.2f}" if base else "n/a"


def table(results: list[Result], base: Result | None, base_label: str) -> list[str]:
    rows = [f"| server | req/s | vs {base_label} | p50 ms | p99 ms | errors |",
            "|---|---:|---:|---:|---:|---|"]
    for r in results:
        rows.append(f"| {r.server.name} | {r.rps:,.0f} | {ratio(r.rps, base)} "
                    f"| {r.p50_ms:.2f} | {r.p99_ms:.2f} | {fmt_errors(r.errors)} |")
    return rows


def sweep_table(results: list[Result]) -> list[str]:
    comet = sorted((r for r in results if r.server.threads is not None),
                   key=lambda r: r.server.threads or 0)
    if not comet:
        return []
    zero = next((r for r in comet if r.server.threads == 0), None)
    best = max(comet, key=lambda r: r.rps)
    rows = ["| --threads | req/s | vs --threads 0 | p99 ms |", "|---:|---:|---:|---:|"]
    for r in comet:
        mark = " (default)" if r.server.threads == DEFAULT_THREADS else ""
        star = " **best**" if r is best else ""
        rows.append(f"| {r.server.threads}{mark}{star} | {r.rps:,.0f} | {ratio(r.rps, zero)} "
                    f"| {r.p99_ms:.2f} |")
    return rows


def environment(args: argparse.Namespace) -> list[str]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), "unknown CPU")
    versions = [f"Python {platform.python_version()}"]
    for dist in ("django", "gunicorn", "uvicorn", "bjoern"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
    versions.append(f"libevent {libevent_version()}")
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()
    versions.append(" ".join(wrk_version[:2]))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    return [
        f"{datetime.datetime.now():%Y-%m-%d %H:%M} · {cpu} · nproc {os.cpu_count()} · "
        f"Linux {platform.release()} · commit {commit} (working tree may differ)",
        "",
        " · ".join(versions),
        "",
        f"Server pinned to CPU {SERVER_CPU}, wrk to CPU {WRK_CPU}, over 127.0.0.1: "
        f"`wrk -t1 -c{args.connections}`, {args.warmup} s warm-up then {args.duration} s "
        "measured, one run per server.",
    ]


def libevent_version() -> str:
    for name in ("libevent-2.1.so.7", ctypes.util.find_library("event")):
        with contextlib.suppress(OSError, TypeError):
            fn = ctypes.CDLL(name).event_get_version
            fn.restype = ctypes.c_char_p
            return str(fn().decode())
    return "unknown"


def report(args: argparse.Namespace, django: list[Result], bare: list[Result],
           skipped: list[str]) -> str:
    gunicorn = next((r for r in django if r.server.name.startswith("gunicorn")), None)
    c_prog = next((r for r in bare if r.server.name.startswith("C ")), None)
    lines = ["# Hello, world: requests/second", "", *environment(args), ""]
    if django:
        lines += ["## Django view (`HttpResponse(\"Hello, world!\")`, DEBUG=False)", "",
                  *table(django, gunicorn, "gunicorn sync"), ""]
        if sweep := sweep_table(django):
            lines += ["### runcomet thread sweep (Django view)", "", *sweep, ""]
    if bare:
        lines += ["## Bare WSGI callable (no Django)", "", *table(bare, c_prog, "C evhttp"), ""]
    lines += [f"- {s}" for s in skipped]
    return "\n".join(lines).rstrip() + "\n"


# -- main ---------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 s runs, 1 s warm-ups")
    parser.add_argument("--duration", type=int, help="seconds measured per server (default 10)")
    parser.add_argument("--warmup", type=int, help="seconds of warm-up per server (default 2)")
    parser.add_argument("--connections", type=int, default=50, help="wrk -c (default 50)")
    parser.add_argument("--only", default="", help="run only servers whose name contains this")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"default {RESULTS}")
    args = parser.parse_args()
    args.duration = args.duration or (3 if args.quick else 10)
    args.warmup = args.warmup or (1 if args.quick else 2)

    for tool in ("wrk", "taskset"):
        if not shutil.which(tool):
            print(f"error: `{tool}` not found; install it (apt-get install "
                  f"{'wrk' if tool == 'wrk' else 'util-linux'})", file=sys.stderr)
            return 1
    if (os.cpu_count() or 1) < 2:
        print("warning: fewer than 2 CPUs, server and wrk will share one", file=sys.stderr)
    # SIGTERM ends the run like Ctrl-C, so the finally clauses stop the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    skipped: list[str] = []
    groups = {"Django view": django_servers(skipped), "bare WSGI": bare_servers(skipped)}
    results: dict[str, list[Result]] = {}
    try:
        for group, servers in groups.items():
            print(f"{group}:", flush=True)
            results[group] = [measure(s, args) for s in servers if args.only in s.name]
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    text = report(args, results["Django view"], results["bare WSGI"], skipped)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"Written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

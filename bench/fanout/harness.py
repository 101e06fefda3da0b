"""What the fanout, broker and soak benchmarks share: servers in their own process group
pinned to a CPU, figures read from /proc, and the run's environment for the reports.

The benchmarks import this module (and ``client``) from bench/fanout/.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs"
PY = str(ROOT / ".venv" / "bin" / "python")
SERVER_CPU, CLIENT_CPU = 0, 1
TICK = os.sysconf("SC_CLK_TCK")

# Enough clients at once that every view thread of every server has run views before the
# idle RSS is read: their stacks and per-thread heaps are the server's fixed size, paid
# once, not a cost per held connection (with 20, runcomet's 8 threads added ~0.9 KiB per
# connection at N=1,000 and nothing measurable at 5,000).
WARM_UP_CLIENTS = 200


def build_c(source: Path, name: str) -> tuple[str, str]:
    """Compile ``source`` (a C program on libevent) into bench/.cache/``name``; return
    (binary, "") or ("", why not): the benches then run without it and say so."""
    if not shutil.which("gcc"):
        return "", "gcc not found"
    cache = ROOT / "bench" / ".cache"
    cache.mkdir(parents=True, exist_ok=True)
    binary = cache / name
    gcc = ["gcc", "-O2", "-Wall", "-o", str(binary), str(source)]
    why = ""
    for lib in ("-levent", "-l:libevent-2.1.so.7"):  # the second: no libevent-dev's .so
        out = subprocess.run([*gcc, lib], capture_output=True, text=True, timeout=60)
        if out.returncode == 0:
            return str(binary), ""
        why = "gcc failed: " + " / ".join(out.stderr.strip().splitlines()[-2:])
    return "", why


def prepare_client() -> None:
    """Pin this process to the client CPU, raise its fd limit, make SIGTERM a Ctrl-C."""
    os.sched_setaffinity(0, {CLIENT_CPU})
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def snapshot_source() -> Path:
    """Copy django_comet aside, so that every server of a run serves the same code even
    if the working tree is edited meanwhile; return the directory to put on PYTHONPATH."""
    target = Path(tempfile.mkdtemp(prefix="comet-bench-src-"))
    shutil.copytree(
        ROOT / "django_comet",
        target / "django_comet",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return target


def comet_env(snapshot: Path, db: Path, **extra: str) -> dict[str, str]:
    """Environment for ``manage.py runcomet`` of the test project (bench settings)."""
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "comet_settings",
        "PYTHONPATH": os.pathsep.join(map(str, [snapshot, ROOT, HERE])),
        "DEMO_DB": str(db),
        "TEST_SSE_HEARTBEAT": "60",
        **extra,
    }


def runcomet_argv(port: int, *extra: str) -> list[str]:
    manage = str(ROOT / "demo_site" / "manage.py")
    return [PY, manage, "runcomet", "--noreload", "--no-access-log", *extra, f"127.0.0.1:{port}"]


def migrate(env: dict[str, str]) -> None:
    argv = [PY, str(ROOT / "demo_site" / "manage.py"), "migrate", "--noinput", "-v0"]
    subprocess.run(argv, env=env, check=True, timeout=120, cwd=ROOT)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(port: int, path: str, timeout: float = 10) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise OSError(f"GET {path}: {response.status} {body[:200]!r}")
        return json.loads(body)
    finally:
        conn.close()


@contextlib.contextmanager
def server(
    argv: list[str], env: dict[str, str], port: int, ready_path: str, log: Path, cpu: int = 0
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``argv`` pinned to ``cpu`` in its own process group, wait until ``ready_path``
    answers 200, and always stop the whole group."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["taskset", "-c", str(cpu), *argv],
            cwd=HERE,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[:4]} exited {proc.returncode}:\n{tail(log)}")
            try:
                get_json(port, ready_path, timeout=2)
                break
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[:4]} not ready in 60 s:\n{tail(log)}") from None
                time.sleep(0.1)
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
            break
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# -- /proc -------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # fields from the 3rd (state) on


def group_pids(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (a server and its workers)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if int(_stat_fields(int(entry))[2]) == pgid:
                    pids.append(int(entry))
    return pids


def rss_kib(pgid: int) -> int:
    """VmRSS summed over the process group, in KiB."""
    total = 0
    for pid in group_pids(pgid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def cpu_seconds(pgid: int) -> float:
    """utime + stime summed over the process group."""
    total = 0
    for pid in group_pids(pgid):
        with contextlib.suppress(OSError):
            fields = _stat_fields(pid)
            total += int(fields[11]) + int(fields[12])
    return total / TICK


def fd_count(pgid: int) -> int:
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in group_pids(pgid))


def wait_until_idle(seconds: float = 1200, script: str = "bench/hello/run.py") -> None:
    """Do not measure while another benchmark runs on this machine (polls every 20 s)."""
    deadline = time.monotonic() + seconds
    while subprocess.run(["pgrep", "-f", script], capture_output=True).returncode == 0:
        if time.monotonic() > deadline:
            print(f"warning: {script} still running; measuring anyway", flush=True)
            return
        print(f"waiting for {script} to finish...", flush=True)
        time.sleep(20)


# -- reports -----------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of ``values`` (sorted or not); nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def environment(snapshot_note: str = "") -> list[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "?")
    versions = [f"Python {platform.python_version()}"]
    for dist in ("django", "gunicorn", "gevent", "uvicorn", "psycopg", "redis"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "django_comet"]).returncode
    rev = commit.stdout.strip() + (" with uncommitted changes to django_comet" if dirty else "")
    return [
        f"{datetime.datetime.now():%Y-%m-%d %H:%M} · {cpu} · nproc {os.cpu_count()} · "
        f"Linux {platform.release()} · commit {rev}",
        "",
        " · ".join(versions) + (f" · {snapshot_note}" if snapshot_note else ""),
    ]

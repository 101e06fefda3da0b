"""Real broker servers for the tests: a throwaway PostgreSQL cluster and redis-server.

Both listen on free loopback ports in temporary directories and are stopped at the end.
A port found free may be taken before the server binds it: each checks that it is the
server answering there, and redis-server starts again on another port if not.
PostgreSQL refuses to run as root, so as root (CI) the cluster runs as the `postgres`
system user that Debian's package creates.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PortTaken(RuntimeError):
    """The server exited at startup: the free port was taken before it bound it."""


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30) -> None:
    """Until something accepts on ``port``; given the server's ``proc``, until it is that
    server (one that exited lost the race for the port: PortTaken)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise PortTaken(f"{proc.args[0]} exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        if proc is None or proc.poll() is None:
            return


def _pg_bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


class PostgresServer:
    def __init__(self) -> None:
        self.bindir = _pg_bindir()
        if self.bindir is None:
            raise RuntimeError("PostgreSQL's initdb was not found (apt-get install postgresql)")
        self.root = tempfile.mkdtemp(prefix="comet-pg-")
        os.chmod(self.root, 0o755)
        self.datadir = os.path.join(self.root, "data")
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            os.makedirs(self.datadir)
            shutil.chown(self.datadir, "postgres", "postgres")
            shutil.chown(self.root, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run(
            "initdb", "-D", self.datadir, "-A", "trust", "-U", "comet", "-E", "UTF8", "--no-sync"
        )
        for attempt in range(5):  # free_port() can race another process for the port
            try:
                self.start()
                break
            except subprocess.CalledProcessError:
                if attempt == 4:
                    raise
                self.port = free_port()
        self.url = f"postgresql://comet@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self.as_user, os.path.join(self.bindir, tool), *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.root,
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off"
        )
        self._run(
            "pg_ctl",
            "-D",
            self.datadir,
            "-l",
            os.path.join(self.root, "log"),
            "-o",
            options,
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", self.datadir, "-m", "immediate", "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


class RedisServer:
    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server was not found (apt-get install redis-server)")
        self.root = tempfile.mkdtemp(prefix="comet-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        for attempt in range(5):  # free_port() can race another process for the port
            self.port = free_port()
            try:
                self.start()
                break
            except PortTaken:
                if attempt == 4:
                    raise
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.root,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(self.port, self.proc)
            try:  # and it is this redis-server that answers
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                    sock.sendall(b"PING\r\n")
                    answer = sock.recv(64)
            except OSError:
                answer = b""
            if not answer.startswith(b"+PONG"):
                raise PortTaken(f"another server answers on port {self.port}")
        except PortTaken:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

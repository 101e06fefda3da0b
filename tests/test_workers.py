"""Pre-forked workers (--workers) over a real broker: sharing a socket, surviving a
killed worker, and one status for the whole server."""

import contextlib
import glob
import http.client
import json
import os
import signal
import tempfile

import psutil
import pytest
import requests

from .processes import manage, wait_until
from .sse_client import SSEClient
from .test_brokers import manage_publish, start


@pytest.mark.parametrize("url", ["memory://", "Memory://"])  # (schemes know no case)
def test_workers_refused_with_the_memory_broker(demo_db, url):
    env = {"DEMO_DB": demo_db, "COMET_BROKER": url}
    result = manage("runcomet", "--noreload", "--workers", "2", "127.0.0.1:0", env=env)
    assert result.returncode == 1
    assert "needs a shared broker" in result.stderr


def test_workers_share_a_unix_socket_and_remove_it_when_stopped(broker, demo_db, tmp_path):
    path = str(tmp_path / "comet.sock")
    server = start(broker, demo_db, "--workers", "2", addrport=f"unix:{path}")
    try:
        with SSEClient(server, "/t/stream/?channels=over-unix") as client:
            event_id = manage_publish(broker, "over-unix", "hello")
            assert client.next_event() == {"id": str(event_id), "data": '"hello"'}
    finally:
        assert server.stop() == 0, "".join(server.output)
    assert not os.path.exists(path)


def test_killed_worker_clients_reconnect_and_lose_nothing(broker, demo_db):
    server = start(broker, demo_db, "--workers", "2")
    try:
        client = SSEClient(server, "/t/stream/?channels=survive")
        got = []
        first = manage_publish(broker, "survive", 0)
        got.append(client.next_event())
        # Kill the worker that holds this client's connection.
        client_port = client.sock.getsockname()[1]
        holder = next(
            child
            for child in psutil.Process(server.proc.pid).children()
            if any(c.raddr and c.raddr.port == client_port for c in child.net_connections("tcp"))
        )
        holder.send_signal(signal.SIGKILL)
        with pytest.raises(ConnectionError):
            while True:
                got.append(client.next_event())
        client.close()
        missed = [manage_publish(broker, "survive", i) for i in (1, 2)]
        last_id = got[-1]["id"]
        with SSEClient(
            server, "/t/stream/?channels=survive", headers=f"Last-Event-ID: {last_id}\r\n".encode()
        ) as again:
            more = [again.next_event() for _ in range(len(missed))]
        ids = [int(e["id"]) for e in got + more]
        assert ids == [first, *missed]  # every event once, in order
    finally:
        assert server.stop() == 0


def test_status_adds_up_every_workers_figures(broker, demo_db):
    """Under --workers, /comet/status/ and /comet/metrics are the whole server's figures
    whichever worker answers: streams held by either worker all count."""
    figure_dirs = os.path.join(tempfile.gettempdir(), "django-comet-figures-*")
    before = set(glob.glob(figure_dirs))
    server = start(broker, demo_db, "--workers", "2")
    clients = []
    try:
        parent = psutil.Process(server.proc.pid)
        wait_until(lambda: len(parent.children()) == 2)  # forked after the banner
        workers = parent.children()

        def holder(client):
            port = client.sock.getsockname()[1]
            return next(
                w.pid
                for w in workers
                if any(c.raddr and c.raddr.port == port for c in w.net_connections("tcp"))
            )

        holders = set()
        while len(holders) < 2:  # the kernel picks the worker: open streams until both hold some
            assert len(clients) < 100, "one worker accepted every connection"
            clients.append(SSEClient(server, "/t/stream/?channels=spread"))
            holders.add(holder(clients[-1]))
        status = server.wait_for_status(lambda s: s["channels"].get("spread") == len(clients))
        assert status["workers"] == 2 and status["streams"] == len(clients)
        assert sorted(w["pid"] for w in status["per_worker"]) == sorted(w.pid for w in workers)
        assert sum(w["streams"] for w in status["per_worker"]) == len(clients)

        # Whichever worker answers: another worker's figures are up to a second old (it
        # writes them once a second), so the sum is awaited, never read once.
        every_stream = f'comet_channel_subscribers{{channel="spread"}} {len(clients)}\n'

        def both_added_up():
            text = requests.get(server.url + "/comet/metrics", timeout=10).text
            return text if "comet_workers 2\n" in text and every_stream in text else None

        assert wait_until(both_added_up)
        for client in clients:
            client.close()
        server.wait_for_status(lambda s: s["held"] == 0 and "spread" not in s["channels"])
    finally:
        for client in clients:
            client.close()
        assert server.stop() == 0
    assert set(glob.glob(figure_dirs)) == before  # the parent removed its directory


def written_figures(pids, key, at_least):
    """The figures file of the worker (among ``pids``) with the highest ``key``, once the
    files of those workers add up to ``at_least`` of it; else None."""
    records = []
    pattern = os.path.join(tempfile.gettempdir(), "django-comet-figures-*", "*.json")
    for path in glob.glob(pattern):
        with contextlib.suppress(OSError, ValueError), open(path) as file:
            record = json.load(file)
            if record["pid"] in pids:
                records.append(record)
    if sum(r["figures"][key] for r in records) < at_least:
        return None
    return max(records, key=lambda r: r["figures"][key])


def test_the_servers_counters_survive_a_worker_dying(broker, demo_db):
    """A counter of the whole server never goes down (Prometheus would read a reset):
    a dead worker's requests stay counted, and its replacement carries them on."""
    server = start(broker, demo_db, "--workers", "2")
    try:
        parent = psutil.Process(server.proc.pid)
        wait_until(lambda: len(parent.children()) == 2)
        session = requests.Session()
        for _ in range(200):
            assert session.get(server.url + "/t/echo/", timeout=10).status_code == 200
        session.close()
        # Each worker writes its figures to a file once a second: wait until the files
        # hold all 200 (a worker killed now cannot take any of them with it).  One
        # keep-alive connection: one worker served them all.
        pids = {w.pid for w in parent.children()}
        busiest = wait_until(lambda: written_figures(pids, "requests", at_least=200))
        os.kill(busiest["pid"], signal.SIGKILL)
        after = server.wait_for_status(
            lambda s: (
                s["workers"] == 2 and busiest["pid"] not in [w["pid"] for w in s["per_worker"]]
            )
        )
        assert after["requests"] >= 200
    finally:
        assert server.stop() == 0


def test_a_counter_never_goes_down_from_one_workers_answer_to_anothers(broker, demo_db):
    """A worker answers the status with its own live figures and the others' as last
    written: another worker answering next read the first one's file, up to a second
    older than that answer, and said fewer requests (Prometheus reads a reset).  Each
    worker now writes what it answers with first (found by a review)."""
    server = start(broker, demo_db, "--workers", "2")
    connections = {}
    try:
        parent = psutil.Process(server.proc.pid)
        wait_until(lambda: len(parent.children()) == 2)
        workers = parent.children()

        def holder(conn):
            port = conn.sock.getsockname()[1]
            for worker in workers:
                if any(
                    c.laddr and c.raddr and c.raddr.port == port
                    for c in worker.net_connections("tcp")
                ):
                    return worker.pid
            return None

        def get(conn, path):
            conn.request("GET", path, headers={"Host": "127.0.0.1"})
            answer = conn.getresponse()
            assert answer.status == 200
            return answer.read()

        for _ in range(100):  # the kernel picks the worker: until both have one
            if len(connections) == 2:
                break
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            get(conn, "/t/echo/")
            pid = holder(conn)
            if pid is not None and pid not in connections:
                connections[pid] = conn
            else:
                conn.close()
        assert len(connections) == 2, "one worker accepted every connection"
        first, second = connections.values()
        for _ in range(3):
            for _ in range(50):
                get(first, "/t/echo/")
            said_first = json.loads(get(first, "/comet/status/"))["requests"]
            said_next = json.loads(get(second, "/comet/status/"))["requests"]
            assert said_next >= said_first
    finally:
        for conn in connections.values():
            conn.close()
        assert server.stop() == 0

"""Several runcomet processes sharing a real broker (PostgreSQL, Redis)."""

import json
import os
import signal

import psutil
import pytest
import requests

from .brokers import PostgresServer, RedisServer
from .processes import manage, runcomet
from .sse_client import SSEClient


@pytest.fixture(scope="module", params=["postgres", "redis"])
def broker(request):
    server = PostgresServer() if request.param == "postgres" else RedisServer()
    yield server
    server.destroy()


def start(broker, demo_db, *args, **kwargs):
    os.environ["COMET_BROKER"] = broker.url
    try:
        return runcomet(*args, db=demo_db, **kwargs)
    finally:
        del os.environ["COMET_BROKER"]


@pytest.fixture(scope="module")
def pair(broker, demo_db):
    a, b = start(broker, demo_db), start(broker, demo_db)
    yield a, b
    assert a.stop() == 0
    assert b.stop() == 0


def publish(server, channel, data):
    response = requests.post(
        server.url + "/t/publish/", data={"channel": channel, "data": json.dumps(data)}, timeout=30
    )
    assert response.status_code == 200, response.text
    return response.json()["id"]


def subscribed(server, channel, count=1):
    server.wait_for_status(lambda s: s["channels"].get(channel, 0) == count)


def manage_publish(broker, channel, data):
    result = manage(
        "comet_publish", channel, json.dumps(data), check=True, env={"COMET_BROKER": broker.url}
    )
    return int(result.stdout.strip())


def test_event_published_on_one_server_reaches_the_other(pair):
    a, b = pair
    with SSEClient(a, "/t/stream/?channels=shared") as client:
        subscribed(a, "shared")
        event_id = publish(b, "shared", {"from": "b"})
        assert client.next_event() == {"id": str(event_id), "data": '{"from":"b"}'}


def test_publish_from_a_management_command_reaches_runcomet(pair, broker):
    a, _ = pair
    with SSEClient(a, "/t/stream/?channels=cron") as client:
        subscribed(a, "cron")
        event_id = manage_publish(broker, "cron", {"job": "nightly"})
        assert client.next_event() == {"id": str(event_id), "data": '{"job":"nightly"}'}


def test_ids_grow_across_processes_and_replay_elsewhere(pair):
    a, b = pair
    ids = [publish(a if i % 2 else b, "resume", i) for i in range(4)]
    assert ids == sorted(ids)
    with SSEClient(
        b, "/t/stream/?channels=resume", headers=b"Last-Event-ID: %d\r\n" % ids[0]
    ) as client:
        assert [client.next_event()["id"] for _ in range(3)] == [str(i) for i in ids[1:]]


def test_long_poll_cursor_answers_from_shared_history(pair):
    a, b = pair
    first = publish(a, "lp-shared", "x")
    second = publish(a, "lp-shared", "y")
    answer = requests.get(b.url + f"/t/poll/?channel=lp-shared&since={first}&timeout=30").json()
    assert answer["event"]["id"] == second


def test_delivery_resumes_after_the_broker_restarts(pair, broker):
    a, b = pair
    with SSEClient(a, "/t/stream/?channels=restart") as client:
        subscribed(a, "restart")
        broker.stop()
        broker.start()
        event_id = publish(b, "restart", "after")  # B's publishing connection reconnects
        assert client.next_event() == {"id": str(event_id), "data": '"after"'}


def test_large_payload_goes_through(pair):
    a, b = pair
    big = "z" * 20000  # over NOTIFY's 8000-byte payload limit
    with SSEClient(a, "/t/stream/?channels=bulky") as client:
        subscribed(a, "bulky")
        event_id = publish(b, "bulky", big)
        assert client.next_event() == {"id": str(event_id), "data": json.dumps(big)}


def test_workers_refused_with_the_memory_broker(demo_db):
    result = manage(
        "runcomet", "--noreload", "--workers", "2", "127.0.0.1:0", env={"DEMO_DB": demo_db}
    )
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

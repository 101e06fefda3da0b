"""Broker servers that freeze (SIGSTOP, a paused VM): their connections stay open and
their kernels acknowledge what they are sent, so neither TCP nor the keepalives tell.
The listeners and publishers find out, and go on once the server answers again."""

import contextlib
import os
import signal
import subprocess
import threading

import pytest

from .brokers import PostgresServer, RedisServer
from .processes import wait_until


def test_a_frozen_redis_is_found_out_by_its_listener(monkeypatch):
    """A Redis that stops answering (SIGSTOP, a paused VM) keeps its connections open,
    and its kernel acknowledges what it is sent: the listener said it was listening
    through the freeze (its PING went out, its answer was never waited for)."""
    from django_comet.brokers import redis as redis_broker

    monkeypatch.setattr(redis_broker, "LISTEN_PING_AFTER", 0.2)
    monkeypatch.setattr(redis_broker, "LISTEN_REPLY_WITHIN", 0.5)
    redis = RedisServer()
    listener = redis_broker.RedisBroker(redis.url)
    try:
        listener.start_listening()  # a thread of its own, as without a loop
        assert listener.connected.wait(10)
        redis.proc.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: not listener.connected.is_set(), timeout=20)
        finally:
            redis.proc.send_signal(signal.SIGCONT)
        assert listener.connected.wait(20)  # and back once Redis answers again
    finally:
        listener.close()
        redis.destroy()


def test_a_publish_to_a_frozen_postgresql_fails_instead_of_waiting_for_ever(monkeypatch):
    """A PostgreSQL that stops answering (SIGSTOP, a paused VM) keeps its connections
    open, and its kernel acknowledges what it is sent: a publish on a connection made
    before waited for as long as it stayed frozen, and its view thread with it."""
    from django_comet.brokers import postgres

    monkeypatch.setattr(postgres, "REPLY_WITHIN", 0.5)
    server = PostgresServer()
    publisher = postgres.PostgresBroker(postgres.conninfo_from_url(server.url))
    warm, go, outcome = threading.Event(), threading.Event(), []

    def publish_twice():  # on one thread: its connection is made by the first
        publisher.publish("frozen", '"before"')
        warm.set()
        go.wait()
        try:
            outcome.append(publisher.publish("frozen", '"during"'))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=publish_twice, daemon=True)
    thread.start()
    try:
        assert warm.wait(30)
        with frozen(server):
            go.set()
            thread.join(60)  # its own new connection waits connect_timeout (5 s) too
            assert outcome and isinstance(outcome[0], publisher.psycopg.OperationalError)
        assert publisher.publish("frozen", '"after"') > 0  # and on again once it answers
    finally:
        publisher.close()
        server.destroy()


@pytest.mark.parametrize("with_loop", [False, True], ids=["thread", "loop"])
def test_a_frozen_postgresql_is_found_out_by_its_listener(monkeypatch, with_loop):
    """The LISTEN connection of a frozen PostgreSQL stays open, and quiet: the listener
    said it was listening through the freeze.  It checks after a silence (under a loop,
    a NOTIFY of its own that must come back; without, a query), and reconnects."""
    from django_comet.brokers import postgres
    from django_comet.evloop.hub import hub
    from django_comet.evloop.loop import Loop

    monkeypatch.setattr(postgres, "LISTEN_PING_AFTER", 0.2)
    monkeypatch.setattr(postgres, "LISTEN_REPLY_WITHIN", 2.0)
    server = PostgresServer()
    listener = postgres.PostgresBroker(postgres.conninfo_from_url(server.url))
    loop = Loop() if with_loop else None
    looping = threading.Thread(target=loop.run, daemon=True) if loop else None
    try:
        if looping:
            looping.start()
        listener.start_listening(loop)
        assert listener.connected.wait(30)
        if loop:  # a healthy server answers each check: no reconnect meanwhile
            wait_until(lambda: listener._pings >= 3)
            assert listener._generation == 0
        with frozen(server):
            wait_until(lambda: not listener.connected.is_set(), timeout=20)
        assert listener.connected.wait(30)  # and back once it answers again
        event_id = listener.publish("after-freeze", '"heard"')
        wait_until(lambda: hub.last_id >= event_id)
    finally:
        listener.close()
        if loop and looping:
            loop.call_soon_threadsafe(loop.stop)
            looping.join(10)
            loop.close()
        server.destroy()


@contextlib.contextmanager
def frozen(server):
    """PostgreSQL stopped (SIGSTOP: its postmaster and every backend) until the block
    ends, as a paused VM is."""
    with open(f"{server.datadir}/postmaster.pid") as pid_file:
        postmaster = int(pid_file.readline())
    children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True)
    pids = [postmaster, *map(int, children.stdout.split())]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)

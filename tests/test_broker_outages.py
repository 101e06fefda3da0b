"""Brokers that go away, come back, start late or lose their data: the server keeps
serving, and nothing old is taken for new nor anything new dropped."""

import concurrent.futures
import contextlib
import json
import re
import signal
from types import SimpleNamespace

import pytest
import requests

from .brokers import PostgresServer, RedisServer, free_port
from .processes import read_body, runcomet, wait_until
from .proxy import Proxy
from .sse_client import SSEClient
from .test_brokers import manage_publish, publish, start, subscribed


def test_each_view_thread_gets_a_fresh_connection_after_a_restart(broker, demo_db):
    """A restart leaves every thread's connection dead; the next query on it retries on
    a new one instead of failing the request."""
    if not isinstance(broker, PostgresServer):
        pytest.skip("redis-py reconnects by itself")
    server = start(broker, demo_db, "--threads", "1")  # one thread: the one that connected
    try:
        first = publish(server, "pg-restart", 1)
        url = server.url + f"/t/fastpoll/?channel=pg-restart&since={first - 1}"
        assert requests.get(url, timeout=30).status_code == 200
        import psycopg

        with psycopg.connect(broker.url, autocommit=True) as conn:
            conn.execute("CHECKPOINT")  # the test server's immediate stop loses the rest
        broker.stop()
        broker.start()
        answer = requests.get(url, timeout=30)
        assert answer.status_code == 200, answer.text
        assert [e["id"] for e in answer.json()["events"]] == [first]
    finally:
        assert server.stop() == 0, "".join(server.output)


@pytest.mark.parametrize("workers", [None, "2"])
def test_a_database_down_at_startup_does_not_stop_the_server(demo_db, workers):
    closed = free_port()
    args = ("--workers", workers) if workers else ()
    server = runcomet(
        *args, db=demo_db, env={"COMET_BROKER": f"postgresql://127.0.0.1:{closed}/nothing"}
    )
    try:
        for _ in range(4):  # every worker, most likely
            assert requests.get(server.url + "/t/echo/", timeout=30).status_code == 200
        assert server.logged("PostgreSQL unreachable")
    finally:
        assert server.stop() == 0, "".join(server.output)


def test_a_redis_slow_at_startup_feeds_no_old_event_to_a_fresh_stream(demo_db):
    """The first connection of a process does not load the catch-up log into its hub: a
    stream that started before it must not get old events as new ones."""
    redis = RedisServer()
    try:
        for n in range(3):
            manage_publish(redis, "old-news", n)
        redis.proc.send_signal(signal.SIGSTOP)  # the listener cannot connect yet
        server = start(redis, demo_db, listening=False)
        try:
            assert server.status()["broker_listening"] is False
            with SSEClient(server, "/t/stream/?channels=old-news") as client:
                subscribed(server, "old-news")
                redis.proc.send_signal(signal.SIGCONT)
                # (Its cursor could not be read from Redis: what is published before the
                # listener connects is not for it; see docs/deployment.md.)
                server.wait_for_status(lambda s: s["broker_listening"], timeout=30)
                fresh = publish(server, "old-news", "new")
                assert client.next_event() == {"id": str(fresh), "data": '"new"'}
        finally:
            assert server.stop() == 0, "".join(server.output)
    finally:
        redis.proc.send_signal(signal.SIGCONT)
        redis.destroy()


def test_a_stream_opened_before_its_process_listens_misses_nothing(demo_db):
    """Until a process listens, its hub cannot say what comes next: a stream opened then
    gets its cursor from the broker, and the first listen catches up from it, so that an
    event published in between reaches it, and none from before.  (Redis, where a proxy
    can hold back the listener's connection alone, once it asks to SUBSCRIBE; the
    PostgreSQL broker shares the code.)"""
    redis = RedisServer()
    proxy = Proxy(redis.port, hold_on=b"SUBSCRIBE")
    try:
        manage_publish(redis, "early", "old")
        server = start(
            SimpleNamespace(url=f"redis://127.0.0.1:{proxy.port}/0"), demo_db, listening=False
        )
        try:
            with SSEClient(server, "/t/stream/?channels=early") as client:
                subscribed(server, "early")
                assert server.status()["broker_listening"] is False
                fresh = manage_publish(redis, "early", "new")
                proxy.release()
                assert client.next_event() == {"id": str(fresh), "data": '"new"'}
        finally:
            assert server.stop() == 0, "".join(server.output)
    finally:
        proxy.close()
        redis.destroy()


def test_ids_keep_growing_when_redis_restarts_without_its_data(demo_db):
    """A Redis that lost its counter (no persistence) starts it again from the clock in
    microseconds: the new ids are above the old ones, even after a burst faster than a
    clock in milliseconds (where they started before)."""
    redis = RedisServer()
    try:
        server = start(redis, demo_db)
        try:
            last = publish(server, ",".join(["burst"] * 3000), "x")
            with SSEClient(server, "/t/stream/?channels=across-loss") as across:
                subscribed(server, "across-loss")
                seen = publish(server, "across-loss", "before")
                assert across.next_event()["id"] == str(seen)
                redis.stop()
                redis.start()
                # What this process had not received before the loss is gone: the
                # streams that lived across it are told, once its listener is back.
                assert across.next_event()["event"] == "comet-history-gap"
                assert server.logged("Redis lost its data")
                # A client with no state gets a cursor of the new epoch: never a gap.
                poll = server.url + "/t/fastpoll/?channel=across-loss&timeout=0.1"
                fresh_cursor = requests.get(poll, timeout=30).json()["last_id"]
                after = publish(server, "across-loss", "after")
                assert across.next_event() == {"id": str(after), "data": '"after"'}
                polled = requests.get(poll + f"&since={fresh_cursor}", timeout=30).json()
                assert "gap" not in polled and [e["id"] for e in polled["events"]] == [after]
                # Told once: a later reconnect finds nothing new.
                cut_listener(redis)
                assert logged_times(server, "RedisBroker connection lost", 2)
                server.wait_for_status(lambda s: s["broker_listening"], timeout=30)
                again = publish(server, "across-loss", "again")
                assert across.next_event() == {"id": str(again), "data": '"again"'}
            with SSEClient(server, "/t/stream/?channels=after-loss") as client:
                subscribed(server, "after-loss")
                fresh = publish(server, "after-loss", "y")
                assert fresh > last
                assert client.next_event() == {"id": str(fresh), "data": '"y"'}
            # A cursor from before the loss is told of the gap too, in a replay.
            url = server.url + f"/t/fastpoll/?channel=across-loss&since={seen}"
            replayed = requests.get(url, timeout=30).json()
            assert replayed["gap"] is True
            assert [e["id"] for e in replayed["events"]] == [after, again]
        finally:
            assert server.stop() == 0, "".join(server.output)
    finally:
        redis.destroy()


def logged_times(server, text, count):
    """Whether ``text`` is in ``count`` lines of the server's output, within a deadline."""
    with server._more_output:
        return server._more_output.wait_for(
            lambda: sum(text in line for line in server.output) >= count, 20
        )


def test_replays_while_the_broker_is_away_read_this_process_history_at_once(demo_db):
    """Once its listener has lost the broker, a replay (a poll's cursor, a stream's
    Last-Event-ID) reads this process's own history without asking the broker: each
    asked it, and waited for its timeouts (a frozen one held every view thread), and
    each said so in the log."""
    redis = RedisServer()
    try:
        server = start(redis, demo_db)
        try:
            kept = publish(server, "away", "kept")
            redis.stop()
            server.wait_for_status(lambda s: not s["broker_listening"], timeout=30)
            for _ in range(5):
                url = server.url + f"/t/fastpoll/?channel=away&since={kept - 1}&timeout=0.1"
                answer = requests.get(url, timeout=30)
                assert [e["id"] for e in answer.json()["events"]] == [kept]
            # (Logged from a view's thread, and read from the server's on a thread of
            # the test's: it may come after the answers.)
            assert server.logged("Broker unreachable")
        finally:
            assert server.stop() == 0, "".join(server.output)
        said = [line for line in server.output if "Broker unreachable" in line]  # (all of it)
        assert len(said) == 1 and "lost by its listener" in said[0], said
    finally:
        redis.destroy()


def test_replays_after_one_found_the_broker_frozen_read_this_process_history(demo_db):
    """A broker frozen (SIGSTOP), not gone: its listener finds out only after its own
    wait for a word (up to 40 s), and until then each replay waited for the broker's
    timeout on a view thread, so that a few pollers held every one (found by a review).
    Once a replay's read has failed, the next ones read this process's history at once:
    they are all answered while a publish, which must wait for the broker, still does."""
    redis = RedisServer()
    try:
        server = start(redis, demo_db)
        try:
            kept = publish(server, "frozen", "kept")
            url = server.url + f"/t/fastpoll/?channel=frozen&since={kept - 1}&timeout=0.1"
            assert redis.proc is not None
            redis.proc.send_signal(signal.SIGSTOP)
            pool = concurrent.futures.ThreadPoolExecutor(1)
            try:
                first = requests.get(url, timeout=60)  # (after the broker's timeout)
                assert [e["id"] for e in first.json()["events"]] == [kept]
                waiting = pool.submit(
                    requests.post,
                    server.url + "/t/publish/",
                    data={"channel": "frozen", "data": "1"},
                    timeout=60,
                )
                for _ in range(8):  # (each would wait for the broker's timeout in turn)
                    answer = requests.get(url, timeout=60)
                    assert [e["id"] for e in answer.json()["events"]] == [kept]
                assert not waiting.done()
            finally:
                redis.proc.send_signal(signal.SIGCONT)
                pool.shutdown()
        finally:
            assert server.stop() == 0, "".join(server.output)
    finally:
        redis.destroy()


def test_the_reconnect_backoff_starts_short_again_after_each_recovery(demo_db):
    import redis as redis_py

    redis = RedisServer()
    try:
        server = start(redis, demo_db)
        try:
            with redis_py.Redis.from_url(redis.url) as admin:
                for outage in (1, 2):
                    with SSEClient(server, "/t/stream/?channels=backoff") as client:
                        subscribed(server, "backoff")
                        fresh = publish(server, "backoff", outage)
                        assert client.next_event()["id"] == str(fresh)  # listening
                    admin.client_kill_filter(_type="pubsub")
                    assert logged_times(server, "retrying in", outage)
            retries = [line for line in server.output if "retrying in" in line]
            assert len(retries) == 2 and all("retrying in 0.1s" in r for r in retries), retries
        finally:
            assert server.stop() == 0, "".join(server.output)
    finally:
        redis.destroy()


def test_a_bare_postgres_url_keeps_the_databases_tls_settings():
    from django.db.backends.postgresql.base import DatabaseWrapper

    from django_comet.brokers.postgres import conninfo_from_url

    database = DatabaseWrapper(
        {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": "app",
            "USER": "u",
            "PASSWORD": "p w'",
            "HOST": "db.example",
            "PORT": "5432",
            "OPTIONS": {"sslmode": "verify-full", "sslrootcert": "/etc/ca.pem"},
            "CONN_MAX_AGE": 0,
            "CONN_HEALTH_CHECKS": False,
            "AUTOCOMMIT": True,
            "ATOMIC_REQUESTS": False,
            "TIME_ZONE": None,
            "TEST": {},
        }
    )
    import psycopg

    params = psycopg.conninfo.conninfo_to_dict(conninfo_from_url("postgres://", database))
    assert params["sslmode"] == "verify-full" and params["sslrootcert"] == "/etc/ca.pem"
    assert (params["dbname"], params["user"], params["password"]) == ("app", "u", "p w'")
    assert (params["host"], params["port"]) == ("db.example", "5432")


def cut_listener(broker):
    """Close the broker's side of every listening connection (the server's)."""
    if isinstance(broker, PostgresServer):
        import psycopg

        with psycopg.connect(broker.url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name LIKE 'django_comet listen %'"
            )
    else:
        import redis as redis_py

        with redis_py.Redis.from_url(broker.url) as admin:
            admin.client_kill_filter(_type="pubsub")


@contextlib.contextmanager
def away_from(broker, server):
    """For the block, ``server`` is away from ``broker``: stopped (it cannot even
    reconnect), its listener's connection cut."""
    server.proc.send_signal(signal.SIGSTOP)
    try:
        cut_listener(broker)
        yield
    finally:
        server.proc.send_signal(signal.SIGCONT)


def test_streams_hear_of_events_lost_while_their_process_was_away(broker, demo_db):
    """A process away from the broker for longer than its catch-up reaches back (the
    table's history, Redis' log) cannot deliver what it missed: its streams are told,
    and so are its long-polls, with the events after the gap (a held poll's answer was
    given without `gap`, and its client's cursor passed the lost events unawares)."""
    from django_comet.brokers import broker_from_url

    publisher = broker_from_url(broker.url, history_size=5)  # another server, as it were
    server = start(broker, demo_db, env={"TEST_HISTORY_SIZE": "5"})
    try:
        with SSEClient(server, "/t/stream/?channels=away") as client, server.connect() as poll:
            subscribed(server, "away")
            before = publisher.publish("away", '"before"')
            assert client.next_event()["data"] == '"before"'
            poll.sendall(
                b"GET /t/fastpoll/?channel=away&since=%d&timeout=60 HTTP/1.1\r\n"
                b"Host: 127.0.0.1\r\n\r\n" % before
            )
            subscribed(server, "away", 2)
            with away_from(broker, server):
                for n in range(300):
                    last_away = publisher.publish("away", str(n))
                for n in range(300):  # pruned further: each channel has its own mark
                    publisher.publish("busy", str(n))
            assert client.next_event()["event"] == "comet-history-gap"
            assert server.logged("the gap event")
            # The catch-up's events after the gap answer it, or (none left: Redis' one
            # log for all channels was filled by "busy") the next one does.
            back = publisher.publish("away", '"back"')
            polled = json.loads(read_body(poll))
            assert polled["gap"] is True, polled
            assert before < polled["events"][0]["id"] <= back
            assert last_away < back
        server.wait_for_status(lambda s: "away" not in s["channels"])  # that one has gone
        # Told once, to those it concerns: not to a later client that missed nothing...
        with SSEClient(
            server, "/t/stream/?channels=away", headers=b"Last-Event-ID: %d\r\n" % back
        ) as client:
            subscribed(server, "away")
            after = publisher.publish("away", '"after"')
            got = client.next_event()
            assert got == {"id": str(after), "data": '"after"'}, (got, back)
        # ... nor to one starting afresh on another channel.
        fresh = requests.get(server.url + "/t/fastpoll/?channel=unused&since=0&timeout=0.1")
        assert fresh.json()["events"] == [] and "gap" not in fresh.json(), fresh.json()
    finally:
        publisher.close()
        assert server.stop() == 0, "".join(server.output)


def test_a_catch_up_reads_as_many_events_as_redis_log_keeps(broker, demo_db):
    """A process away while many channels got events: its catch-up reads the newest 10
    x COMET_HISTORY_SIZE (at least 100), as Redis' log keeps, and what is older is a gap
    on every channel (PostgreSQL's table, which keeps a history per channel, was read
    whole, into memory at once)."""
    from django_comet.brokers import broker_from_url

    publisher = broker_from_url(broker.url, history_size=5)
    server = start(broker, demo_db, env={"TEST_HISTORY_SIZE": "5"})
    try:
        with SSEClient(server, "/t/stream/?channels=spread-0") as client:
            subscribed(server, "spread-0")
            with away_from(broker, server):
                for n in range(120):  # one event on each of 120 channels: none pruned
                    publisher.publish(f"spread-{n}", str(n))
            assert client.next_event()["event"] == "comet-history-gap"
            if isinstance(broker, PostgresServer):
                assert server.logged("missed more than 100 events")
    finally:
        publisher.close()
        assert server.stop() == 0, "".join(server.output)


def test_a_catch_up_larger_than_the_bound_reaches_streams_that_read(broker, demo_db):
    """What a process missed while away comes in a burst when it is back: 300 KB here,
    for a 64 KiB bound on a stream's unsent output.  Its streams take it at their pace,
    from the history, in order (each was cut as a slow reader, and reconnected)."""
    from django_comet.brokers import broker_from_url

    publisher = broker_from_url(broker.url, history_size=1000)
    env = {"TEST_HISTORY_SIZE": "1000", "TEST_MAX_PENDING_OUTPUT": str(64 * 1024)}
    server = start(broker, demo_db, env=env)
    try:
        with SSEClient(server, "/t/stream/?channels=burst") as client:
            subscribed(server, "burst")
            with away_from(broker, server):
                published = [publisher.publish("burst", json.dumps("x" * 1000)) for _ in range(300)]
            assert [int(client.next_event()["id"]) for _ in range(300)] == published
            status = server.status()
            assert status["dropped_slow"] == 0 and status["channels"]["burst"] == 1
    finally:
        publisher.close()
        assert server.stop() == 0, "".join(server.output)


def test_a_large_event_pruned_before_its_process_read_it_is_a_gap(broker, demo_db):
    """An event too large for NOTIFY is read from the table.  A process that comes to it
    after it was pruned (stopped here; far behind, in life) cannot deliver it: its streams
    get the gap event, in its place, and the events after it.  One gap event for a run of
    them: each one lost was a gap event of its own, all alike (a review saw 298 in a row,
    and comet.js called onGap for each)."""
    if not isinstance(broker, PostgresServer):
        pytest.skip("NOTIFY's payload limit is PostgreSQL's")
    from django_comet.brokers import broker_from_url
    from django_comet.brokers.postgres import PRUNE_EVERY

    publisher = broker_from_url(broker.url, history_size=5)
    server = start(broker, demo_db, env={"TEST_HISTORY_SIZE": "5"})
    try:
        with SSEClient(server, "/t/stream/?channels=pruned-big") as client:
            subscribed(server, "pruned-big")
            server.proc.send_signal(signal.SIGSTOP)
            try:
                bigs = [publisher.publish("pruned-big", json.dumps("z" * 9000)) for _ in range(3)]
                after = [publisher.publish("pruned-big", str(n)) for n in range(PRUNE_EVERY)]
            finally:
                server.proc.send_signal(signal.SIGCONT)
            gap = client.next_event()
            assert gap["event"] == "comet-history-gap", gap
            assert [client.next_event()["id"] for _ in after] == [str(i) for i in after]

            def said_of_each():  # (read one at a time or together: a log line each time)
                said = "".join(line for line in server.output if "pruned before" in line)
                return all(re.search(rf"\b{big}\b", said) for big in bigs)

            wait_until(said_of_each)
    finally:
        publisher.close()
        assert server.stop() == 0, "".join(server.output)


def lose_a_large_event(broker, channel):
    """An event too large for NOTIFY, deleted before any process could read it (as the
    pruning does to a process far behind); its id."""
    import psycopg

    from django_comet.brokers.postgres_sql import LOCK_KEY, NOTIFY_CHANNEL

    with psycopg.connect(broker.url, autocommit=True) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        event_id = conn.execute(
            "INSERT INTO comet_event (channel, data) VALUES (%s, %s) RETURNING id",
            (channel, json.dumps("z" * 9000)),
        ).fetchone()[0]
        conn.execute("DELETE FROM comet_event WHERE id = %s", (event_id,))
        conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, json.dumps([event_id, channel])))
    return event_id


def test_a_loss_after_the_gap_a_stream_was_told_of_is_told_too(broker, demo_db):
    """A run of losses known when a gap event is written is that one gap event; a loss
    of an event published later is news (the page reloaded its state meanwhile), and
    was left untold when no event came between (found by a review)."""
    if not isinstance(broker, PostgresServer):
        pytest.skip("NOTIFY's payload limit is PostgreSQL's")
    server = start(broker, demo_db)
    try:
        with SSEClient(server, "/t/stream/?channels=losses") as client:
            subscribed(server, "losses")
            lose_a_large_event(broker, "losses")
            assert client.next_event()["event"] == "comet-history-gap"
            lose_a_large_event(broker, "losses")
            after = publish(server, "losses", "after")
            assert client.next_event()["event"] == "comet-history-gap"
            assert client.next_event()["id"] == str(after)
    finally:
        assert server.stop() == 0, "".join(server.output)


def test_replays_come_from_this_processs_history_while_the_broker_is_down(broker, demo_db):
    """Kept last in this module: it stops the module's broker (a Redis loses its data)."""
    manage_publish(broker, "down-replay", "earlier")  # (so that early - 1 is not 0)
    early = manage_publish(broker, "down-replay", "early")  # before the server listens
    server = start(broker, demo_db)
    try:
        with SSEClient(server, "/t/stream/?channels=down-replay") as client:
            subscribed(server, "down-replay")
            told = publish(server, "readme", "told")  # delivered in order, before ids
            ids = [publish(server, "down-replay", n) for n in range(3)]
            assert [client.next_event()["id"] for _ in ids] == [str(i) for i in ids]
        broker.stop()
        try:
            url = server.url + "/t/fastpoll/?channel=down-replay&since={}&timeout=0.1"
            within = requests.get(url.format(ids[0]), timeout=30)
            assert within.status_code == 200, within.text
            assert within.json() == {
                "events": [{"id": ids[1], "data": 1}, {"id": ids[2], "data": 2}],
                "last_id": ids[2],
            }
            # From before this process listened: it cannot know what it missed.
            before = requests.get(url.format(early - 1), timeout=30)
            assert before.status_code == 200, before.text
            assert before.json()["gap"] is True
            # A view of your own that reads history() (the README's) answers too.
            readme = requests.get(server.url + f"/t/readme-wait/?since={told - 1}", timeout=30)
            assert readme.status_code == 200, readme.text
            assert [(e["id"], e["data"]) for e in readme.json()["events"]] == [(told, "told")]
            assert server.logged("replaying from this process's history")
        finally:
            broker.start()
    finally:
        assert server.stop() == 0, "".join(server.output)


@pytest.mark.parametrize("seen", ["received", "handed-out"])
def test_ids_that_go_back_go_on_past_what_was_seen(broker, demo_db, seen):
    """A failover to a standby or replica that lagged, or a restore, takes the broker's
    ids back: every id handed out again would be taken for an old one, and dropped, by a
    process that saw the first.  Its listener, reconnecting, moves the ids past them:
    past the events it received, and past the cursors it handed out (every id up to
    where it began listening: a process that received nothing gave its stream one)."""
    channel = f"went-back-{seen}"
    ids = [manage_publish(broker, channel, n) for n in range(5)]  # before it listens
    server = start(broker, demo_db)
    try:
        with SSEClient(server, f"/t/stream/?channels={channel}") as client:
            subscribed(server, channel)
            if seen == "received":
                ids = [publish(server, channel, n) for n in range(5)]
                assert [client.next_event()["id"] for _ in ids] == [str(i) for i in ids]
            take_ids_back_to(broker, ids[1])
            cut_listener(broker)
            assert server.logged("newest event id went back")
            server.wait_for_status(lambda s: s["broker_listening"], timeout=30)
            again = manage_publish(broker, channel, "again")
            assert again > ids[-1]
            assert client.next_event() == {"id": str(again), "data": '"again"'}
    finally:
        assert server.stop() == 0, "".join(server.output)


def test_ids_that_go_back_under_a_publish_before_the_listener_knows_go_on_past(broker, demo_db):
    """The ids go back (a crash that lost commits under ``synchronous_commit = off``, a
    failover) and a view publishes before the listener's reconnection tells: its event
    takes an id past those its process has seen. It took one of them again, and every
    stream that had had the first dropped it as old, with no word logged (found by a
    review of events across workers)."""
    channel = "went-back-under-a-publish"
    server = start(broker, demo_db)
    try:
        with SSEClient(server, f"/t/stream/?channels={channel}") as client:
            subscribed(server, channel)
            ids = [publish(server, channel, n) for n in range(5)]
            assert [client.next_event()["id"] for _ in ids] == [str(i) for i in ids]
            take_ids_back_to(broker, ids[1])  # (the listener stays connected)
            again = publish(server, channel, "again")
            assert again > ids[-1]
            assert client.next_event() == {"id": str(again), "data": '"again"'}
            assert server.logged("newest event id went back")
    finally:
        assert server.stop() == 0, "".join(server.output)


def test_tables_dropped_under_running_processes_are_made_again(broker, demo_db):
    """A database recreated, or restored without the broker's tables: the processes
    make them again, as on first use (every publish was a 500, and the listener retried
    for ever), and their ids go on past those they saw."""
    if not isinstance(broker, PostgresServer):
        pytest.skip("Redis has no tables")
    channel = "tables-gone"
    server = start(broker, demo_db)
    try:
        with SSEClient(server, f"/t/stream/?channels={channel}") as client:
            subscribed(server, channel)
            first = publish(server, channel, 1)
            assert client.next_event()["id"] == str(first)
            drop_tables(broker)
            again = publish(server, channel, 2)  # on a view thread's connection
            assert again > first
            assert client.next_event() == {"id": str(again), "data": "2"}
            drop_tables(broker)
            cut_listener(broker)  # its catch-up finds no table
            assert server.logged("making the tables again")
            server.wait_for_status(lambda s: s["broker_listening"], timeout=30)
            last = manage_publish(broker, channel, 3)
            assert last > again
            assert client.next_event() == {"id": str(last), "data": "3"}
    finally:
        assert server.stop() == 0, "".join(server.output)


def drop_tables(broker):
    import psycopg

    with psycopg.connect(broker.url, autocommit=True) as conn:
        conn.execute("DROP TABLE comet_event, comet_channel")


def take_ids_back_to(broker, event_id):
    """What a failover to a broker that lagged does: events after ``event_id`` gone, and
    the next id handed out right after it."""
    if isinstance(broker, PostgresServer):
        import psycopg

        with psycopg.connect(broker.url, autocommit=True) as conn:
            conn.execute("DELETE FROM comet_event WHERE id > %s", (event_id,))
            conn.execute(
                "SELECT setval(pg_get_serial_sequence('comet_event', 'id'), %s)", (event_id,)
            )
    else:
        import redis as redis_py

        with redis_py.Redis.from_url(broker.url) as admin:
            admin.set("comet:id", event_id)


def test_a_role_that_may_only_use_the_tables_works_once_their_owner_made_them(broker, demo_db):
    """A least-privilege role (no CREATE on the schema, the tables made beforehand by
    their owner and their rows granted) could not use the broker at all: its CREATE
    TABLE IF NOT EXISTS asked for CREATE on the schema first.  Without the tables it is
    refused, in one line that says what to check (it was "unreachable", retried as an
    outage, with the statement quoted over two more lines)."""
    if isinstance(broker, RedisServer):
        pytest.skip("Redis has no tables")
    import psycopg

    base = broker.url.rsplit("/", 1)[0]
    with psycopg.connect(broker.url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE least_privilege")
        conn.execute("CREATE ROLE tables_user LOGIN")
    owner = SimpleNamespace(url=f"{base}/least_privilege")
    user = SimpleNamespace(url=owner.url.replace("comet@", "tables_user@"))
    with psycopg.connect(owner.url, autocommit=True) as conn:
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")  # (PostgreSQL 15's way)

    server = start(user, demo_db, listening=False)
    try:
        assert server.logged("check COMET_BROKER")
        said = next(line for line in server.output if "check COMET_BROKER" in line)
        assert "refused: permission denied for schema public; check" in said, said
        assert not any(line.startswith("LINE ") for line in server.output)
    finally:
        assert server.stop() == 0, "".join(server.output)

    manage_publish(owner, "made-by-the-owner", 0)  # the README's way to make the tables
    with psycopg.connect(owner.url, autocommit=True) as conn:
        conn.execute(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON comet_event, comet_channel TO tables_user"
        )
        conn.execute("GRANT USAGE, UPDATE ON SEQUENCE comet_event_id_seq TO tables_user")
    server = start(user, demo_db)
    try:
        event_id = publish(server, "least", {"n": 1})
        answer = requests.get(
            server.url + f"/t/fastpoll/?channel=least&since={event_id - 1}", timeout=30
        )
        assert answer.json()["events"] == [{"id": event_id, "data": {"n": 1}}]
    finally:
        assert server.stop() == 0, "".join(server.output)


def test_a_broker_that_refuses_the_configuration_says_so_as_an_error(broker, demo_db):
    """A database that does not exist (a typo in the URL) was logged every few seconds
    as a connection lost, as if the broker were down (found by a review); it is an
    error now, which says what to check."""
    base = broker.url.rsplit("/", 1)[0]
    url = f"{base}/99" if isinstance(broker, RedisServer) else f"{base}/no_such_database"
    server = runcomet(db=demo_db, env={"COMET_BROKER": url})
    try:
        assert server.logged("check COMET_BROKER")
        said = next(line for line in server.output if "check COMET_BROKER" in line)
        assert "refused" in said and "lost" not in said, said
    finally:
        assert server.stop() == 0, "".join(server.output)

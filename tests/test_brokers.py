"""Several runcomet processes sharing a real broker (PostgreSQL, Redis); the broker
fixture (both kinds, one each per module) is in conftest.py."""

import contextlib
import itertools
import json
import os
import subprocess
import sys
import time

import pytest
import requests

from django_comet.brokers.base import catch_up_bound
from django_comet.brokers.postgres import PRUNE_EVERY

from .brokers import PostgresServer, RedisServer
from .processes import ROOT, manage, runcomet, wait_until
from .publishing import publish, subscribed
from .sse_client import SSEClient


def start(broker, demo_db, *args, listening=True, **kwargs):
    """runcomet on ``broker``, once its listener receives events (unless not
    ``listening``): a process hears only what is published from then on."""
    os.environ["COMET_BROKER"] = broker.url
    try:
        server = runcomet(*args, db=demo_db, **kwargs)
    finally:
        del os.environ["COMET_BROKER"]
    if listening:
        server.wait_for_status(lambda s: s["broker_listening"], timeout=30)
    return server


@pytest.fixture(scope="module")
def pair(broker, demo_db):
    a, b = start(broker, demo_db), start(broker, demo_db)
    yield a, b
    assert a.stop() == 0
    assert b.stop() == 0


def manage_publish(broker, channel, data, **env):
    env["COMET_BROKER"] = broker.url
    result = manage("comet_publish", channel, json.dumps(data), check=True, env=env)
    return int(result.stdout.strip())


def test_event_published_on_one_server_reaches_the_other(pair):
    a, b = pair
    with SSEClient(a, "/t/stream/?channels=shared") as client:
        subscribed(a, "shared")
        event_id = publish(b, "shared", {"from": "b"})
        assert client.next_event() == {"id": str(event_id), "data": '{"from":"b"}'}


def other_installation(broker):
    """A URL for another installation on the same broker server: Redis's database 1,
    PostgreSQL's schema "other" (tables of its own, ids of its own)."""
    if isinstance(broker, RedisServer):
        return broker.url.rsplit("/", 1)[0] + "/1"
    import psycopg

    with psycopg.connect(broker.url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS other")
    return broker.url + "?options=-csearch_path%3Dother"


def test_installations_sharing_a_broker_server_never_hear_each_other(pair, broker):
    """Pub/sub spans Redis's databases, NOTIFY a PostgreSQL database's schemas: another
    installation's events reached this one's streams, and, their ids being ahead, this
    one's own were taken for old ones and dropped (found by a review)."""
    a, b = pair
    other = other_installation(broker)
    with SSEClient(a, "/t/stream/?channels=neighbours") as client:
        subscribed(a, "neighbours")
        for n in range(3):
            result = manage(
                "comet_publish",
                "neighbours",
                json.dumps(f"theirs {n}"),
                check=True,
                env={"COMET_BROKER": other},
            )
            assert int(result.stdout)
        mine = publish(b, "neighbours", "mine")
        assert client.next_event() == {"id": str(mine), "data": '"mine"'}


def test_a_brokers_own_watchers_are_not_counted_as_request_timers(pair):
    """`timers` in the status is what requests hold: 0 once they are gone, whatever the
    broker (PostgreSQL's listener socket watcher showed as one timer left)."""
    a, b = pair
    with SSEClient(a, "/t/stream/?channels=counted") as client:
        subscribed(a, "counted")
        event_id = publish(b, "counted", {"n": 1})
        assert client.next_event()["id"] == str(event_id)
    assert a.wait_for_status(lambda s: s["held"] == 0)["timers"] == 0


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


def test_a_replay_too_large_for_the_bound_from_a_process_that_has_not_all_of_it(
    broker, demo_db, pair
):
    """A process that began listening after the events were published reads a replay
    from the broker, and cannot take what does not fit in COMET_MAX_PENDING_OUTPUT (64
    KiB here) from a history of its own: a stream gets the newest and the gap event,
    while polls take the broker's history a batch at a time, all of it."""
    a, _ = pair
    publish(a, "before-far-back", 0)  # so that ids[0] - 1 is a cursor, not 0
    ids = [publish(a, "far-back", "x" * 30_000) for _ in range(5)]
    late = start(broker, demo_db, env={"TEST_MAX_PENDING_OUTPUT": str(64 * 1024)})
    try:
        cursor = ids[0] - 1
        with SSEClient(late, f"/t/stream/?channels=far-back&lastEventId={cursor}") as client:
            assert client.next_event()["event"] == "comet-history-gap"
            assert [client.next_event()["id"] for _ in range(2)] == [str(ids[3]), str(ids[4])]
        polled, since = [], cursor
        for _ in range(3):
            url = late.url + f"/t/fastpoll/?channel=far-back&since={since}"
            answer = requests.get(url, timeout=30).json()
            assert "gap" not in answer
            polled += [e["id"] for e in answer["events"]]
            since = answer["last_id"]
        assert polled == ids
    finally:
        assert late.stop() == 0


def test_long_poll_cursor_answers_from_shared_history(pair):
    a, b = pair
    first = publish(a, "lp-shared", "x")
    second = publish(a, "lp-shared", "y")
    answer = requests.get(b.url + f"/t/poll/?channel=lp-shared&since={first}&timeout=30").json()
    assert answer["event"]["id"] == second


def test_a_cursor_beyond_any_id_is_another_epoch_not_an_error(pair):
    a, _ = pair
    newest = publish(a, "huge-cursor", "x")
    answer = requests.get(a.url + f"/t/fastpoll/?channel=huge-cursor&since={10**30}", timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "events": [{"id": newest, "data": "x"}],
        "last_id": newest,
        "gap": True,
    }


def test_delivery_resumes_after_the_broker_restarts(pair, broker):
    a, b = pair
    with SSEClient(a, "/t/stream/?channels=restart") as client:
        subscribed(a, "restart")
        before = publish(b, "restart", "before")
        assert client.next_event()["id"] == str(before)
        if isinstance(broker, PostgresServer):  # (its immediate stop loses what is unflushed)
            import psycopg

            with psycopg.connect(broker.url, autocommit=True) as conn:
                conn.execute("CHECKPOINT")
        broker.stop()
        broker.start()
        if isinstance(broker, RedisServer):  # (this one keeps nothing on disk)
            # What A had not received before Redis lost its data is gone: it says so.
            assert client.next_event()["event"] == "comet-history-gap"
        event_id = publish(b, "restart", "after")  # B's publishing connection reconnects
        assert client.next_event() == {"id": str(event_id), "data": '"after"'}


def test_large_payload_goes_through(pair):
    a, b = pair
    big = "z" * 20000  # over NOTIFY's 8000-byte payload limit
    with SSEClient(a, "/t/stream/?channels=bulky") as client:
        subscribed(a, "bulky")
        event_id = publish(b, "bulky", big)
        assert client.next_event() == {"id": str(event_id), "data": json.dumps(big)}


# -- bounded shared history, gaps, and one listener ----------------------------------------

GAP = "comet-history-gap"
_markers = itertools.count()


@pytest.fixture(scope="module")
def small(broker, demo_db):
    """runcomet keeping 5 events per channel (COMET_HISTORY_SIZE, via tests/settings.py)."""
    server = start(broker, demo_db, env={"TEST_HISTORY_SIZE": "5"})
    yield server
    assert server.stop() == 0, "".join(server.output)


def replay(server, channels, last_id):
    """What an SSE client that last saw ``last_id`` gets on ``channels``: (whether a gap
    event came, [replayed ids]).  The replay ends where a live event on a fresh channel of
    the same stream arrives."""
    marker = f"mark-{next(_markers)}"
    with SSEClient(
        server,
        f"/t/stream/?channels={channels},{marker}",
        headers=f"Last-Event-ID: {last_id}\r\n".encode(),
    ) as client:
        subscribed(server, marker)
        marker_id = publish(server, marker, "end")
        got = []
        while (event := client.next_event()).get("id") != str(marker_id):
            got.append(event)
    gaps = [e for e in got if e.get("event") == GAP]
    assert len(gaps) <= 1 and (not gaps or got[0] is gaps[0]), got
    return bool(gaps), [int(e["id"]) for e in got if "id" in e and e not in gaps]


def stored(broker, channel):
    """How many events of ``channel`` the broker itself holds."""
    if isinstance(broker, PostgresServer):
        import psycopg

        with psycopg.connect(broker.url) as conn:
            query = "SELECT count(*) FROM comet_event WHERE channel = %s"
            return conn.execute(query, (channel,)).fetchone()[0]
    import redis

    with redis.Redis.from_url(broker.url) as client:
        return client.llen("comet:history:" + channel)


def test_replay_reports_a_gap_when_the_history_was_cut(small):
    ids = [publish(small, "cut", i) for i in range(25)]
    assert replay(small, "cut", ids[14]) == (True, ids[-5:])  # saw #15 of 25
    assert replay(small, "cut", ids[19]) == (False, ids[-5:])  # nothing lost
    assert replay(small, "cut", ids[-1]) == (False, [])


def test_a_quiet_channel_survives_a_busy_channels_replay(small):
    quiet = publish(small, "quiet", "q")
    busy = [publish(small, "busy", i) for i in range(12)]
    assert replay(small, "quiet,busy", quiet - 1) == (True, [quiet, *busy[-5:]])
    assert replay(small, "busy,quiet", busy[-6]) == (False, busy[-5:])


def test_every_channels_history_stays_bounded(small, broker):
    last = publish(small, ",".join(["alt-a", "alt-b"] * 150), "x")  # 300, alternating
    for channel in ("alt-a", "alt-b"):
        assert 5 <= stored(broker, channel) <= 5 + PRUNE_EVERY
    newest = list(range(last - 9, last + 1))  # 5 of each, consecutive ids
    assert replay(small, "alt-a,alt-b", last - 10) == (False, newest)
    assert replay(small, "alt-a,alt-b", last - 11) == (True, newest)


def test_a_history_size_of_0_keeps_no_history(broker, demo_db):
    server = start(broker, demo_db, env={"TEST_HISTORY_SIZE": "0"})
    try:
        first = publish(server, "nothing", 1)
        newest = publish(server, "nothing", 2)
        # Until this process's hub has it, `newest` could still reach the stream live.
        server.wait_for_status(lambda s: s["events_published"] >= 2)
        assert replay(server, "nothing", first) == (True, [])
        assert replay(server, "nothing", newest) == (False, [])
        with SSEClient(server, "/t/stream/?channels=nothing") as client:  # live still
            subscribed(server, "nothing")
            event_id = publish(server, "nothing", 3)
            assert client.next_event() == {"id": str(event_id), "data": "3"}
        publish(server, ",".join(["nothing"] * 150), "x")
        assert stored(broker, "nothing") <= 1 + PRUNE_EVERY
        if isinstance(broker, RedisServer):  # the global catch-up log stays bounded too
            import redis

            with redis.Redis.from_url(broker.url) as client:
                assert client.llen("comet:log") <= catch_up_bound(0)
    finally:
        assert server.stop() == 0, "".join(server.output)


def test_a_lowered_history_size_holds_for_the_history_kept_before(broker, small):
    """Events kept under a larger COMET_HISTORY_SIZE (before a restart with a smaller
    one): a replay gets the newest the size says, and a gap (Redis gave them all, and
    its lists never shrank back)."""
    seen = manage_publish(broker, "lowered", "seen", TEST_HISTORY_SIZE="20")
    ids = [manage_publish(broker, "lowered", n, TEST_HISTORY_SIZE="20") for n in range(12)]
    assert replay(small, "lowered", seen) == (True, ids[-5:])
    ids.append(publish(small, "lowered", 12))
    assert replay(small, "lowered", seen) == (True, ids[-5:])
    if not isinstance(broker, PostgresServer):  # (PostgreSQL prunes every 50th id)
        assert stored(broker, "lowered") == 5


def test_a_fresh_process_moves_a_cursor_past_a_gap_with_nothing_after_it(broker, demo_db):
    """A process that has received nothing newer than a client's cursor: the broker has
    nothing left after it, and everything since this process began listening reaches
    it, so the gap's cursor moves there; else the client hears it at every reconnect."""
    ids = [manage_publish(broker, "kept-none", n, TEST_HISTORY_SIZE="0") for n in range(2)]
    server = start(broker, demo_db, env={"TEST_HISTORY_SIZE": "0"})
    try:
        headers = b"Last-Event-ID: %d\r\n" % ids[0]
        with SSEClient(server, "/t/stream/?channels=kept-none", headers=headers) as client:
            gap = client.next_event()
        assert gap["event"] == GAP and int(gap["id"]) >= ids[-1], gap
        assert json.loads(gap["data"])["cursor"] == int(gap["id"])
        assert replay(server, "kept-none", gap["id"]) == (False, [])
        url = server.url + "/t/fastpoll/?channel=kept-none&timeout=0.1&since="
        answer = requests.get(url + str(ids[0]), timeout=30).json()
        assert answer["gap"] is True and answer["last_id"] >= ids[-1], answer
        again = requests.get(url + str(answer["last_id"]), timeout=30).json()
        assert "gap" not in again and again["events"] == [], again
    finally:
        assert server.stop() == 0, "".join(server.output)


def test_one_listen_connection_after_a_stream_under_runcomet(broker, demo_db):
    if not isinstance(broker, PostgresServer):
        pytest.skip("LISTEN connections are PostgreSQL's")
    import psycopg

    server = start(broker, demo_db)

    def listeners():
        with psycopg.connect(broker.url) as conn:
            query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            name = f"django_comet listen {server.proc.pid}"
            return conn.execute(query, (name,)).fetchone()[0]

    try:
        wait_until(lambda: listeners() >= 1)  # runcomet's, watched by its loop
        with SSEClient(server, "/t/stream/?channels=one-listen") as client:
            subscribed(server, "one-listen")
            ids = [publish(server, "one-listen", i) for i in range(3)]
            assert [int(client.next_event()["id"]) for _ in ids] == ids  # once each
            answer = requests.get(  # a long-poll view asks to listen too
                server.url + f"/t/fastpoll/?channel=one-listen&since={ids[0]}", timeout=30
            )
            assert [e["id"] for e in answer.json()["events"]] == ids[1:]
            assert listeners() == 1
    finally:
        assert server.stop() == 0, "".join(server.output)


def test_the_newest_id_is_the_brokers_not_this_processs(broker, monkeypatch):
    """A process's hub may lag a shared broker; the newest id handed out anywhere is
    what tells a client's Last-Event-ID from another epoch (a reset broker) apart."""
    from django_comet.brokers.postgres import PostgresBroker, conninfo_from_url
    from django_comet.brokers.redis import RedisBroker
    from django_comet.events import replay
    from django_comet.evloop.hub import hub

    shared = (
        PostgresBroker(conninfo_from_url(broker.url))
        if isinstance(broker, PostgresServer)
        else RedisBroker(broker.url)
    )
    # This process never heard of the broker's ids (nor of the memory broker's, which
    # earlier tests may have published on, with ids from the clock).
    monkeypatch.setattr(hub, "last_id", 0)
    try:
        newest = manage_publish(broker, "epoch", "x")  # from another process
        assert shared.newest_id() == newest
        # A client whose cursor is that id is up to date, not from another epoch...
        assert replay(shared, ["epoch"], newest) == ([], False, newest)
        # ...one whose cursor no broker id reached is: everything, as a gap, from 0.
        events, gap, cursor = replay(shared, ["epoch"], newest + 1000)
        assert ([e.id for e in events][-1], gap, cursor) == (newest, True, 0)
    finally:
        shared.close()


def test_a_new_process_does_not_load_the_whole_history(broker, demo_db):
    """Each channel's history stays in the broker until a client asks for it: a worker
    starting (or restarting) must not pour every channel's into its own memory."""
    if not isinstance(broker, PostgresServer):
        pytest.skip("Redis catches up from its bounded global log")
    for i in range(6):
        manage_publish(broker, f"before-{i % 2}", i)
    server = start(broker, demo_db)
    try:
        assert server.status()["events_published"] == 0
        live = manage_publish(broker, "after", "x")  # and what comes from now on arrives
        server.wait_for_status(lambda s: s["events_published"] == 1)
        replayed = requests.get(server.url + "/t/fastpoll/?channel=before-0&since=0").json()
        assert len(replayed["events"]) == 3 and replayed["last_id"] < live
    finally:
        assert server.stop() == 0


def test_a_large_event_is_read_off_the_loop_thread_and_in_order(pair, broker):
    """An event too large for NOTIFY is read from the table: while that read waits (the
    table locked here), the server goes on answering, and an event notified after it
    waits its turn rather than overtaking it."""
    if not isinstance(broker, PostgresServer):
        pytest.skip("NOTIFY's payload limit is PostgreSQL's")
    import psycopg

    a, _ = pair
    with (
        SSEClient(a, "/t/stream/?channels=locked") as client,
        psycopg.connect(broker.url, autocommit=True) as watcher,
        psycopg.connect(broker.url) as locker,
    ):
        subscribed(a, "locked")
        published = a.status()["events_published"]
        big, small = lock_out_and_notify(broker, locker, "locked")
        wait_until(lambda: watcher.execute(READING).fetchone()[0] >= 2)  # both servers
        assert requests.get(a.url + "/t/echo/", timeout=10).status_code == 200
        assert a.status()["events_published"] == published  # the small one did not overtake
        locker.rollback()
        assert client.next_event() == {"id": str(big[0]), "data": big[1]}
        assert client.next_event() == {"id": str(small[0]), "data": small[1]}


@contextlib.contextmanager
def reader_without_a_loop(broker):
    """This process's PostgreSQL broker client as a server's reader thread, what it
    hands back to the loop recorded instead: ``(broker, handed)``."""
    if not isinstance(broker, PostgresServer):
        pytest.skip("NOTIFY's payload limit is PostgreSQL's")
    from types import SimpleNamespace

    reader = shared_broker(broker)
    handed = []
    reader._loop = SimpleNamespace(call_soon_threadsafe=lambda _, *args: handed.append(args))
    try:
        yield reader, handed
    finally:
        reader.close()


def test_large_events_notified_together_are_read_in_one_query(broker):
    """The reader thread's work as the loop thread queues it: three large events to
    read, then a health check.  The three are read together (one at a time, a catch-up
    of large events went at about 1,600 a second) and handed back to the loop in one
    call, in order; the health check runs after them, and None ends the thread."""
    from django_comet.brokers.postgres import _Notified

    with reader_without_a_loop(broker) as (reader, handed):
        big = json.dumps("z" * 9000)
        ids = [reader.publish("read-together", big) for _ in range(3)]
        for event_id in ids:
            reader._reads.put(_Notified(event_id, "read-together"))
        reader._reads.put(lambda: handed.append("health check"))
        reader._reads.put(None)
        reader._work_through(reader._reads)
        (batch, events, error), after = handed
        assert [slot.event_id for slot in batch] == ids and error is None
        assert [(events[i].id, events[i].data) for i in ids] == [(i, big) for i in ids]
        assert after == "health check"


def test_the_reader_does_not_wait_behind_publishes_for_a_connection(broker):
    """Publishes waiting for the publishers' lock (another process's publisher stalled)
    may hold every connection of the pool; reading a large event needs no lock, and
    every event after it waited for the lock's holder (found by a review)."""
    import threading

    from django_comet.brokers.pool import SIZE as POOL_SIZE
    from django_comet.brokers.postgres import _Notified

    with reader_without_a_loop(broker) as (reader, handed):
        event_id = reader.publish("read-meanwhile", json.dumps("z" * 9000))
        for _ in range(POOL_SIZE):  # every connection lent, its publish waiting
            reader._pool._lendable.acquire()
        try:
            reader._reads.put(_Notified(event_id, "read-meanwhile"))
            reader._reads.put(None)
            thread = threading.Thread(target=reader._work_through, args=(reader._reads,))
            thread.start()
            thread.join(20)
            assert not thread.is_alive(), "the read waited for a connection of the pool"
            [(_, events, error)] = handed
            assert error is None and events[event_id].id == event_id
        finally:
            for _ in range(POOL_SIZE):
                reader._pool._lendable.release()
            thread.join()


FORKED_PUBLISHER = """
import os, select, sys
from django_comet.brokers.pool import SIZE as POOL_SIZE
from django_comet.brokers.postgres import PostgresBroker, conninfo_from_url

broker = PostgresBroker(conninfo_from_url(sys.argv[1]))
broker.publish("forked", '"parent"')
for _ in range(POOL_SIZE):  # every connection lent, as to publishes in flight
    broker._pool._lendable.acquire()
broker._pool._idle_lock.acquire()  # and a thread in the middle of taking one
read, write = os.pipe()
child = os.fork()
if child == 0:
    os.write(write, str(broker.publish("forked", '"child"')).encode())
    os._exit(0)
os.close(write)
ready, _, _ = select.select([read], [], [], 20)
print(os.read(read, 100).decode() if ready else "the child is stuck")
if not ready:
    os.kill(child, 9)
"""


def test_a_process_forked_while_the_pool_is_lent_publishes_on_a_pool_of_its_own(broker):
    """The child inherited the pool's semaphore and lock as the fork found them, taken
    by threads it does not have: its publish waited for ever (found by a review)."""
    if not isinstance(broker, PostgresServer):
        pytest.skip("PostgreSQL's pool")
    result = subprocess.run(
        [sys.executable, "-c", FORKED_PUBLISHER, broker.url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.stdout.strip().isdigit(), (result.stdout, result.stderr)


def test_large_events_are_read_a_megabyte_at_a_time(broker):
    """Three events of 600 KB notified together: read in queries of about 1 MiB (two,
    then one), each handed back to the loop as it is read, so that a slow link never
    has one query run past its timeout, nor the loop wait on the conversion of a batch
    of megabytes."""
    from django_comet.brokers.postgres import _Notified

    with reader_without_a_loop(broker) as (reader, handed):
        big = json.dumps("z" * 600_000)
        ids = [reader.publish("megabytes", big) for _ in range(3)]
        reader._read_for_loop([_Notified(event_id, "megabytes") for event_id in ids])
        assert [[slot.event_id for slot in batch] for batch, _, _ in handed] == [ids[:2], ids[2:]]
        assert all(error is None for _, _, error in handed)
        assert [sorted(events) for _, events, _ in handed] == [ids[:2], ids[2:]]


# A server's read of a large event, waiting for a lock.
READING = (
    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
    " AND query LIKE '%%FROM comet_event WHERE id = ANY%%'"
)


def lock_out_and_notify(broker, locker, channel):
    """Insert a large and a small event of ``channel``, lock the table (in ``locker``'s
    transaction), and notify both as a publish would: the large one by id."""
    import psycopg

    insert = "INSERT INTO comet_event (channel, data) VALUES (%s, %s) RETURNING id"
    with psycopg.connect(broker.url, autocommit=True) as notifier:
        big = json.dumps("z" * 9000)
        big_id = notifier.execute(insert, (channel, big)).fetchone()[0]
        small_id = notifier.execute(insert, (channel, '"small"')).fetchone()[0]
        locker.execute("LOCK TABLE comet_event IN ACCESS EXCLUSIVE MODE")
        notifier.execute("SELECT pg_notify('comet_events', %s)", (str(big_id),))
        small = json.dumps([small_id, channel, None, '"small"'], separators=(",", ":"))
        notifier.execute("SELECT pg_notify('comet_events', %s)", (small,))
    return (big_id, big), (small_id, '"small"')


def test_a_large_event_that_cannot_be_read_is_not_skipped(broker, demo_db):
    """A failed read (here the lock wait times out) must not lose the event: the server
    reconnects and catches up, the large event first."""
    if not isinstance(broker, PostgresServer):
        pytest.skip("NOTIFY's payload limit is PostgreSQL's")
    import psycopg

    with psycopg.connect(broker.url, autocommit=True) as admin:
        admin.execute("ALTER ROLE comet SET lock_timeout = '300ms'")  # new connections
    try:
        server = start(broker, demo_db)
        try:
            with (
                SSEClient(server, "/t/stream/?channels=unreadable") as client,
                psycopg.connect(broker.url) as locker,
            ):
                subscribed(server, "unreadable")
                big, small = lock_out_and_notify(broker, locker, "unreadable")
                assert server.logged(f"Could not read event {big[0]}")
                locker.rollback()
                assert client.next_event() == {"id": str(big[0]), "data": big[1]}
                assert client.next_event() == {"id": str(small[0]), "data": small[1]}
        finally:
            assert server.stop() == 0, "".join(server.output)
    finally:
        with psycopg.connect(broker.url, autocommit=True) as admin:
            admin.execute("ALTER ROLE comet RESET lock_timeout")


def test_a_stop_does_not_wait_for_a_blocked_read(broker, demo_db):
    if not isinstance(broker, PostgresServer):
        pytest.skip("NOTIFY's payload limit is PostgreSQL's")
    import psycopg

    server = start(broker, demo_db)
    try:
        with (
            psycopg.connect(broker.url) as locker,
            psycopg.connect(broker.url, autocommit=True) as watcher,
        ):
            lock_out_and_notify(broker, locker, "blocked")
            wait_until(lambda: watcher.execute(READING).fetchone()[0] >= 1)
            assert server.stop() == 0  # while the read still waits on the lock
    finally:
        server.stop()


def shared_broker(broker, **kwargs):
    """This test process's own broker client on ``broker`` (another publisher)."""
    from django_comet.brokers.postgres import PostgresBroker, conninfo_from_url
    from django_comet.brokers.redis import RedisBroker

    if isinstance(broker, PostgresServer):
        return PostgresBroker(conninfo_from_url(broker.url), **kwargs)
    return RedisBroker(broker.url, **kwargs)


def test_a_publisher_stalled_inside_its_transaction_does_not_stop_the_others(broker):
    """A publisher whose client stalls holding the advisory lock (a paused VM or process,
    a partition) is ended by PostgreSQL after 5 s idle in its transaction; every other
    publish of every process waited for as long as it stalled."""
    if not isinstance(broker, PostgresServer):
        pytest.skip("PostgreSQL's advisory lock")
    import threading

    stalled, other = shared_broker(broker), shared_broker(broker)
    locked, resume = threading.Event(), threading.Event()

    def publish_and_stall():
        with stalled._pool.lent() as conn:  # the pool's only one: the publish's, below
            execute = conn.execute

            def execute_then_stall(query, *args, **kwargs):
                result = execute(query, *args, **kwargs)
                if "pg_advisory_xact_lock" in str(query) and not locked.is_set():
                    locked.set()
                    resume.wait(60)  # the client stops here, the lock held
                return result

            conn.execute = execute_then_stall
        with contextlib.suppress(Exception):  # (its session is ended under it: expected)
            stalled.publish("stall", '"1"')

    first = threading.Thread(target=publish_and_stall, daemon=True)
    try:
        first.start()
        assert locked.wait(10)
        published = []
        second = threading.Thread(
            target=lambda: published.append(other.publish("stall", '"2"')), daemon=True
        )
        second.start()
        second.join(60)
        assert published, "a publish waited on the stalled publisher's lock"
    finally:
        resume.set()
        first.join(10)
        stalled.close()
        other.close()


def test_a_fresh_poll_on_a_new_process_gets_a_cursor_past_what_came_before(broker, demo_db):
    """A poll without a cursor wants what comes from now on: on a process that never saw
    the channel's events its answer's last_id was 0, and the next poll (since=0) took the
    whole history for new events."""
    before = [manage_publish(broker, "before-fresh", n) for n in range(3)]
    server = start(broker, demo_db)
    try:
        url = server.url + "/t/fastpoll/?channel=before-fresh&timeout=0.1"
        answer = requests.get(url, timeout=30).json()
        assert answer["events"] == [] and answer["last_id"] >= before[-1], answer
        again = requests.get(url + f"&since={answer['last_id']}", timeout=30).json()
        assert again["events"] == [], again
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("ids", ["in order", "gone back"])
def test_a_publish_retried_after_a_slow_redis_goes_out_once(broker, ids, caplog):
    """A publish that times out while Redis is busy (a slow script here) is sent again,
    by redis-py and by the broker; the first copy runs once Redis is free: the retry
    must return its id, not publish the event a second time, and say what the first
    copy found (the ids gone back under what the process has seen: found by the diff
    review)."""
    if not isinstance(broker, RedisServer):
        pytest.skip("Redis's client retries")
    import threading

    import redis as redis_py

    from django_comet.brokers.redis import RedisBroker

    channel = f"slow-{time.monotonic_ns()}"
    publisher = RedisBroker(broker.url + "?socket_timeout=2")
    warm_id = publisher.publish("warm-up", "1")  # a connection in the pool, as a server's
    if ids == "gone back":  # as if this process had seen ids past the counter
        publisher._newest_known = lambda: warm_id + 1000
    admin = redis_py.Redis.from_url(broker.url)
    busy = threading.Thread(  # Redis runs nothing else for 3 s
        target=lambda: admin.eval(
            "local t = redis.call('TIME') local stop = t[1] + 3 "
            "while tonumber(redis.call('TIME')[1]) < stop do end",
            0,
        ),
        daemon=True,
    )
    try:
        busy.start()
        wait_until(lambda: redis_is_busy(broker.url))
        event_id = publisher.publish(channel, '"once"')
        busy.join(10)
        events, _ = publisher.since([channel], 0)
        assert [e.id for e in events] == [event_id]
        went_back = "newest event id went back" in caplog.text
        assert went_back == (ids == "gone back")
        if went_back:
            assert event_id == warm_id + 1001
    finally:
        busy.join(10)
        publisher.close()
        admin.close()


def redis_is_busy(url):
    """Whether Redis leaves a PING unanswered for 0.2 s (it runs a script)."""
    import redis as redis_py

    with redis_py.Redis.from_url(url, socket_timeout=0.2, retry=None) as probe:
        try:
            probe.ping()
        except redis_py.TimeoutError:
            return True
    return False


def test_a_listener_cut_during_its_catch_up_is_not_listening(broker):
    """A LISTEN connection lost between its LISTEN and the end of its catch-up said it
    was listening (`broker_listening` in the status) through the outage that followed,
    and was left open for the garbage collector."""
    if not isinstance(broker, PostgresServer):
        pytest.skip("PostgreSQL's listener")
    listener = shared_broker(broker)
    opened = []
    connect = listener._connect

    def connect_and_keep(*args, **kwargs):
        opened.append(connect(*args, **kwargs))
        return opened[-1]

    def cut(conn, deliver):
        raise OSError("server closed the connection unexpectedly")

    listener._connect, listener._catch_up = connect_and_keep, cut
    try:
        with pytest.raises(OSError):
            listener._listening_connection(lambda event: None)
        assert not listener.connected.is_set()
        assert opened and opened[0].closed
    finally:
        listener.close()


def test_a_postgres_broker_holds_a_few_connections_and_closes_them(broker):
    """Publishing threads share a small pool: a connection per thread that had ever
    published (up to five per view thread) ran PostgreSQL out of connections under
    --workers; and they outlived the broker's close(): under `manage.py test` a bare
    postgres:// broker's kept the test database from being destroyed (found by
    reviews)."""
    if not isinstance(broker, PostgresServer):
        pytest.skip("PostgreSQL's connections")
    import threading

    import psycopg

    from django_comet.brokers.pool import SIZE as POOL_SIZE

    publisher = shared_broker(broker)
    ids = []
    together = threading.Barrier(16)

    def publish_some():
        together.wait()
        ids.extend(publisher.publish("threads", '"x"') for _ in range(5))

    threads = [threading.Thread(target=publish_some) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 80
    # (The module's servers have connections of their own to the same database.)
    pids = [conn.info.backend_pid for conn in publisher._pool.open_connections()]
    assert 1 <= len(pids) <= POOL_SIZE
    with psycopg.connect(broker.url, autocommit=True) as admin:

        def backends():
            query = "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)"
            return admin.execute(query, (pids,)).fetchone()[0]

        assert backends() == len(pids)
        publisher.close()
        wait_until(lambda: backends() == 0)


def test_every_broker_module_logs_under_the_logger_the_readme_names():
    """A LOGGING entry for ``django_comet.brokers`` reached the memory broker only: the
    others logged as ``django_comet.broker`` (found by a review of the code)."""
    import importlib

    for name in ("base", "memory", "postgres", "postgres_reads", "redis", "watchdog"):
        module = importlib.import_module(f"django_comet.brokers.{name}")
        assert module.logger.name == "django_comet.brokers", name

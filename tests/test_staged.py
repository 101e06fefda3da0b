"""The 2007 staged response through a real runcomet, over sockets."""

import json
import os
import signal
import socket
import threading
import time

import pytest
import requests

from .processes import (
    read_chunked,
    read_cut_stream,
    read_until_closed,
    reset_on_close,
    runcomet,
    wait_until,
)
from .publishing import publish
from .sse_client import SSEClient


def get_staged(server, path="/", headers=b""):
    with server.connect() as sock:
        sock.sendall(
            b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers + b"\r\n"
        )
        return read_chunked(sock)


@pytest.mark.parametrize("server_name", ["comet", "comet_inline"])
def test_demo_five_chunks_in_order(request, server_name):
    server = request.getfixturevalue(server_name)
    head, chunks = get_staged(server)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length" not in head.lower()
    assert chunks == [
        b"First content<br /> ",
        b"stage1<br /> ",
        b"stage2<br /> ",
        b"stage3<br /> ",
        b"last_stage4<br /> ",
    ]


@pytest.mark.parametrize(
    "env",
    [
        {"TEST_WRAPPED_WSGI": "application"},
        {"TEST_PATCHED_HANDLER": "1"},
        {"TEST_PATCHED_HANDLER": "1", "TEST_GZIP": "1"},
    ],
    ids=["wsgi-middleware", "patched-handler", "patched-handler-gzip"],
)
def test_held_responses_work_behind_a_middlewares_own_iterable(demo_db, env):
    """A WSGI middleware that hands on an iterable of its own around the application's
    (timing, an APM: sentry-sdk replaces WSGIHandler.__call__ with one) hid the deferral
    from runcomet: every held response waited in a view thread, and with the patched
    handler every stage failed (its iterable has no status_code).  With GZipMiddleware
    too, whose compressor yields its header before it takes the content."""
    gzip = b"Accept-Encoding: gzip\r\n" if "TEST_GZIP" in env else b""
    server = runcomet(db=demo_db, env=env)
    try:
        _, chunks = get_staged(server, "/t/quick-stages/", gzip)
        assert chunks == [b"s0;", b"s1:-;", b"s2:-;", b"s3:-;", b"s4:-;"]
        staged = server.connect()
        staged.sendall(
            b"GET /t/quick-stages/?delay=60 HTTP/1.1\r\nHost: 127.0.0.1\r\n%b\r\n" % gzip
        )
        poll = server.connect()
        poll.sendall(
            b"GET /t/fastpoll/?channel=wrapped&timeout=60 HTTP/1.1\r\n"
            b"Host: 127.0.0.1\r\n%b\r\n" % gzip
        )
        with SSEClient(server, "/t/stream/?channels=wrapped", gzip) as stream:
            # Held by the loop, each: none waits in a view thread.
            server.wait_for_status(lambda s: s["held"] == 3 and s["channels"] == {"wrapped": 2})
            event_id = publish(server, "wrapped", "news")
            assert stream.next_event() == {"id": str(event_id), "data": '"news"'}
            _, chunks = read_chunked(poll)
            assert json.loads(b"".join(chunks))["events"][0]["id"] == event_id
        staged.close()
        poll.close()
        server.wait_for_status(lambda s: s["held"] == 0)
        assert not any("waits in its view thread" in line for line in server.output)
    finally:
        assert server.stop() == 0, "".join(server.output)


def test_a_held_response_taken_then_dropped_for_another_is_not_held(demo_db):
    """A middleware took the response's content (which announced its deferral), then
    answered another response: behind an iterable of its own, that one must go out as
    it is, not be held by the dropped one's deferral."""
    env = {"TEST_PATCHED_HANDLER": "1", "TEST_REPLACING": "1"}
    server = runcomet(db=demo_db, env=env)
    try:
        response = requests.get(server.url + "/t/quick-stages/?replace=1", timeout=10)
        assert (response.status_code, response.content) == (200, b"replaced")
        response = requests.get(server.url + "/t/stream/?channels=x&replace=1", timeout=10)
        assert (response.status_code, response.content) == (200, b"replaced")
        # An endless stream in its place streams (it was taken whole, for ever, held by
        # the dropped one's deferral).
        with requests.get(
            server.url + "/t/quick-stages/?replace=endless", stream=True, timeout=10
        ) as endless:
            assert endless.raw.read(14) == b"tick 0\ntick 1\n"
        assert server.wait_for_status(lambda s: s["held"] == 0)["held"] == 0
    finally:
        assert server.stop() == 0, "".join(server.output)


def test_a_middleware_that_collects_a_held_response_is_told_of(demo_db):
    """One that collects the whole body before it hands any on (no content comes from the
    response until then): the response still works, blocking its view thread as under
    any other server, and the log says why and what to do."""
    server = runcomet(db=demo_db, env={"TEST_WRAPPED_WSGI": "collecting_application"})
    try:
        response = requests.get(server.url + "/t/quick-stages/", timeout=30)
        assert response.content == b"s0;s1:-;s2:-;s3:-;s4:-;"
        assert server.logged("A deferred response waits in its view thread")
    finally:
        assert server.stop() == 0, "".join(server.output)


def test_the_site_cache_never_answers_a_stage(demo_db):
    """Django's per-site cache stored a stage's plain answer under the stage's URL, and
    answered the next response's first stage with it: the chain jumped to its end."""
    server = runcomet(db=demo_db, env={"TEST_SITE_CACHE": "1"})
    try:
        for _ in range(2):
            _, chunks = get_staged(server, "/t/quick-stages/")
            assert chunks == [b"s0;", b"s1:-;", b"s2:-;", b"s3:-;", b"s4:-;"]
    finally:
        assert server.stop() == 0, "".join(server.output)


def test_only_first_headers_sent_and_cookies_reach_every_stage(comet):
    head, chunks = get_staged(comet, "/t/quick-stages/", b"Cookie: flavour=mint\r\n")
    assert b"X-First: yes" in head
    assert b"X-Ignored" not in head
    assert b"X-Accel-Buffering: no" in head  # nginx would hold the stages back
    assert chunks == [b"s0;", b"s1:mint;", b"s2:mint;", b"s3:mint;", b"s4:mint;"]


def test_cookies_a_stage_sets_are_said_to_be_never_sent(comet):
    head, chunks = get_staged(comet, "/t/stage-sets-cookie/")
    assert chunks == [b"first;", b"stage;"]
    assert b"late=" not in head
    assert comet.logged("Deferred stage /t/stage-sets-cookie/answer/ set cookies (late)")
    # Set again to the value the client has (Django renews a CSRF cookie so): nothing
    # is lost, and nothing is said.
    _, chunks = get_staged(comet, "/t/stage-renews-cookie/", b"Cookie: flavour=mint\r\n")
    assert chunks == [b"first;", b"stage;"]
    assert comet.logged('"GET /t/stage-renews-cookie/ HTTP/1.1" 200')  # logged after it
    assert not [line for line in comet.output if "Deferred stage /t/stage-renews" in line]


def test_stage_error_cuts_the_stream(comet):
    with comet.connect() as sock:
        sock.sendall(b"GET /t/stage-404/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        _, data = read_cut_stream(sock)  # the stream never ends with a clean last chunk
        assert data == b"first;"
    comet.wait_for_status(lambda s: s["held"] == 0)


@pytest.mark.parametrize("where", ["first", "stage"])
def test_an_endless_held_part_is_cut_not_read_for_ever(comet, where):
    """A held response's part is read whole before it goes out: an endless generator
    there (a StreamingHttpResponse as a stage, which runserver streams) held its view
    thread and grew memory without bound, with nothing logged (found by a review)."""
    with comet.connect() as sock:
        request = b"GET /t/endless-part/?where=%s HTTP/1.1\r\nHost: 127.0.0.1\r\n" % where.encode()
        sock.sendall(request + b"Connection: close\r\n\r\n")
        if where == "first":  # nothing was sent yet: an error page
            assert read_until_closed(sock).startswith(b"HTTP/1.1 500 "), where
        else:  # the stream is cut after its first part
            _, data = read_cut_stream(sock)
            assert data == b"first;"
    assert comet.logged("passed 16 MiB: return a finite response")
    comet.wait_for_status(lambda s: s["held"] == 0)


def test_a_stage_view_without_deferred_view_is_named_once(comet):
    """It got response_prev=None, quietly (found by a review of API misuse)."""
    for n in (1, 2, 2):  # (two paths to the one view)
        _, chunks = get_staged(comet, f"/t/to-plain-stage/?n={n}")
        assert b"".join(chunks) == b"first;plain;"
    _, chunks = get_staged(comet, "/t/to-plain-stage/?to=class")  # method_decorator'd
    assert b"".join(chunks) == b"first;class:True;"
    warning = "defer_in_time(): the stage's view tests.stage_views.plain_stage is not decorated"
    assert comet.logged(warning)
    assert sum(warning in line for line in comet.output) == 1
    said = [line for line in comet.output if "is not decorated with @deferred_view()" in line]
    assert len(said) == 1, said  # (the decorated ones: never)


def test_a_target_no_url_matches_fails_in_the_view_that_wrote_it(comet):
    for target in ("/t/nothing/", "/t/cookie-stage"):  # nor one APPEND_SLASH redirects
        answer = requests.get(comet.url + "/t/stage-unmatched/", params={"to": target})
        assert answer.status_code == 500, answer.text
    comet.wait_for_status(lambda s: s["held"] == 0)


@pytest.mark.parametrize("server_name", ["comet", "comet_inline"])
def test_async_stage_views(request, server_name):
    server = request.getfixturevalue(server_name)
    assert get_staged(server, "/t/to-async-stage/")[1] == [b"first;", b"async stage;"]


def test_a_stage_may_answer_with_a_file(comet):
    from .views import pattern

    _, chunks = get_staged(comet, "/t/to-file-stage/")
    assert chunks[0] == b"first;" and b"".join(chunks[1:]) == pattern(100_000)


def test_stages_see_the_cookies_the_first_response_set(comet):
    """As the client's next request would: a new session, a cookie set, one deleted; and
    nothing that would make a stage a 304 or a range."""
    _, chunks = get_staged(
        comet, "/t/cookie-first/", b"Cookie: stale=1; other=2\r\nIf-None-Match: *\r\n"
    )
    assert chunks[0] == b"first;"
    assert json.loads(chunks[1]) == {
        "flavour": "mint",
        "stale": None,
        "visits": 1,
        "if_none_match": None,
        "file_wrapper": False,
    }


def test_200_staged_responses_overlap(comet):
    socks = []
    try:
        for _ in range(200):
            sock = comet.connect()
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            socks.append(sock)
        for sock in socks:  # every first chunk arrives before the first stage is due
            data = b""
            while b"First content" not in data:
                data += sock.recv(4096)
        # All held at once, not queued behind one another; their next stages wait on one
        # loop timer.  (Waited for: the shared server may still be letting go of an
        # earlier test's clients.)
        comet.wait_for_status(lambda s: s["held"] == 200 and s["timers"] == 1)
        for sock in socks:
            _, rest = read_chunked_tail(sock)
            assert rest.endswith(b"last_stage4<br /> \r\n0\r\n\r\n")
    finally:
        for sock in socks:
            sock.close()
    comet.wait_for_status(lambda s: s["held"] == 0)


def read_chunked_tail(sock):
    data = b""
    while not data.endswith(b"0\r\n\r\n"):
        more = sock.recv(4096)
        if not more:
            break
        data += more
    return None, data


def test_disconnect_mid_stage_cancels_it(comet):
    before = requests.get(comet.url + "/t/count/").json()["stages"]
    sock = comet.connect()
    sock.sendall(b"GET /t/counted/?delay=30 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    data = b""
    while b"first;" not in data:
        data += sock.recv(4096)
    comet.wait_for_status(lambda s: s["held"] == 1 and s["timers"] == 1)
    sock.close()
    status = comet.wait_for_status(lambda s: s["held"] == 0)
    assert status["timers"] == 0  # the stage's timer is gone: no view will run
    assert requests.get(comet.url + "/t/count/").json()["stages"] == before


def test_reset_mid_stage_cancels_it(comet):
    sock = comet.connect()
    sock.sendall(b"GET /t/counted/?delay=30 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    data = b""
    while b"first;" not in data:
        data += sock.recv(4096)
    reset_on_close(sock)
    sock.close()  # RST instead of FIN
    status = comet.wait_for_status(lambda s: s["held"] == 0)
    assert status["timers"] == 0


@pytest.mark.parametrize("threads", ["8", "0"])
def test_stages_whose_clients_left_while_the_server_was_stopped_are_not_run(demo_db, threads):
    """Clients leave while the server is stopped (Ctrl-Z, a debugger) and their stages
    fall due (staged responses, long-polls timing out): once it goes on, none runs.
    Woken by SIGCONT, libevent runs a pass's due timers before reading any socket, so
    every such stage ran (found by a review). With threads the close is mostly read
    before a view thread takes the stage anyway: ``[0]`` is the case that shows it."""
    server = runcomet("--threads", threads, db=demo_db)
    socks = []
    try:
        for target in ["/t/counted/?delay=3", "/t/counted-poll/?channel=c&timeout=3"] * 10:
            sock = server.connect()
            sock.sendall(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % target.encode())
            socks.append(sock)
        for sock in socks:
            data = b""
            while b"first;" not in data:
                data += sock.recv(4096)
        server.wait_for_status(lambda s: s["held"] == 20)
        server.signal(signal.SIGSTOP)
        try:
            for sock in socks:
                sock.close()
            time.sleep(3.5)  # (stopped, the server tells nothing: its stages fall due)
        finally:
            server.signal(signal.SIGCONT)
        status = server.wait_for_status(lambda s: s["held"] == 0)
        assert status["timers"] == 0
        assert requests.get(server.url + "/t/count/").json()["stages"] == 0
    finally:
        for sock in socks:
            sock.close()
        assert server.stop() == 0


def test_slow_view_does_not_delay_staged_response(comet):
    slow_done = threading.Event()

    def slow():
        requests.get(comet.url + "/t/sleep/?s=5")
        slow_done.set()

    thread = threading.Thread(target=slow)
    thread.start()
    comet.wait_for_status(lambda s: s["in_flight"] >= 2)  # the slow view is running
    _, chunks = get_staged(comet, "/t/quick-stages/")
    assert len(chunks) == 5
    assert not slow_done.is_set()
    thread.join()


def test_http10_staged_response_is_close_delimited(comet):
    with comet.connect() as sock:
        sock.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        data = b""
        while True:
            more = sock.recv(4096)
            if not more:
                break
            data += more
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Connection: close" in head
    assert b"Content-Length" not in head and b"chunked" not in head.lower()
    assert body == b"First content<br /> stage1<br /> stage2<br /> stage3<br /> last_stage4<br /> "


@pytest.mark.django_db  # the request it makes closes old connections
def test_a_finished_stage_is_freed_without_the_cycle_collector():
    """Held responses outlive young collections into the oldest GC generation; one in a
    reference cycle would be freed only by a full collection, which stops the loop for
    everything held (bench/fanout).  Here: what a defer_in_time stage leaves behind."""
    import gc
    import io
    import weakref

    from django.core.handlers.wsgi import WSGIHandler

    from django_comet.evloop.deferral import claim

    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/t/quick-stages/",
        "QUERY_STRING": "delay=0",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80",
        "HTTP_HOST": "127.0.0.1",
        "wsgi.input": io.BytesIO(),
        "wsgi.url_scheme": "http",
    }
    gc.disable()
    try:
        result = WSGIHandler()(environ, lambda status, headers, exc_info=None: None)
        deferral = claim(result)  # what runcomet does with a response
        assert b"".join(result) == b"s0;"
        result.close()
        # Third parties may leave per-request garbage cycles that hold the response for a
        # moment (asgiref's Local, under Python 3.10, through a caught exception's frames):
        # the young generations free those. What must not exist is a cycle that lives on.
        gc.collect()
        sent, kept = weakref.ref(result), weakref.ref(deferral.resume.response_prev)
        del result
        assert sent() is None  # nothing holds the response that went out
        del deferral  # as the server does once the next stage has run
        assert kept() is None  # nor what the next stage needed
    finally:
        gc.enable()


def test_a_staged_response_closes_the_connection_when_the_client_asked(comet):
    """Held stages free their header lists too; "Connection: close" must outlive that."""
    with comet.connect() as sock:
        sock.sendall(
            b"GET /t/quick-stages/?delay=0.02 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Connection: close\r\n\r\n"
        )
        data = b""
        while more := sock.recv(4096):  # only the server closing ends this (else: timeout)
            data += more
    assert b"s4:" in data and data.endswith(b"\r\n0\r\n\r\n")


def test_an_async_view_can_defer(comet):
    head, chunks = get_staged(comet, "/t/async-staged/", b"Cookie: flavour=lime\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK"), head
    assert chunks == [b"s0;", b"s1:lime;", b"s2:lime;", b"s3:lime;", b"s4:lime;"]


def test_a_held_stage_keeps_no_request_body():
    from django.http import HttpResponse

    from django_comet.stages import NextStage

    environ = {"PATH_INFO": "/", "wsgi.input": object(), "HTTP_COOKIE": "a=b"}
    stage = NextStage(HttpResponse(), "/next/", environ)
    assert stage.environ == {"PATH_INFO": "/", "HTTP_COOKIE": "a=b"}


def test_a_stage_gets_the_cookie_header_a_browser_would_send():
    from django.http import HttpResponse
    from django.http.cookie import parse_cookie

    from django_comet.stages import _with_cookies

    quoted = HttpResponse()
    quoted.set_cookie("pref", "a;b c")  # quoted by Django: kept byte for byte
    header = f"pref={quoted.cookies['pref'].coded_value}; old=1; gone=2; kept=3"
    first = HttpResponse()
    first.set_cookie("sessionid", "abc")
    first.set_cookie("old", "", expires="Thu, 01 Jan 1970 00:00:00 GMT")
    first.set_cookie("gone", "", max_age=-1)
    first.set_cookie("adm", "1", path="/admin/")  # not sent to /stage/
    first.set_cookie("here", "1", path="/stage")
    seen = parse_cookie(_with_cookies(header, first.cookies, "/stage/"))
    assert seen == {"pref": "a;b c", "kept": "3", "sessionid": "abc", "here": "1"}
    assert "adm" in parse_cookie(_with_cookies("", first.cookies, "/admin/users/"))
    assert "adm" not in parse_cookie(_with_cookies("", first.cookies, "/administrator/"))


def test_the_clients_own_cookies_reach_a_stage_byte_for_byte():
    """A name sent twice (a cookie of two paths) and parts without "=" were collapsed
    into one each; only the names the first response set are replaced (once)."""
    from django.http import HttpResponse

    from django_comet.stages import _with_cookies

    header = "a=0; z=9; a=2; flag; x; z=9"
    first = HttpResponse()
    first.set_cookie("sessionid", "abc")
    assert _with_cookies(header, first.cookies, "/") == f"{header}; sessionid=abc"
    first.set_cookie("a", "1")
    assert _with_cookies(header, first.cookies, "/") == "a=1; z=9; flag; x; z=9; sessionid=abc"
    first.set_cookie("a", "", max_age=0)
    assert _with_cookies(header, first.cookies, "/") == "z=9; flag; x; z=9; sessionid=abc"


def test_a_chain_of_stages_waits_for_a_slow_reader_instead_of_piling_up(demo_db):
    """Stages that write faster than their client reads: once more than
    COMET_MAX_PENDING_OUTPUT is unsent, the next stage waits for the client (counted in
    `stages_delayed`), and goes on once it reads. Each part used to be added to the
    connection's output whatever was still unsent: a reader slower than the chain (but
    not so slow that the write timeout cut it) grew the server's memory without bound."""
    size, limit = 65536, 262144
    server = runcomet(db=demo_db, env={"TEST_MAX_PENDING_OUTPUT": str(limit)})
    sock = None
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((server.host, server.port))
        target = f"/t/endless-stages/?size={size}&delay=0.01"
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        server.wait_for_status(lambda s: s["stages_delayed"] >= 1)
        ran = requests.get(server.url + "/t/count/", timeout=10).json()["endless"]
        # What left before the chain waited: the limit and one part in the server, what
        # the kernel's buffers took (a few hundred KiB on loopback; a client that reads
        # nothing keeps TCP's window small), and the first response's part.
        assert ran * size <= limit + size + 2 * 1024 * 1024, ran
        sock.settimeout(10)
        received = 0
        while requests.get(server.url + "/t/count/", timeout=10).json()["endless"] < ran + 20:
            received += len(sock.recv(1 << 20))  # reading: the chain goes on
        assert received > limit
    finally:
        if sock is not None:
            sock.close()
        server.wait_for_status(lambda s: s["held"] == 0)
        assert server.stop() == 0, "".join(server.output)


def test_a_staged_response_whose_client_reads_nothing_is_cut_after_the_write_timeout(demo_db):
    """A chain of stages to a client that reads nothing is cut once COMET_TIMEOUT (2 s
    here) passes with no progress: each stage's chunk used to re-arm the write timeout, so
    the chain piled its output up in memory until COMET_MAX_HOLD."""
    server = runcomet(db=demo_db, env={"TEST_TIMEOUT": "2"})
    sock = None
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((server.host, server.port))
        target = "/t/endless-stages/?size=262144&delay=0.3"
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        server.wait_for_status(lambda s: s["held"] == 1)
        status = server.wait_for_status(lambda s: s["held"] == 0, timeout=30)
        assert status["in_flight"] == 1  # the status request only
    finally:
        if sock is not None:
            sock.close()
        assert server.stop() == 0, "".join(server.output)


@pytest.mark.parametrize(
    "kind, first",
    [
        ("template", b"first template;"),  # rendered, as Django renders a view's own
        ("async", b"first async;"),  # an async StreamingHttpResponse
        ("file", None),
        ("lazy", b"first lazy;"),  # target=reverse_lazy(...)
        ("decimal", b"first decimal;"),  # seconds=Decimal(...)
    ],
)
def test_any_first_response_a_view_may_give(comet, kind, first):
    from .views import pattern

    head, chunks = get_staged(comet, f"/t/first-kinds/?kind={kind}")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
    assert b"".join(chunks) == (first or pattern(1000)) + b"end;"


def test_the_first_response_is_closed_once_sent(comet):
    """What the first response holds (here its file) is let go once its part is out,
    not kept while the next stage waits."""
    from .views import pattern_file

    path = pattern_file(1000)
    fds = f"/proc/{comet.proc.pid}/fd"

    def holds_file():
        return any(
            os.readlink(f"{fds}/{fd}") == path for fd in os.listdir(fds) if _is_link(fds, fd)
        )

    with comet.connect() as sock:
        sock.sendall(b"GET /t/first-kinds/?kind=file&delay=600 HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while b"\r\n\r\n" not in received or len(received.partition(b"\r\n\r\n")[2]) < 1007:
            data = sock.recv(65536)
            assert data, received
            received += data
        wait_until(lambda: not holds_file())
    comet.wait_for_status(lambda s: s["held"] == 0)


def _is_link(fds, fd):
    try:
        os.readlink(f"{fds}/{fd}")
    except OSError:  # closed meanwhile
        return False
    return True

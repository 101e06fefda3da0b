"""Views the tests call through a real runcomet."""

import asyncio
import contextlib
import io
import itertools
import json
import os
import stat
import tempfile
import threading
import time
import weakref
from decimal import Decimal

from django.db import connection
from django.db.backends.signals import connection_created
from django.http import (
    FileResponse,
    Http404,
    HttpResponse,
    HttpResponseBadRequest,
    HttpResponseForbidden,
    JsonResponse,
    StreamingHttpResponse,
)
from django.template import engines
from django.template.response import SimpleTemplateResponse
from django.urls import reverse_lazy
from django.views.decorators.csrf import csrf_exempt

from django_comet import (
    defer_in_time,
    defer_until,
    deferred_view,
    event_stream,
    history,
    may_listen,
    poll_response,
    publish,
)


@csrf_exempt
def echo(request):
    """What Django parsed: method, GET, POST, files, body length, a few META keys."""
    files = {
        name: [f.name, f.size, f.read().decode("latin-1")] for name, f in request.FILES.items()
    }
    return JsonResponse(
        {
            "method": request.method,
            "path": request.path,
            "GET": request.GET.dict(),
            "POST": request.POST.dict(),
            "FILES": files,
            "body_length": len(request.body) if not request.FILES else None,
            "content_length": request.META.get("CONTENT_LENGTH"),
            "cookies": request.COOKIES,
            "remote_addr": request.META.get("REMOTE_ADDR"),
            "server_protocol": request.META.get("SERVER_PROTOCOL"),
            "scheme": request.scheme,
        }
    )


def sleep(request):
    if "started" in request.GET:  # a file the test waits for: the view is running
        open(request.GET["started"], "w").close()
    time.sleep(float(request.GET.get("s", "1")))
    return HttpResponse("slept")


def fork_holder(request):
    """Fork a child that keeps a copy of every descriptor of the server (its listening
    socket among them) until killed, as a pre-forked sibling does.  (A forked child
    closes the server's sockets: the copies it keeps are made before the fork.)"""
    copies = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # (the listing's own, closed by now)
            if stat.S_ISSOCK(os.fstat(int(fd)).st_mode):  # (not the output the tests read)
                copies.append(os.dup(int(fd)))
    pid = forked_child()
    for fd in copies:
        os.close(fd)
    return HttpResponse(str(pid))


def fork_child(request):
    """Fork a child that lives on (until killed), as a view starting a daemon does."""
    return HttpResponse(str(forked_child()))


def forked_child() -> int:
    pid = os.fork()
    if pid == 0:
        quiet = os.open(os.devnull, os.O_WRONLY)  # not the server's output: the tests read
        os.dup2(quiet, 1)  # it to its end, which would wait for this child
        os.dup2(quiet, 2)
        time.sleep(60)
        os._exit(0)
    return pid


def boom(request):
    raise RuntimeError("boom (a test of the 500 path)")


def quick_stages(request):
    """Five stages 20 ms apart; a cookie of the first request travels to every stage."""
    response = HttpResponse(b"s0;")
    response.stage = 0
    response["X-First"] = "yes"
    return defer_in_time(response, float(request.GET.get("delay", "0.02")), "quick_stage")


@deferred_view()
def quick_stage(request, response_prev=None):
    stage = response_prev.stage + 1
    response = HttpResponse(f"s{stage}:{request.COOKIES.get('flavour', '-')};".encode())
    response.stage = stage
    response["X-Ignored"] = "later stages' headers are not sent"
    if stage >= 4:
        return response
    return defer_in_time(response, 0.02, quick_stage)


_counter = {"stages": 0, "endless": 0}  # stage views run: counted_stage's, endless_stage's
_counter_lock = threading.Lock()


def endless_stages(request):
    """Stages of ?size= bytes every ?delay= seconds, for ever (until COMET_MAX_HOLD)."""
    response = HttpResponse(b"e" * int(request.GET["size"]))
    response.size, response.delay = int(request.GET["size"]), float(request.GET["delay"])
    return defer_in_time(response, response.delay, endless_stage)


@deferred_view()
def endless_stage(request, response_prev=None):
    with _counter_lock:
        _counter["endless"] += 1
    response = HttpResponse(b"e" * response_prev.size)
    response.size, response.delay = response_prev.size, response_prev.delay
    return defer_in_time(response, response.delay, endless_stage)


def counted_first(request):
    return defer_in_time(
        HttpResponse(b"first;"), float(request.GET.get("delay", "0.5")), "/t/counted-stage/"
    )


@deferred_view()
def counted_stage(request, response_prev=None):
    with _counter_lock:
        _counter["stages"] += 1
    return HttpResponse(b"stage;")


def count(request):
    return JsonResponse(_counter)


def stage_to_missing(request):
    return defer_in_time(HttpResponse(b"first;"), 0.01, "/t/stage-404/answer/")


@deferred_view()
def missing_stage(request, response_prev=None):
    raise Http404("gone since")


def stage_unmatched(request):
    """A target no URL pattern matches: an error in this view, not a cut stream later."""
    return defer_in_time(HttpResponse(b"first;"), 0.01, request.GET.get("to", "/t/nothing/"))


def to_async_stage(request):
    return defer_in_time(HttpResponse(b"first;"), 0.01, "/t/async-stage/")


@deferred_view()
async def async_stage(request, response_prev=None):
    await asyncio.sleep(0)
    return HttpResponse(b"async stage;")


first_files = []  # the files first_kinds opened, to see that they are closed


def first_kinds(request):
    """A first part of the kind ?kind= says, given to defer_in_time as a view may give
    it: a TemplateResponse (unrendered), an async StreamingHttpResponse, a FileResponse;
    or a plain one with a lazy target, or a Decimal delay.  ?delay= (default 0.01)."""
    kind, delay = request.GET["kind"], float(request.GET.get("delay", "0.01"))
    target = "final_stage"
    if kind == "template":
        first = SimpleTemplateResponse(
            engines["django"].from_string("first {{ kind }};"), {"kind": kind}
        )
    elif kind == "async":

        async def parts():
            for part in (b"first ", b"async;"):
                await asyncio.sleep(0)
                yield part

        first = StreamingHttpResponse(parts())
    elif kind == "file":
        first = FileResponse(open(pattern_file(1000), "rb"))  # noqa: SIM115 (closed by it)
        first_files.append(first.file_to_stream)
    else:
        first = HttpResponse(f"first {kind};")
        if kind == "lazy":
            target = reverse_lazy("final_stage")
        elif kind == "decimal":
            return defer_in_time(first, Decimal(str(delay)), target)
    return defer_in_time(first, delay, target)


@deferred_view()
def final_stage(request, response_prev=None):
    return HttpResponse(b"end;")


def to_file_stage(request):
    return defer_in_time(HttpResponse(b"first;"), 0.01, "/t/file-stage/")


@deferred_view()
def file_stage(request, response_prev=None):
    return FileResponse(open(pattern_file(100_000), "rb"))


def cookie_first(request):
    """Sets a session value and a cookie, and deletes one: the stage sees them as the
    client's next request would."""
    request.session["visits"] = 1
    response = HttpResponse(b"first;")
    response.set_cookie("flavour", "mint")
    response.delete_cookie("stale")
    return defer_in_time(response, 0.01, "/t/cookie-stage/")


@deferred_view()
def cookie_stage(request, response_prev=None):
    seen = {
        "flavour": request.COOKIES.get("flavour"),
        "stale": request.COOKIES.get("stale"),
        "visits": request.session.get("visits"),
        "if_none_match": request.META.get("HTTP_IF_NONE_MATCH"),
        "file_wrapper": "wsgi.file_wrapper" in request.META,
    }
    return HttpResponse(json.dumps(seen).encode())


def stage_raises(request):
    return defer_in_time(HttpResponse(b"first;"), 0.01, "/t/stage-raises/answer/")


@deferred_view()
def raising_stage(request, response_prev=None):
    raise RuntimeError("stage boom")


def stage_sets_cookie(request):
    return defer_in_time(HttpResponse(b"first;"), 0.01, "/t/stage-sets-cookie/answer/")


@deferred_view()
def cookie_setting_stage(request, response_prev=None):
    response = HttpResponse(b"stage;")
    response.set_cookie("late", "never-sent")
    return response


def stage_renews_cookie(request):
    return defer_in_time(HttpResponse(b"first;"), 0.01, "/t/stage-renews-cookie/answer/")


@deferred_view()
def cookie_renewing_stage(request, response_prev=None):
    """Sets a cookie again to the value the client sent (as Django renews a CSRF
    cookie): nothing the client lacks."""
    response = HttpResponse(b"stage;")
    response.set_cookie("flavour", request.COOKIES["flavour"])
    return response


def marking_middleware(get_response):
    """Marks each request it sees: tests add it with override_settings(MIDDLEWARE=...)."""

    def middleware(request):
        request.marked = True
        return get_response(request)

    return middleware


def replacing_middleware(get_response):
    """Takes the response's content, then answers another response in its place (when
    the request asks: ``?replace=1``, a plain one; ``?replace=endless``, an endless
    stream of ticks)."""

    def ticks():
        for n in itertools.count():
            yield b"tick %d\n" % n
            time.sleep(0.05)  # (the pace of an endless stream)

    def middleware(request):
        response = get_response(request)
        replace = request.GET.get("replace")
        if replace and response.streaming:
            response.streaming_content  # noqa: B018  (taken, as a wrapping middleware does)
            if replace == "endless":
                return StreamingHttpResponse(ticks(), content_type="text/plain")
            return HttpResponse(b"replaced")
        return response

    return middleware


def marked_first(request):
    mark = b"marked" if getattr(request, "marked", False) else b"-"
    return defer_in_time(HttpResponse(b"first:" + mark + b";"), 0.01, "/t/marked/stage/")


@deferred_view()
def marked_stage(request, response_prev=None):
    mark = b"marked" if getattr(request, "marked", False) else b"-"
    return HttpResponse(b"stage:" + mark + b";")


def big(request):
    """A lazily produced 4 MiB body (streamed, no Content-Length), in items of 1 MiB
    (?kib= another size)."""
    size = int(request.GET.get("mb", "4")) * 1024 * 1024
    item = int(request.GET.get("kib", "1024")) * 1024
    return StreamingHttpResponse(b"x" * item for _ in range(size // item))


def big_from_the_database(request):
    """``big``, after a query: the view's thread has its database connection."""
    connection.ensure_connection()
    return big(request)


# Every database connection Django opened in this process, open or closed since.
_connections = weakref.WeakSet()
connection_created.connect(lambda sender, connection, **kwargs: _connections.add(connection))


def open_connections(request):
    """How many of them are open, in any thread (read, not used, from this one)."""
    connection.ensure_connection()  # this thread's, so that it counts too
    return JsonResponse({"open": sum(c.connection is not None for c in list(_connections))})


def pattern(size):
    """The bytes of the test files: a period of 251 shows a misplaced or repeated block."""
    return (bytes(range(251)) * (size // 251 + 1))[:size]


def pattern_file(size):
    path = os.path.join(tempfile.gettempdir(), f"django-comet-test-pattern-{size}")
    if not os.path.exists(path):
        # Written in blocks: one large transient allocation would raise glibc's mmap
        # threshold for the rest of the server's life and blur the RSS checks of others.
        block = pattern(251 * 256)
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), delete=False) as tmp:
            for _ in range(size // len(block)):
                tmp.write(block)
            tmp.write(block[: size % len(block)])
        os.replace(tmp.name, path)
    return path


def file_view(request):
    """A FileResponse of the ``size``-byte pattern file from byte ``skip`` on; with
    ``memory=1``, of the same bytes in a BytesIO (no descriptor to send)."""
    size, skip = int(request.GET["size"]), int(request.GET.get("skip", "0"))
    if request.GET.get("memory"):
        f = io.BytesIO(pattern(size))
    else:
        f = open(pattern_file(size), "rb")  # noqa: SIM115 (FileResponse closes it)
    f.seek(skip)
    return FileResponse(f, content_type="application/octet-stream")


async def async_view(request):
    """An async view: Django runs it through asgiref's async_to_sync under WSGI."""
    await asyncio.sleep(0)
    return JsonResponse({"async": True, "path": request.path})


async def async_staged(request):
    """defer_in_time from an async view (run in another thread by async_to_sync)."""
    await asyncio.sleep(0)
    response = HttpResponse(b"s0;")
    response.stage = 0
    return defer_in_time(response, 0.01, "quick_stage")


def authorize(request, channel):
    """COMET_AUTHORIZE of the tests: "secret" channels are refused."""
    return not channel.startswith("secret")


@csrf_exempt
def publish_view(request):
    """POST channel (or several, comma-separated: one event each, in order), data (JSON
    text), event: publish and answer the (last) id."""
    data = json.loads(request.POST["data"])
    for channel in request.POST["channel"].split(","):
        event_id = publish(channel, data, event=request.POST.get("event") or None)
    return JsonResponse({"id": event_id})


def publish_many(request):
    """?channel, ?n events of ?size bytes of data each, as fast as publish() goes."""
    data = "x" * int(request.GET.get("size", "10"))
    for _ in range(int(request.GET["n"])):
        event_id = publish(request.GET["channel"], data)
    return JsonResponse({"id": event_id})


def publish_around_a_gap(request):
    """?n events on ?channel, an id this process never receives (a broker's gap: as a
    large PostgreSQL event pruned before it was read), ?n more; the memory broker's
    ids."""
    from django_comet.brokers import get_broker
    from django_comet.evloop.hub import hub

    channel, n, data = request.GET["channel"], int(request.GET["n"]), "x" * 1000
    broker = get_broker()
    first = publish(channel, data)
    for _ in range(n - 1):
        publish(channel, data)
    with broker._lock:
        broker._last_id += 1
        lost = broker._last_id
        hub.add_gap([channel], lost)
    for _ in range(n):
        last = publish(channel, data)
    return JsonResponse({"first": first, "lost": lost, "last": last})


def stream_view(request):
    channels = request.GET["channels"].split(",")
    return event_stream(request, *channels)


def stream_then_publish(request):
    """An SSE stream of ?channels=, then ?count= events published on it before the view
    returns: they reach the history after the stream's replay, before the server holds
    it."""
    channel = request.GET["channels"]
    response = event_stream(request, channel)
    for n in range(int(request.GET["count"])):
        publish(channel, n)
    return response


def stream_204(request):
    """An event stream sent with a status that carries no body."""
    response = event_stream(request, request.GET["channels"])
    response.status_code = 204
    return response


def poll_view(request):
    """Long-poll on ?channel= after ?since= (optional) for ?timeout= seconds."""
    channel = request.GET["channel"]
    if not may_listen(request, channel):
        return HttpResponse(status=403)
    since = request.GET.get("since")
    response = HttpResponse(content_type="application/json")
    response.channel = channel
    return defer_until(
        response,
        channel,
        poll_answer,
        timeout=float(request.GET.get("timeout", "5")),
        since=int(since) if since is not None else None,
    )


@deferred_view()
def poll_answer(request, response_prev=None, event=None):
    return JsonResponse({"event": event})


def poll_twice(request):
    """Two long-poll waits in one response: the stage view waits again."""
    response = HttpResponse(b"[", content_type="application/json")
    return defer_until(response, request.GET["channel"], poll_again, timeout=30)


@deferred_view()
def poll_again(request, response_prev=None, event=None):
    if event is None:  # timed out
        return HttpResponse(b"null]")
    response = HttpResponse(json.dumps(event).encode() + b",")
    if response_prev.content == b"[":  # the first wait is over: wait once more
        return defer_until(response, event["channel"], poll_again, timeout=30)
    return HttpResponse(json.dumps(event).encode() + b"]")


def poll_then_stage(request):
    """A long-poll wait, then a timed stage whose view takes no ``event``."""
    response = HttpResponse(b"waiting;")
    return defer_until(response, request.GET["channel"], after_event, timeout=30)


@deferred_view()
def after_event(request, response_prev=None, event=None):
    response = HttpResponse(f"event {event['id']};".encode() if event else b"timeout;")
    return defer_in_time(response, 0, timed_stage)


@deferred_view()
def timed_stage(request, response_prev=None):
    return HttpResponse(b"done after " + response_prev.content)


def fast_poll_view(request):
    """poll_response on ?channel= (comma-separated) after ?since= (optional) for
    ?timeout= seconds."""
    return poll_response(
        request,
        *request.GET["channel"].split(","),
        since=request.GET.get("since"),
        timeout=float(request.GET.get("timeout", "5")),
    )


def room_stream(request, room):
    """An event stream of the channel the path names: the pages of two rooms subscribe
    with the same relative URLs, "events/" and "poll/"."""
    return event_stream(request, room)


def room_poll(request, room):
    return poll_response(request, room, since=request.GET.get("since"))


def broken_poll_view(request):
    """fast_poll_view whose answer fails to render, as a third-party ``render`` with a
    bug would."""
    response = fast_poll_view(request)

    def render(events, after, gap=False):
        raise RuntimeError("this answer cannot be rendered")

    response.comet_deferral.render = render
    return response


# The README's long-poll in the 2007 style, as printed there (channel "readme").
def wait_for_chat(request):
    if not may_listen(request, "readme"):  # COMET_AUTHORIZE: your own views must ask it
        return HttpResponseForbidden()
    since = request.GET.get("since", "0")
    if not (since.isascii() and since.isdigit() and len(since) <= 19 and int(since) < 2**63):
        return HttpResponseBadRequest("since: an event id")
    response = HttpResponse(content_type="application/json")
    response.since = int(since)
    return defer_until(response, "readme", readme_deliver, timeout=25, since=response.since)


@deferred_view()
def readme_deliver(request, response_prev=None, event=None):
    if response_prev is None:  # requested directly (a crawler), not as a stage
        return HttpResponseBadRequest("a stage of chat/wait/")
    since = response_prev.since
    events = history("readme", after=since)
    if event is not None and not events:  # a cursor from before a reset: start over
        since, events = 0, history("readme")
    last_id = events[-1]["id"] if events else since
    return JsonResponse({"events": events, "last_id": last_id})


_mute_once: set[str] = set()


def mute_once_poll_view(request):
    """fast_poll_view, except that the first poll with a cursor above 0 on a channel
    gets no byte at all (it waits, then fails): a poll sent on a connection that died
    without a word, as a browser's pooled one after a network blip."""
    channel = request.GET["channel"]
    if request.GET.get("since", "0") != "0" and channel not in _mute_once:
        _mute_once.add(channel)
        time.sleep(float(request.GET.get("mute", "20")))
        return HttpResponse(status=504)
    return fast_poll_view(request)


def wait_after_stage(request):
    """A response whose stage returns the wait named by ?kind= (poll: poll_response,
    stream: an SSE stream, until: defer_until) on ?channel=.  The stage comes after a wait
    for an event of ?first= (30 s: ended sooner by COMET_MAX_HOLD), or, with ?gate=PATH,
    at once, but its view runs only once the file PATH exists (it creates PATH.started
    when it runs): a stage still running when the server is told to stop."""
    response = HttpResponse(b"first;")
    response.kind, response.channel = request.GET["kind"], request.GET["channel"]
    response.gate = request.GET.get("gate")
    if response.gate:
        return defer_in_time(response, 0, waiting_stage)
    return defer_until(response, request.GET["first"], waiting_stage, timeout=30)


@deferred_view()
def waiting_stage(request, response_prev=None, event=None):
    gate = response_prev.gate
    if gate:
        open(gate + ".started", "w").close()
        deadline = time.monotonic() + 30
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
    kind, channel = response_prev.kind, response_prev.channel
    if kind == "poll":
        return poll_response(request, channel, timeout=30)
    if kind == "stream":
        return event_stream(request, channel)
    response = HttpResponse(b"waiting;")
    return defer_until(response, channel, poll_answer, timeout=30)


def chain_of_polls(request):
    """defer_until stages, one per event of ?channel= after ?since=, each answered at
    once while the history has newer ones, until a wait of ?timeout= s has none."""
    response = HttpResponse(b"")
    response.timeout = float(request.GET.get("timeout", "0.2"))
    since = int(request.GET["since"])
    return defer_until(
        response, request.GET["channel"], next_in_chain, timeout=response.timeout, since=since
    )


@deferred_view()
def next_in_chain(request, response_prev=None, event=None):
    if event is None:
        return HttpResponse(b"end")
    response = HttpResponse(f"{event['id']};".encode())
    response.timeout = response_prev.timeout
    return defer_until(
        response, event["channel"], next_in_chain, timeout=response.timeout, since=event["id"]
    )


def paced_big(request):
    """2 MiB items, one every 0.3 s, for a minute; the file ?closed= is written when the
    body is closed."""

    def items():
        try:
            for _ in range(200):
                time.sleep(0.3)
                yield b"p" * (2 * 1024 * 1024)
        finally:
            with open(request.GET["closed"], "w") as f:
                f.write("closed")

    return StreamingHttpResponse(items())


def db_rows(request):
    """?rows= numbered lines of 1 KiB, read from the database as the body goes: the
    cursor needs its view thread's connection until the last row."""
    count = int(request.GET["rows"])
    numbers = (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < %s) "
        "SELECT i FROM n"
    )

    def lines():
        with connection.cursor() as cursor:
            cursor.execute(numbers, [count])
            while rows := cursor.fetchmany(100):
                for (i,) in rows:
                    yield b"%08d%s\n" % (i, b"." * 1015)

    return StreamingHttpResponse(lines())

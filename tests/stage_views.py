"""Staged responses (defer_in_time, @deferred_view) the tests call through a real runcomet."""

import asyncio
import itertools
import json
import threading
import time
from decimal import Decimal

from django.http import FileResponse, Http404, HttpResponse, JsonResponse, StreamingHttpResponse
from django.template import engines
from django.template.response import SimpleTemplateResponse
from django.urls import reverse_lazy
from django.utils.decorators import method_decorator
from django.views import View

from django_comet import defer_in_time, defer_until, deferred_view

from .views import pattern_file


def quick_stages(request):
    """Five stages 20 ms apart; a cookie of the first request travels to every stage."""
    response = HttpResponse(b"s0;")
    response.stage = 0
    response["X-First"] = "yes"
    response["Content-Length"] = "3"  # the first part's: not the whole stream's
    if "buffered" in request.GET:  # the view's say over a proxy's buffering
        response["X-Accel-Buffering"] = "yes"
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


def counted_poll(request):
    """A long-poll on ?channel= whose stage, on an event or at its ?timeout=, counts."""
    return defer_until(
        HttpResponse(b"first;"),
        request.GET["channel"],
        counted_stage,
        timeout=float(request.GET["timeout"]),
    )


@deferred_view()
def counted_stage(request, response_prev=None, event=None):
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


async def async_staged(request):
    """defer_in_time from an async view (run in another thread by async_to_sync)."""
    await asyncio.sleep(0)
    response = HttpResponse(b"s0;")
    response.stage = 0
    return defer_in_time(response, 0.01, "quick_stage")


def _endless():
    while True:
        yield b"x" * 65536


def endless_part(request):
    """An endless generator where a held response's part goes: the first response
    (?where=first) or a stage's."""
    if request.GET["where"] == "first":
        return defer_in_time(StreamingHttpResponse(_endless()), 0.01, final_stage)
    return defer_in_time(HttpResponse(b"first;"), 0.01, endless_part_stage)


@deferred_view()
def endless_part_stage(request, response_prev=None):
    return StreamingHttpResponse(_endless())


def to_plain_stage(request):
    """To an undecorated stage view at ?n= (one path per object), or a class-based one
    decorated with method_decorator (?to=class)."""
    if request.GET.get("to") == "class":
        return defer_in_time(HttpResponse(b"first;"), 0.01, "/t/class-stage/")
    return defer_in_time(HttpResponse(b"first;"), 0.01, f"/t/plain-stage/{request.GET['n']}/")


def plain_stage(request, n, response_prev=None):  # (no @deferred_view(): the mistake)
    return HttpResponse(b"plain;")


class ClassStage(View):
    @method_decorator(deferred_view())
    def get(self, request, response_prev=None):
        return HttpResponse(b"class:%s;" % str(response_prev is not None).encode())

"""A chat room: one page, a POST to send, and the same events by SSE or long-poll."""

from __future__ import annotations

from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBadRequest, JsonResponse
from django.http.response import HttpResponseBase
from django.shortcuts import render
from django.views.decorators.csrf import ensure_csrf_cookie
from django.views.decorators.http import require_GET, require_POST

from django_comet import defer_until, deferred_view, event_stream, history, may_listen, publish

CHANNEL = "chat"


def latest_id() -> int:
    events = history(CHANNEL)
    return events[-1]["id"] if events else 0


MAX_NAME = 40
MAX_TEXT = 2000


@require_GET
@ensure_csrf_cookie
def room(request: HttpRequest) -> HttpResponse:
    return render(request, "chat/room.html")


@require_POST
def send(request: HttpRequest) -> HttpResponseBase:
    name = request.POST.get("name", "").strip()[:MAX_NAME] or "anonymous"
    text = request.POST.get("text", "").strip()
    if not text:
        return HttpResponseBadRequest("Empty message.")
    if len(text) > MAX_TEXT:
        return HttpResponseBadRequest(f"Messages are at most {MAX_TEXT} characters.")
    event_id = publish(CHANNEL, {"name": name, "text": text})
    return JsonResponse({"id": event_id}, status=201)


@require_GET
def events(request: HttpRequest) -> HttpResponseBase:
    return event_stream(request, CHANNEL, retry=2000)


@require_GET
def poll(request: HttpRequest) -> HttpResponseBase:
    """Long-poll: events after ``since`` at once if there are any, else wait for one."""
    try:
        since = int(request.GET.get("since", "0"))
    except ValueError:
        return HttpResponseBadRequest("since must be an event id.")
    if not may_listen(request, CHANNEL):
        return HttpResponse("Not allowed to listen.", status=403)
    response = HttpResponse(content_type="application/json")
    response["Cache-Control"] = "no-cache"
    response.since = since  # type: ignore[attr-defined]
    return defer_until(response, CHANNEL, poll_deliver, timeout=25, since=since)


@deferred_view()
def poll_deliver(
    request: HttpRequest, response_prev: HttpResponse, event: dict | None = None
) -> JsonResponse:
    if response_prev is None:  # only reachable as the stage of poll()
        raise Http404
    since = response_prev.since  # type: ignore[attr-defined]
    found = [{"id": e["id"], "data": e["data"]} for e in history(CHANNEL, after=since)]
    if not found and since > latest_id():
        # A cursor from another epoch (the memory broker restarted): send the history
        # and a last_id the client can follow from.
        found = [{"id": e["id"], "data": e["data"]} for e in history(CHANNEL)]
    return JsonResponse({"events": found, "last_id": found[-1]["id"] if found else since})

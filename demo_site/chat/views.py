"""A chat room: one page, a POST to send, and the same events by SSE or long-poll."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, JsonResponse
from django.http.response import HttpResponseBase
from django.shortcuts import render
from django.views.decorators.csrf import ensure_csrf_cookie
from django.views.decorators.http import require_POST, require_safe

from django_comet import event_stream, poll_response, publish

CHANNEL = "chat"
MAX_NAME = 40
MAX_TEXT = 2000
PLAIN = "text/plain; charset=utf-8"  # the page shows a refusal's reason if plain text


@require_safe
@ensure_csrf_cookie
def room(request: HttpRequest) -> HttpResponse:
    return render(request, "chat/room.html")


@require_POST
def send(request: HttpRequest) -> HttpResponseBase:
    name = request.POST.get("name", "").strip()[:MAX_NAME] or "anonymous"
    text = request.POST.get("text", "").strip()
    if not text:
        return HttpResponseBadRequest("Empty message.", content_type=PLAIN)
    if len(text) > MAX_TEXT:
        return HttpResponseBadRequest(
            f"Messages are at most {MAX_TEXT} characters.", content_type=PLAIN
        )
    event_id = publish(CHANNEL, {"name": name, "text": text})
    return JsonResponse({"id": event_id}, status=201)


@require_safe
def events(request: HttpRequest) -> HttpResponseBase:
    return event_stream(request, CHANNEL, retry=2000)


@require_safe
def poll(request: HttpRequest) -> HttpResponseBase:
    """Long-poll: events after ``since`` at once if there are any, else wait for one."""
    return poll_response(request, CHANNEL, since=request.GET.get("since", "0"), timeout=25)

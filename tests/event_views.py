"""Events the tests call through a real runcomet: publishing, streams, long-polls, and
the authorization hook."""

import json
import os
import time

from django.http import HttpResponse, HttpResponseBadRequest, HttpResponseForbidden, JsonResponse
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

"""gunicorn -k gevent: each stream waits on its own gevent Queue, each long-poll on an
AsyncResult; a publish puts the frame in every queue and sets every waiting poll.

    gunicorn -k gevent -w 1 --worker-connections 20000 peers.gevent_app:application
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import gevent
from django.core.wsgi import get_wsgi_application
from django.http import JsonResponse, StreamingHttpResponse
from django.urls import path
from gevent.event import AsyncResult
from gevent.queue import Queue

from .minimal import configure, event, frame

_ids = itertools.count(1)
_streams: defaultdict[str, set[Queue]] = defaultdict(set)
_polls: defaultdict[str, set[AsyncResult]] = defaultdict(set)


def publish(request):
    channel, data = request.POST["channel"], request.POST["data"]
    event_id = next(_ids)
    chunk = frame(event_id, data)
    for queue in _streams[channel]:
        queue.put(chunk)
    for waiter in _polls.pop(channel, ()):
        waiter.set(event(channel, event_id, data))
    return JsonResponse({"id": event_id})


def stream(request):
    channel = request.GET["channels"]

    def frames():
        queue = Queue()
        _streams[channel].add(queue)
        try:
            yield b": subscribed\n\n"
            while True:
                yield queue.get()
        finally:
            _streams[channel].discard(queue)

    response = StreamingHttpResponse(frames(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    return response


def poll(request):
    channel = request.GET["channel"]
    waiter = AsyncResult()
    _polls[channel].add(waiter)
    try:
        answer = waiter.get(timeout=float(request.GET.get("timeout", "5")))
    except gevent.Timeout:
        answer = None
    finally:
        _polls[channel].discard(waiter)
    return JsonResponse({"event": answer})


def count(request):
    channel = request.GET["channel"]
    return JsonResponse({"subscribers": len(_streams[channel]) + len(_polls[channel])})


urlpatterns = [
    path("t/publish/", publish),
    path("t/stream/", stream),
    path("t/poll/", poll),
    path("t/count/", count),
]
configure(__name__)
application = get_wsgi_application()

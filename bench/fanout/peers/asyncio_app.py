"""uvicorn with Django async views: each stream is a StreamingHttpResponse over an async
generator waiting on its own asyncio.Queue, each long-poll awaits a Future; a publish
puts the frame in every queue and resolves every waiting poll.

    uvicorn peers.asyncio_app:application --workers 1 --lifespan off
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict

from django.core.asgi import get_asgi_application
from django.http import JsonResponse, StreamingHttpResponse
from django.urls import path

from .minimal import configure, event, frame

_ids = itertools.count(1)
_streams: defaultdict[str, set[asyncio.Queue]] = defaultdict(set)
_polls: defaultdict[str, set[asyncio.Future]] = defaultdict(set)


async def publish(request):
    channel, data = request.POST["channel"], request.POST["data"]
    event_id = next(_ids)
    chunk = frame(event_id, data)
    for queue in _streams[channel]:
        queue.put_nowait(chunk)
    for waiter in _polls.pop(channel, ()):
        if not waiter.done():
            waiter.set_result(event(channel, event_id, data))
    return JsonResponse({"id": event_id})


async def stream(request):
    channel = request.GET["channels"]

    async def frames():
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        _streams[channel].add(queue)
        try:
            yield b": subscribed\n\n"
            while True:
                yield await queue.get()
        finally:
            _streams[channel].discard(queue)

    response = StreamingHttpResponse(frames(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    return response


async def poll(request):
    channel = request.GET["channel"]
    waiter = asyncio.get_running_loop().create_future()
    _polls[channel].add(waiter)
    try:
        answer = await asyncio.wait_for(waiter, float(request.GET.get("timeout", "5")))
    except asyncio.TimeoutError:
        answer = None
    finally:
        _polls[channel].discard(waiter)
    return JsonResponse({"event": answer})


async def count(request):
    channel = request.GET["channel"]
    return JsonResponse({"subscribers": len(_streams[channel]) + len(_polls[channel])})


urlpatterns = [
    path("t/publish/", publish),
    path("t/stream/", stream),
    path("t/poll/", poll),
    path("t/count/", count),
]
configure(__name__)
application = get_asgi_application()

"""The demo views: the 2007 staged response, and the server's status."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.response import HttpResponseBase

from .brokers import get_broker
from .conf import comet_settings
from .deferred import defer_in_time, deferred_view
from .evloop.hub import hub

LAST_STAGE = 3


def comet_main(request: HttpRequest) -> HttpResponseBase:
    response = HttpResponse("First content<br /> ")
    response.stage = 0  # type: ignore[attr-defined]
    return defer_in_time(response, 1, "django_comet:stage")


@deferred_view()
def comet_stage(
    request: HttpRequest, response_prev: HttpResponse | None = None
) -> HttpResponseBase:
    stage = (response_prev.stage if response_prev is not None else 0) + 1  # type: ignore[attr-defined]
    response = HttpResponse("stage%i<br /> " % stage)
    response.stage = stage  # type: ignore[attr-defined]
    url = "django_comet:stage" if stage < LAST_STAGE else "django_comet:stage_last"
    return defer_in_time(response, 1, url)


@deferred_view()
def comet_stage_last(
    request: HttpRequest, response_prev: HttpResponse | None = None
) -> HttpResponse:
    stage = (response_prev.stage if response_prev is not None else 0) + 1  # type: ignore[attr-defined]
    return HttpResponse("last_stage%i<br /> " % stage)


def _may_see_figures(request: HttpRequest) -> bool:
    user = getattr(request, "user", None)
    return bool(settings.DEBUG or comet_settings.STATUS_PUBLIC or getattr(user, "is_staff", False))


def _figures(request: HttpRequest) -> dict[str, Any]:
    server = request.META.get("evloop.server")
    figures: dict[str, Any]
    if server is None:  # not under runcomet
        figures = {"server": None, "held": 0, "requests": None, "events_published": hub.published}
    else:
        figures = {"server": "runcomet", **server.server_stats()}
    figures["broker_listening"] = _broker_listening()
    return figures


def _broker_listening() -> bool:
    """Whether this process receives the broker's events (the memory broker always
    does; a shared one once its listener has connected and caught up)."""
    connected = getattr(get_broker(), "connected", None)
    return connected is None or bool(connected.is_set())


def status(request: HttpRequest) -> JsonResponse:
    """What the server holds right now; JSON, for DEBUG, staff or COMET_STATUS_PUBLIC."""
    if not _may_see_figures(request):
        return JsonResponse({"error": "forbidden"}, status=403)
    return JsonResponse(_figures(request))


_METRICS = [
    # (name, type, help, key in the status figures)
    ("comet_workers", "gauge", "Worker processes these figures add up.", "workers"),
    ("comet_held_connections", "gauge", "Responses held open (deferrals, polls, streams).", "held"),
    ("comet_sse_streams", "gauge", "Server-Sent Events streams open.", "streams"),
    ("comet_requests_total", "counter", "Requests the application served since start.", "requests"),
    (
        "comet_refused_total",
        "counter",
        "Requests answered with an error before any application saw them.",
        "refused",
    ),
    (
        "comet_events_published_total",
        "counter",
        "Events received (by the worker that received most, under --workers).",
        "events_published",
    ),
    (
        "comet_streams_behind",
        "gauge",
        "Streams over their bound on unsent output, to catch up from the history.",
        "streams_behind",
    ),
    ("comet_dropped_slow_total", "counter", "Streams cut for reading too slowly.", "dropped_slow"),
    (
        "comet_stages_delayed_total",
        "counter",
        "Times a stage waited for its client to take the parts before it.",
        "stages_delayed",
    ),
    ("comet_in_flight", "gauge", "Requests being answered.", "in_flight"),
    ("comet_timers", "gauge", "Pending loop timers and watchers.", "timers"),
    ("comet_threads", "gauge", "View threads, with spares standing in.", "threads"),
    ("comet_connections", "gauge", "Client connections open.", "connections"),
    (
        "comet_header_timeouts_total",
        "counter",
        "Connections closed for not sending a whole request head in time.",
        "header_timeouts",
    ),
    (
        "comet_accept_pauses_total",
        "counter",
        "Times accepting paused because accept() failed (out of descriptors).",
        "accept_pauses",
    ),
    (
        "comet_backlog_pauses_total",
        "counter",
        "Times accepting paused because many requests waited for a view thread.",
        "backlog_pauses",
    ),
    (
        "comet_connection_pauses_total",
        "counter",
        "Times accepting paused because COMET_MAX_CONNECTIONS connections were open.",
        "connection_pauses",
    ),
    (
        "comet_broker_listening",
        "gauge",
        "1 when the answering process receives the broker's events.",
        "broker_listening",
    ),
]


def _label(value: str) -> str:
    """A label value as the text format escapes it (channel names allow none of these
    characters today: escaped all the same, so that a looser rule cannot break it)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics(request: HttpRequest) -> HttpResponse:
    """The status figures in Prometheus' text exposition format (0.0.4)."""
    if not _may_see_figures(request):
        return HttpResponse("forbidden\n", status=403, content_type="text/plain")
    figures = _figures(request)
    lines = []
    for name, kind, help_text, key in _METRICS:
        lines += [
            f"# HELP {name} {help_text}",
            f"# TYPE {name} {kind}",
            f"{name} {int(figures.get(key) or 0)}",
        ]
    lines += [
        "# HELP comet_channel_subscribers Connections subscribed to a channel.",
        "# TYPE comet_channel_subscribers gauge",
    ]
    for channel, count in figures.get("channels", {}).items():
        lines.append(f'comet_channel_subscribers{{channel="{_label(channel)}"}} {count}')
    return HttpResponse(
        "\n".join(lines) + "\n", content_type="text/plain; version=0.0.4; charset=utf-8"
    )

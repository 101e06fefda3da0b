"""The demo views: the 2007 staged response, and the server's status."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.response import HttpResponseBase

from .conf import comet_settings
from .deferred import defer_in_time, deferred_view

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


def status(request: HttpRequest) -> JsonResponse:
    """What the server holds right now; JSON, for DEBUG, staff or COMET_STATUS_PUBLIC."""
    user = getattr(request, "user", None)
    if not (settings.DEBUG or comet_settings.STATUS_PUBLIC or getattr(user, "is_staff", False)):
        return JsonResponse({"error": "forbidden"}, status=403)
    server = request.META.get("evloop.server")
    if server is None:
        return JsonResponse({"server": None, "held": 0, "requests": None})
    return JsonResponse({"server": "runcomet", **server.stats()})

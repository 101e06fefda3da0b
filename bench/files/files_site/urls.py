import os

from django.http import FileResponse, HttpRequest, JsonResponse
from django.urls import path


def download(request: HttpRequest) -> FileResponse:
    """The benchmark's file (BENCH_FILE), as any Django site serves a download."""
    return FileResponse(open(os.environ["BENCH_FILE"], "rb"))


def hello(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"hello": "world"})


urlpatterns = [path("file/", download), path("hello/", hello)]

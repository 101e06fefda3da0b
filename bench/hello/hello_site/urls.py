import os

from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse
from django.urls import path


def hello(request: HttpRequest) -> HttpResponse:
    return HttpResponse("Hello, world!")


def hello_json(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"hello": "world"})


def download(request: HttpRequest) -> FileResponse:
    """bench/files: the file named by BENCH_FILE, as any Django site serves a download."""
    return FileResponse(open(os.environ["BENCH_FILE"], "rb"))


urlpatterns = [path("", hello), path("json/", hello_json), path("file/", download)]

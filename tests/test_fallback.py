"""The deferred views without runcomet: Django's test client gets a blocking stream."""

import json

import pytest
from django.test import Client

from django_comet import defer_in_time


def test_staged_view_under_test_client():
    response = Client().get("/t/quick-stages/?delay=0", HTTP_COOKIE="flavour=lime")
    assert response.status_code == 200
    assert response.streaming
    assert response["X-First"] == "yes"
    assert b"".join(response.streaming_content) == b"s0;s1:lime;s2:lime;s3:lime;s4:lime;"


@pytest.mark.django_db
def test_stages_see_the_first_responses_cookies_under_test_client():
    response = Client().get("/t/cookie-first/", HTTP_COOKIE="stale=1")
    body = b"".join(response.streaming_content)
    assert body.startswith(b"first;")
    seen = json.loads(body[len(b"first;") :])
    assert (seen["flavour"], seen["stale"], seen["visits"]) == ("mint", None, 1)


@pytest.mark.parametrize(
    "path, stage", [("/t/to-async-stage/", b"async stage;"), ("/t/to-file-stage/", None)]
)
def test_async_and_file_stages_under_test_client(path, stage):
    from .views import pattern

    body = b"".join(Client().get(path).streaming_content)
    assert body == b"first;" + (stage or pattern(100_000))


def test_demo_root_under_test_client():
    response = Client().get("/")
    assert b"".join(response.streaming_content) == (
        b"First content<br /> stage1<br /> stage2<br /> stage3<br /> last_stage4<br /> "
    )


def test_defer_in_time_outside_a_request():
    from django.http import HttpResponse

    with pytest.raises(RuntimeError, match="while a view handles a request"):
        defer_in_time(HttpResponse("x"), 1, "/stage/")

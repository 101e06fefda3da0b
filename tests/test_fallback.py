"""The deferred views without runcomet: Django's test client gets a blocking stream."""

import pytest
from django.test import Client

from django_comet import defer_in_time


def test_staged_view_under_test_client():
    response = Client().get("/t/quick-stages/?delay=0", HTTP_COOKIE="flavour=lime")
    assert response.status_code == 200
    assert response.streaming
    assert response["X-First"] == "yes"
    assert b"".join(response.streaming_content) == b"s0;s1:lime;s2:lime;s3:lime;s4:lime;"


def test_demo_root_under_test_client():
    response = Client().get("/")
    assert b"".join(response.streaming_content) == (
        b"First content<br /> stage1<br /> stage2<br /> stage3<br /> last_stage4<br /> "
    )


def test_defer_in_time_outside_a_request():
    from django.http import HttpResponse

    with pytest.raises(RuntimeError, match="while a view handles a request"):
        defer_in_time(HttpResponse("x"), 1, "/stage/")

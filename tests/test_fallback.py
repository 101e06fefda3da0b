"""The deferred views without runcomet: Django's test client gets a blocking stream."""

import json
import subprocess
import sys
import threading
import time
from decimal import Decimal

import pytest
import requests
from django.conf import settings
from django.http import HttpResponse
from django.test import Client, modify_settings, override_settings

from django_comet import StageError, defer_in_time, defer_until

from .brokers import PortTaken, free_port, wait_for_port
from .processes import ROOT


def test_staged_view_under_test_client():
    response = Client().get("/t/quick-stages/?delay=0", HTTP_COOKIE="flavour=lime")
    assert response.status_code == 200
    assert response.streaming
    assert response["X-First"] == "yes"
    assert "Content-Length" not in response  # the first part's length, not the stream's
    assert response["X-Accel-Buffering"] == "no"  # a buffering proxy would hold every stage
    assert b"".join(response.streaming_content) == b"s0;s1:lime;s2:lime;s3:lime;s4:lime;"


def test_a_views_own_say_over_proxy_buffering_is_kept():
    response = Client().get("/t/quick-stages/?delay=0&buffered")
    assert response["X-Accel-Buffering"] == "yes"
    assert b"".join(response.streaming_content).startswith(b"s0;")


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


def test_a_stage_that_raises_is_the_cause_of_its_stage_error_under_test_client():
    """Outside DEBUG Django logs a view's exception nowhere a test shows: a test saw
    'answered 500' and nothing of why."""
    response = Client().get("/t/stage-raises/")
    with pytest.raises(StageError, match="answered 500") as caught:
        b"".join(response.streaming_content)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert str(caught.value.__cause__) == "stage boom"


def test_override_settings_middleware_reaches_stages_run_before():
    """The stages' handler (kept from the first stage on) is made again when a test
    overrides MIDDLEWARE: it kept the middleware of whatever test ran a stage first."""
    assert b"".join(Client().get("/t/marked/").streaming_content) == b"first:-;stage:-;"
    marking = [*settings.MIDDLEWARE, "tests.stage_views.marking_middleware"]
    with override_settings(MIDDLEWARE=marking):
        body = b"".join(Client().get("/t/marked/").streaming_content)
    assert body == b"first:marked;stage:marked;"
    assert b"".join(Client().get("/t/marked/").streaming_content) == b"first:-;stage:-;"


def test_defer_until_and_defer_in_time_name_what_is_wrong(rf):
    from django.http import HttpResponse

    from django_comet import defer_until
    from django_comet.deferred import _current

    handling = _current.set(rf.get("/").META)  # as while a view runs
    try:
        with pytest.raises(ValueError, match="timeout must be over 0"):
            defer_until(HttpResponse("x"), "chat", "/stage/", timeout=0)
        for target in ("stage/", "http://testserver/stage/"):
            with pytest.raises(ValueError, match="starts with /"):
                defer_in_time(HttpResponse("x"), 1, target)
    finally:
        _current.reset(handling)


def test_demo_root_under_test_client():
    response = Client().get("/")
    assert b"".join(response.streaming_content) == (
        b"First content<br /> stage1<br /> stage2<br /> stage3<br /> last_stage4<br /> "
    )


def test_defer_in_time_outside_a_request():
    from django.http import HttpResponse

    with pytest.raises(RuntimeError, match="while a view handles a request"):
        defer_in_time(HttpResponse("x"), 1, "/stage/")


@pytest.mark.filterwarnings("ignore:StreamingHttpResponse must consume asynchronous")
@pytest.mark.parametrize("kind", ["template", "async", "file", "lazy", "decimal"])
def test_any_first_response_under_test_client(kind):
    from . import stage_views

    response = Client().get(f"/t/first-kinds/?kind={kind}&delay=0")
    body = b"".join(response.streaming_content)
    assert body.startswith(b"first") or kind == "file"
    assert body.endswith(b"end;")
    if kind == "file":  # what the first response held is let go with the stream
        assert stage_views.first_files[-1].closed


@override_settings(
    ROOT_URLCONF="tests.i18n_urls",
    LANGUAGE_CODE="en",
    LANGUAGES=[("en", "English"), ("fr", "French"), ("de", "German")],
)
@modify_settings(MIDDLEWARE={"append": "django.middleware.locale.LocaleMiddleware"})
def test_a_target_in_another_language_than_the_views_is_found():
    """i18n_patterns(prefix_default_language=False): "/st/" is the default language's
    path, which a stage reaches (LocaleMiddleware takes an unprefixed path for it); a
    view in French resolved it in French, and refused it."""
    response = Client().get("/fr/page/")
    assert b"".join(response.streaming_content) == b"first(fr);stage(en)"
    response = Client().get("/fr/page/?to=/de/st/")  # a third language's
    assert b"".join(response.streaming_content) == b"first(fr);stage(de)"


@pytest.mark.parametrize(
    "seconds",
    [
        "1",
        True,
        float("nan"),
        float("inf"),
        -1,
        pytest.param(10**400, id="an-int-past-floats"),
        pytest.param(10**5000, id="an-int-past-reprs"),
        Decimal("sNaN"),
    ],
)
def test_defer_in_time_refuses_what_is_not_a_delay(rf, seconds):
    from django.http import HttpResponse

    from django_comet.deferred import _current

    handling = _current.set(rf.get("/").META)  # as while a view runs
    try:
        with pytest.raises((TypeError, ValueError), match="seconds"):
            defer_in_time(HttpResponse("x"), seconds, "/stage/")
    finally:
        _current.reset(handling)


def test_head_under_runserver_answers_without_waiting(demo_db):
    """runserver reads a HEAD's whole body before it answers: the blocking streams end
    after their first content for one instead of waiting for stages, events or the
    end of an SSE stream, which no one would read."""
    manage_py = str(ROOT / "demo_site" / "manage.py")
    for attempt in range(5):  # free_port() can race another process for the port
        port = free_port()
        runserver = subprocess.Popen(
            [sys.executable, manage_py, "runserver", "--noreload", f"127.0.0.1:{port}"],
            env={
                "DJANGO_SETTINGS_MODULE": "tests.settings",
                "PYTHONPATH": str(ROOT),
                "DEMO_DB": demo_db,
                "PATH": "/usr/bin:/bin",
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(port, runserver)
            try:  # and it is this runserver that answers
                server = requests.get(f"http://127.0.0.1:{port}/t/echo/", timeout=10)
            except requests.RequestException as exc:
                raise PortTaken(f"another server answers on port {port}") from exc
            if not server.headers.get("Server", "").startswith("WSGIServer/"):
                raise PortTaken(f"another server answers on port {port}")
            break
        except PortTaken:
            runserver.kill()
            runserver.wait(30)
            if attempt == 4:
                raise
    try:
        for path in (
            "/t/quick-stages/?delay=600",
            "/t/poll/?channel=head&timeout=600",
            "/t/fastpoll/?channel=head&timeout=600",
            "/t/stream/?channels=head",
        ):
            answer = requests.head(f"http://127.0.0.1:{port}{path}", timeout=60)
            assert answer.status_code == 200, path
    finally:
        runserver.terminate()
        runserver.wait(30)


def test_the_stages_handler_is_made_once_by_threads_that_race_for_it(monkeypatch):
    """Two view threads running their first stages at once each made a handler, loading
    the project's middleware twice (found by a review)."""
    from django_comet import stages

    made = []
    both_in = threading.Barrier(2)

    class SlowToMake:
        def __init__(self):
            made.append(self)
            time.sleep(0.2)  # (the window the race needs, held open; not a wait)

    monkeypatch.setattr(stages, "WSGIHandler", SlowToMake)
    monkeypatch.setattr(stages, "_handler_instance", None)
    got = []

    def first_stage():
        both_in.wait(10)
        got.append(stages._handler())

    threads = [threading.Thread(target=first_stage) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(made) == 1 and got == [made[0], made[0]]


def test_defer_arguments_that_are_no_such_thing_are_named():
    """``defer_in_time("text", ...)`` was an AttributeError on ``cookies``, and a
    ``since`` of "abc" a bare int() error (True, 2.7 and -1 were taken)."""
    with pytest.raises(TypeError, match=r"defer_in_time\(\): response is the first part"):
        defer_in_time("text", 1, "/t/count/")
    for since in ("abc", "12", True, 2.7, -1):
        with pytest.raises(TypeError, match=r"defer_until\(\): since must be an event id"):
            defer_until(HttpResponse(), "room", "/t/count/", since=since)

"""Django requests through a real runcomet: bodies, methods, errors, status."""

import io
import socket

import pytest
import requests

from .processes import read_body, runcomet


def test_urlencoded_post(comet):
    data = requests.post(comet.url + "/t/echo/?g=1", data={"a": "1", "b": "x y"}).json()
    assert data["method"] == "POST"
    assert data["GET"] == {"g": "1"}
    assert data["POST"] == {"a": "1", "b": "x y"}


def test_multipart_post(comet):
    files = {"upload": ("hello.txt", io.BytesIO(b"file body"), "text/plain")}
    data = requests.post(comet.url + "/t/echo/", data={"field": "v"}, files=files).json()
    assert data["POST"] == {"field": "v"}
    assert data["FILES"] == {"upload": ["hello.txt", 9, "file body"]}


def test_chunked_post_reaches_django(comet):
    def body():
        yield b"a=1&"
        yield b"b=2"

    data = requests.post(
        comet.url + "/t/echo/",
        data=body(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ).json()
    assert data["POST"] == {"a": "1", "b": "2"}
    assert data["content_length"] == "7"


@pytest.mark.parametrize("server_name", ["comet", "comet_inline"])
def test_async_views_run(request, server_name):
    server = request.getfixturevalue(server_name)
    response = requests.get(server.url + "/t/async/", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"async": True, "path": "/t/async/"}


def test_other_methods(comet):
    for method in ("PUT", "PATCH", "DELETE", "OPTIONS"):
        data = requests.request(method, comet.url + "/t/echo/", data=b"xyz").json()
        assert data["method"] == method
        assert data["body_length"] == 3


def test_head_404_500(comet):
    head = requests.head(comet.url + "/t/echo/")
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["Content-Length"]) > 0
    assert requests.get(comet.url + "/no/such/page/").status_code == 404
    assert requests.get(comet.url + "/t/boom/").status_code == 500
    assert requests.get(comet.url + "/t/echo/").status_code == 200  # still serving


def test_cookies_and_remote_addr(comet):
    data = requests.get(comet.url + "/t/echo/", cookies={"k": "v"}).json()
    assert data["cookies"] == {"k": "v"}
    assert data["remote_addr"] == "127.0.0.1"


def test_static_files_served_when_debug(comet):
    response = requests.get(comet.url + "/static/admin/css/base.css")
    assert response.status_code == 200
    assert "text/css" in response.headers["Content-Type"]


def test_static_files_are_left_to_the_project_when_its_runserver_says_so(demo_db):
    """WhiteNoise's runserver_nostatic overrides runserver to serve no static files, so
    that its middleware does (hashed names, ranges): runcomet follows the project's
    runserver (test_static_files_served_when_debug: the same project without it)."""
    server = runcomet(db=demo_db, env={"TEST_NOSTATIC_RUNSERVER": "1"})
    try:
        assert requests.get(server.url + "/static/admin/css/base.css").status_code == 404
        assert requests.get(server.url + "/t/echo/").status_code == 200
    finally:
        server.stop()


def test_a_static_path_leaving_the_static_root_is_a_400(comet):
    """As Django answers a SuspiciousOperation in a view (its static handler let it out:
    a 500)."""
    with comet.connect() as sock:
        sock.sendall(
            b"GET /static/../demo_site/settings.py HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Connection: close\r\n\r\n"
        )
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"Not for production: the secret key is public" not in answer  # the file


def test_admin_login_page(comet):
    response = requests.get(comet.url + "/admin/login/")
    assert response.status_code == 200
    assert "csrfmiddlewaretoken" in response.text


def test_large_streaming_response(comet):
    response = requests.get(comet.url + "/t/big/?mb=8", stream=True)
    total = sum(len(chunk) for chunk in response.iter_content(65536))
    assert total == 8 * 1024 * 1024


def test_status_counts_requests(comet):
    first = comet.status()
    second = comet.status()
    assert second["requests"] > first["requests"]
    assert second["held"] == 0
    assert second["broker_listening"] is True  # the memory broker: always


def test_requests_the_server_refuses_are_counted_apart(comet):
    """Answered with an error before any app saw them: not among the app's requests,
    and counted all the same (the metrics' help said "answered": found by a review)."""
    first = comet.status()
    with comet.connect() as sock:
        sock.sendall(b"GET /t/echo/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400 ")
    second = comet.status()
    assert second["refused"] == first["refused"] + 1
    assert second["requests"] == first["requests"] + 1  # (the first status request)


def test_metrics_carry_every_figure_of_the_status(comet):
    """/comet/metrics is the status's figures in Prometheus' text format: each number of
    the JSON (booleans as 0 or 1) as one sample."""
    import re

    text = requests.get(comet.url + "/comet/metrics", timeout=10).text
    samples = dict(re.findall(r"^(comet_\w+) (\d+)$", text, re.MULTILINE))
    status = comet.status()
    figures = {
        key: value
        for key, value in status.items()
        if isinstance(value, (int, bool)) and key != "workers"
    }
    assert len(figures) >= 12, figures
    from django_comet.views import _METRICS

    names = {key: name for name, _, _, key in _METRICS}
    for key, value in figures.items():
        name = names[key]
        if key not in ("requests", "in_flight", "connections"):  # (the two requests differ)
            assert int(samples[name]) == int(value), (key, samples[name], value)
    assert samples["comet_broker_listening"] == "1"
    slashed = requests.get(comet.url + "/comet/metrics/", timeout=10)
    assert slashed.status_code == 200 and "comet_requests_total" in slashed.text


def test_a_client_gone_before_its_answer_leaves_the_next_answers_intact(comet):
    import socket

    for _ in range(3):
        sock = socket.create_connection((comet.host, comet.port))
        sock.sendall(b"GET /t/sleep/?s=0.2 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sock.close()
    comet.wait_for_status(lambda s: s["in_flight"] == 1)  # only this status request
    for _ in range(3):
        assert requests.get(comet.url + "/t/echo/").json()["method"] == "GET"


def test_a_database_cursor_streamed_to_a_slow_reader_reaches_its_last_row(demo_db):
    """A body reading rows as it goes pauses once it is 1 MiB ahead of its client; the
    requests served meanwhile must not share its thread, since each closes its thread's
    database connection when it ends (it once broke such a body after a few MiB)."""
    server = runcomet("--threads", "1", db=demo_db)
    try:
        with socket.create_connection((server.host, server.port)) as sock:
            sock.sendall(b"GET /t/db-rows/?rows=16384 HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert sock.recv(12) == b"HTTP/1.1 200"
            for _ in range(10):  # the other views, while the body waits for its reader
                assert requests.get(server.url + "/t/echo/", timeout=10).status_code == 200
            body = read_body(sock)
        assert body.splitlines() == [b"%08d%s" % (i, b"." * 1015) for i in range(1, 16385)]
    finally:
        assert server.stop() == 0, "".join(server.output)

"""Held responses under a compressing middleware (Django's GZipMiddleware).

GZipMiddleware compresses the only part of a held response it sees, the first; later
parts are appended as they come.  The server sends held responses unencoded, and other
responses keep the middleware's gzip.
"""

import gzip
import zlib

import pytest
import requests

from django_comet.evloop.content_coding import without_content_coding
from django_comet.evloop.start_response import AppError, StartResponse

from .processes import read_chunked, runcomet
from .publishing import publish
from .sse_client import SSEClient


@pytest.fixture(scope="module")
def gzipped(demo_db):
    server = runcomet(db=demo_db, env={"TEST_GZIP": "1"})
    yield server
    assert server.stop() == 0, "".join(server.output)


def test_a_staged_response_goes_out_unencoded(gzipped):
    with gzipped.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept-Encoding: gzip\r\n\r\n")
        head, chunks = read_chunked(sock)
    assert b"content-encoding" not in head.lower(), head
    assert [c.split(b"<")[0] for c in chunks] == [
        b"First content",
        b"stage1",
        b"stage2",
        b"stage3",
        b"last_stage4",
    ]


def test_an_event_stream_goes_out_unencoded(gzipped):
    with SSEClient(gzipped, "/t/stream/?channels=zipped", b"Accept-Encoding: gzip\r\n") as client:
        assert b"content-encoding" not in client.headers
        gzipped.wait_for_status(lambda s: s["channels"].get("zipped", 0) == 1)
        event_id = publish(gzipped, "zipped", "x")
        assert client.next_event() == {"id": str(event_id), "data": '"x"'}


@pytest.mark.parametrize("path", ["/t/poll/?channel=zpoll&timeout=30", "/chat/poll/?since="])
def test_a_long_poll_answer_goes_out_unencoded(gzipped, path):
    channel = "zpoll" if "zpoll" in path else "chat"
    if path.endswith("since="):  # poll past the newest event
        path += str(publish(gzipped, "chat", {"name": "z", "text": "before"}))
    with gzipped.connect() as sock:
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept-Encoding: gzip\r\n\r\n"
        sock.sendall(request.encode())
        gzipped.wait_for_status(lambda s: s["channels"].get(channel, 0) >= 1)
        publish(gzipped, channel, {"name": "z", "text": "zipped"})
        head, chunks = read_chunked(sock)
    assert b"content-encoding" not in head.lower(), head
    assert "zipped" in b"".join(chunks).decode()


def test_other_responses_keep_the_middlewares_gzip(gzipped):
    response = requests.get(gzipped.url + "/t/big/?mb=1", stream=True, timeout=30)
    assert response.headers["Content-Encoding"] == "gzip"
    assert len(response.content) == 1024 * 1024  # requests decodes it


def started(*headers):
    start = StartResponse()
    start("200 OK", [("Content-Type", "text/plain"), *headers])
    return start


def test_gzip_members_and_deflate_are_decoded_and_the_header_dropped():
    start = started(("Content-Encoding", "gzip"))
    body = gzip.compress(b"one,") + gzip.compress(b"two")  # two members, as allowed
    assert without_content_coding(start, [body[:5], body[5:]]) == [b"one,two"]
    assert [name for name, _ in start.encoded] == [b"Content-Type"]
    for deflated in (zlib.compress(b"abc"), zlib.compress(b"abc")[2:-4]):  # zlib, raw
        assert without_content_coding(started(("Content-Encoding", "deflate")), [deflated]) == [
            b"abc"
        ]
    assert without_content_coding(started(("Content-Encoding", "gzip")), [gzip.compress(b"")]) == []
    plain = started()
    assert without_content_coding(plain, [b"as is"]) == [b"as is"]


def test_a_coding_that_cannot_be_taken_back_is_an_error():
    with pytest.raises(AppError, match="Content-Encoding: br"):
        without_content_coding(started(("Content-Encoding", "br")), [b"\x0b\x01\x80abc\x03"])
    with pytest.raises(AppError, match="not valid gzip"):
        without_content_coding(started(("Content-Encoding", "gzip")), [b"not gzip at all"])

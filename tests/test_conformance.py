"""The peer corpus (../shared/peer) against `python -m django_comet.evloop echo_app:app`."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .processes import ROOT, evloop

# Beside the checkout, or where COMET_PEER_DIR says (a checkout elsewhere).
PEER = Path(os.environ.get("COMET_PEER_DIR") or ROOT.parent / "shared" / "peer")
# Current score (121/123 in both modes); the test fails if it ever falls.
MINIMUM = 121


@pytest.fixture(scope="module")
def echo_server():
    if not (PEER / "conformance.py").exists():
        pytest.skip(f"peer harness not found at {PEER}")
    server = evloop("echo_app:app", "--no-access-log", cwd=PEER)
    yield server
    server.stop()


@pytest.mark.parametrize("mode", [[], ["--django"]], ids=["default", "django"])
def test_peer_conformance_score(echo_server, mode):
    result = subprocess.run(
        [
            sys.executable,
            str(PEER / "conformance.py"),
            "--host",
            "127.0.0.1",
            "--port",
            str(echo_server.port),
            *mode,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(PEER),
    )
    match = re.search(r"conformance: (\d+) passed, (\d+) failed", result.stdout)
    assert match, result.stdout + result.stderr
    passed = int(match.group(1))
    assert passed >= MINIMUM, result.stdout[-3000:]


def test_a_dechunked_body_is_not_announced_as_chunked(echo_server):
    """The app gets the body de-chunked, so no Transfer-Encoding either: Bottle, seeing
    the header, decoded the body again (a 400 for most bodies, and for one that looks
    chunked, another body than the one sent)."""
    import base64
    import json
    import socket

    looks_chunked = b"5\r\nhello\r\n0\r\n\r\n"
    request = (
        b"POST /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % len(looks_chunked)
        + looks_chunked
        + b"\r\n0\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", echo_server.port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while data := sock.recv(65536):
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    echoed = json.loads(body)
    assert base64.b64decode(echoed["body_b64"]) == looks_chunked
    assert echoed["headers"]["CONTENT_LENGTH"] == str(len(looks_chunked))
    assert "HTTP_TRANSFER_ENCODING" not in echoed["headers"]

"""The peer corpus (../shared/peer) against `python -m django_comet.evloop echo_app:app`."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .processes import ROOT, evloop

PEER = ROOT.parent / "shared" / "peer"
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

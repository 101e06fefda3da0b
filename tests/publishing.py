"""What the push tests share: publishing through the test project's /t/publish/ view,
and waiting until a channel has its listeners."""

import json

import requests


def publish(server, channel, data, event=""):
    """One event on ``channel`` (``data`` goes as JSON); returns its id."""
    response = requests.post(
        server.url + "/t/publish/",
        data={"channel": channel, "data": json.dumps(data), "event": event},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()["id"]


def subscribed(server, channel, count=1):
    """Wait until ``count`` clients listen on ``channel`` (the status view's figures)."""
    return server.wait_for_status(lambda s: s["channels"].get(channel, 0) == count)


def ended_as_its_kind_does(kind: str, rest: bytes) -> bool:
    """Whether ``rest``, what a wait returned by a stage added to a body, is the ending
    of that kind of wait: a poll's answer as on its timeout, a stream's ``retry:``, or
    a defer_until's stage run with no event."""
    if kind == "poll":
        return json.loads(rest)["events"] == []
    if kind == "stream":
        return rest.rstrip(b"\n").split(b"\n\n")[-1].startswith(b"retry: ")
    return rest == b'waiting;{"event": null}'

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

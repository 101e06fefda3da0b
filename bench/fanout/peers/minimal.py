"""What both peers share: minimal settings (DEBUG off, no apps, no middleware), the SSE
frame, and the event a long-poll answers."""

from __future__ import annotations

import json

import django
from django.conf import settings


def configure(urlconf: str) -> None:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="bench-only-not-secret",
        ALLOWED_HOSTS=["127.0.0.1"],
        ROOT_URLCONF=urlconf,
        INSTALLED_APPS=[],
        MIDDLEWARE=[],
        DATABASES={},
    )
    django.setup()


def frame(event_id: int, data: str) -> bytes:
    return f"id: {event_id}\ndata: {data}\n\n".encode()


def event(channel: str, event_id: int, data: str) -> dict:
    return {"channel": channel, "id": event_id, "data": json.loads(data)}

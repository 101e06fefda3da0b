"""django-comet: server push for synchronous Django, served by a libevent event loop.

Add ``django_comet`` to INSTALLED_APPS and run ``python manage.py runcomet``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "EventStreamResponse",
    "StageError",
    "defer_in_time",
    "defer_until",
    "deferred_view",
    "event_stream",
    "history",
    "may_listen",
    "poll_response",
    "publish",
]
_HOMES = {
    "StageError": "deferred",
    "defer_in_time": "deferred",
    "defer_until": "deferred",
    "deferred_view": "deferred",
    "EventStreamResponse": "sse",
    "event_stream": "sse",
    "history": "events",
    "may_listen": "events",
    "poll_response": "longpoll",
    "publish": "events",
}
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so that `python -m django_comet.evloop` (no Django settings) imports nothing
    # of Django's.
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'django_comet' has no attribute {name!r}")

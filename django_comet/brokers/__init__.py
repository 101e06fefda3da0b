"""Brokers carry published events to every process's hub and give them their ids.

``COMET_BROKER`` is a URL: ``memory://`` (the default: one process), ``postgres://...``
(LISTEN/NOTIFY; ``postgres://`` alone uses Django's default database) or
``redis://host:port/db`` (pub/sub).
"""

from __future__ import annotations

import re
import threading
from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

from ..evloop.hub import hub
from .base import Broker
from .memory import MemoryBroker

__all__ = ["Broker", "MemoryBroker", "get_broker"]

_lock = threading.Lock()
_broker: Broker | None = None


SCHEMES = ("memory", "postgres", "postgresql", "redis", "rediss", "unix")


def url_error(url: str) -> str | None:
    """What is wrong with a COMET_BROKER URL that can be told without connecting (the URL
    itself is not repeated: it may hold a password)."""
    try:
        scheme = urlsplit(url).scheme
    except ValueError as exc:  # an unclosed IPv6 bracket: the URL cannot even be split
        return f"COMET_BROKER is not a valid URL ({exc})"
    if scheme not in SCHEMES:
        return (
            f"COMET_BROKER has an unknown scheme {scheme!r}: use memory://, postgres:// or redis://"
        )
    missing = _missing_driver(scheme)
    if missing is not None:
        return missing
    if url.rstrip("/") in ("postgres:", "postgresql:"):
        from django.db import connections

        vendor = connections["default"].vendor
        if vendor != "postgresql":
            return (
                f"COMET_BROKER = 'postgres://' uses the default database, which is {vendor}, "
                f"not PostgreSQL: give the broker its own postgres://user:password@host/db"
            )
    elif scheme in ("postgres", "postgresql"):
        return _postgres_url_error(url)
    elif scheme != "memory":
        return _redis_url_error(url)
    return None


def _missing_driver(scheme: str) -> str | None:
    """What to install for a broker whose client library is not there (an extra)."""
    try:
        if scheme in ("postgres", "postgresql"):
            from .postgres import _psycopg

            _psycopg()
        elif scheme != "memory":
            from .redis import _redis

            _redis()
    except ImportError as exc:
        return str(exc)
    return None


def _postgres_url_error(url: str) -> str | None:
    """What libpq would refuse in a postgres:// URL, before a server starts on it (its
    listener would otherwise retry it for ever, and every publish fail)."""
    try:
        from psycopg.conninfo import conninfo_to_dict
        from psycopg.errors import ProgrammingError
    except ImportError:
        return None  # (_missing_driver says so)
    try:
        given = conninfo_to_dict(url)
    except ProgrammingError as exc:
        message = _masked(str(exc).strip(), url)
        return f"COMET_BROKER is not a PostgreSQL URL libpq can read ({message})"
    for port in str(given.get("port") or "").split(","):  # libpq takes one per host
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            return f"COMET_BROKER has an invalid port number {port!r}"
    return None


def _redis_url_error(url: str) -> str | None:
    """What redis-py would refuse in a redis://, rediss:// or unix:// URL (at the first
    publish, with a traceback), or misread (a database that is not a number is 0)."""
    from redis.connection import parse_url

    try:
        parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        return f"COMET_BROKER is not a Redis URL redis-py can read ({_masked(str(exc), url)})"
    split = urlsplit(url)
    database = split.path.strip("/") if split.scheme != "unix" else ""
    if database and not database.isdigit():
        return (
            f"COMET_BROKER's Redis database must be a number (redis://host:port/0), "
            f"not {database!r}"
        )
    return None


def _masked(message: str, url: str) -> str:
    """``message`` without ``url``'s password where it quotes it (not inside words: a
    password "p" made "***arameter" of "parameter")."""
    password = urlsplit(url).password
    if not password:
        return message
    return re.sub(rf"(?<![A-Za-z0-9]){re.escape(password)}(?![A-Za-z0-9])", "***", message)


def broker_from_url(url: str, history_size: int = 100) -> Broker:
    error = url_error(url)
    if error is not None:
        raise ImproperlyConfigured(error)
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        return MemoryBroker()
    if scheme in ("postgres", "postgresql"):
        from .postgres import PostgresBroker, conninfo_from_url

        return PostgresBroker(conninfo_from_url(url), history_size)
    from .redis import RedisBroker  # redis, rediss, unix

    return RedisBroker(url, history_size)


def get_broker() -> Broker:
    """The process's broker, made from COMET_BROKER on first use."""
    global _broker
    with _lock:
        if _broker is None:
            from ..conf import comet_settings

            _broker = broker_from_url(comet_settings.BROKER, comet_settings.HISTORY_SIZE)
        return _broker


def size_the_history() -> None:
    """The hub's history, as COMET_HISTORY_SIZE and COMET_HISTORY_CHANNELS say."""
    from ..conf import comet_settings

    hub.size = comet_settings.HISTORY_SIZE
    hub.channels = max(comet_settings.HISTORY_CHANNELS, 1)


def _reset(*, setting: str, **kwargs: Any) -> None:
    """A test's override_settings(COMET_BROKER=...): a new broker, and, in a process
    that serves nothing (the test client's), an empty history: events of one test must
    not reach another's polls and streams.  The history's settings too (a broker is
    made with its size)."""
    global _broker
    if setting in ("COMET_HISTORY_SIZE", "COMET_HISTORY_CHANNELS"):
        size_the_history()
    if setting in ("COMET_BROKER", "COMET_HISTORY_SIZE"):
        with _lock:
            if _broker is not None:
                _broker.close()
            _broker = None
            if not hub.serving:
                hub.forget()


setting_changed.connect(_reset, dispatch_uid="django_comet.brokers")

"""``manage.py comet_publish CHANNEL JSON [--event NAME]``: publish from a shell or cron.

With a shared broker (PostgreSQL, Redis) the event reaches every runcomet process.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from ...brokers import get_broker
from ...brokers.memory import MemoryBroker
from ...conf import comet_settings
from ...events import publish


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class Command(BaseCommand):
    help = "Publish an event (JSON data) on a channel through COMET_BROKER."
    # Publishing needs the broker's setting only, which handle() checks in one line;
    # the project's other checks (models, URLs) are not this command's business.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("channel")
        parser.add_argument("data", help='JSON text, e.g. \'{"text": "hi"}\'')
        parser.add_argument("--event", default=None, help="SSE event name")

    def handle(self, *args: Any, **options: Any) -> None:
        errors = comet_settings.errors()  # (publish() reads more than the broker's)
        if errors:
            raise CommandError(f"A COMET_* setting is invalid: {'; '.join(errors)}")
        try:
            broker = get_broker()
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from None
        if isinstance(broker, MemoryBroker):
            raise CommandError(
                "COMET_BROKER is memory://: an event published here would live and die in "
                "this command's process. Set COMET_BROKER to postgres://... or redis://..."
            )
        try:
            data = json.loads(options["data"], parse_constant=_not_json)
        except (ValueError, RecursionError) as exc:  # a nesting too deep to parse, too
            raise CommandError(f"data is not JSON: {exc}") from None
        try:
            event_id = publish(options["channel"], data, event=options["event"])
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        except _broker_errors() as exc:  # the broker is down, refuses us, ...
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise CommandError(
                f"Cannot publish through the broker at {_where(comet_settings.BROKER)}: {reason}"
            ) from None
        self.stdout.write(str(event_id))


def _broker_errors() -> tuple[type[Exception], ...]:
    """What a broker's client library raises when the broker cannot take an event."""
    errors: list[type[Exception]] = [OSError]
    with contextlib.suppress(ImportError):
        import psycopg

        errors.append(psycopg.Error)
    with contextlib.suppress(ImportError):
        import redis

        errors.append(redis.RedisError)
    return tuple(errors)


def _where(url: str) -> str:
    """COMET_BROKER without what may hold a password (user info, query)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))

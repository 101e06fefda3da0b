"""System checks: libevent loadable (E001), COMET_* settings well typed (E002)."""

from __future__ import annotations

from typing import Any

from django.core.checks import CheckMessage, Error


def check_libevent(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    from .evloop import libevent_ctypes

    try:
        libevent_ctypes.load()
    except libevent_ctypes.LibeventMissing as exc:
        return [
            Error(
                "libevent 2.1 cannot be loaded, so runcomet cannot start.",
                hint=str(exc),
                id="django_comet.E001",
            )
        ]
    return []


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    from .conf import comet_settings

    return [
        Error(
            message, hint="See the settings table in django-comet's README.", id="django_comet.E002"
        )
        for message in comet_settings.errors()
    ]

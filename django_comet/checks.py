"""System checks: libevent loadable (E001), COMET_* settings well typed (E002) and known
(W002), and with ``check --deploy``, channels open to anyone (W001)."""

from __future__ import annotations

from typing import Any

from django.core.checks import CheckMessage, Error, Warning


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


def check_unknown_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """A COMET_* setting close to one of django-comet's: a typo, which would leave the
    default in force without a word.  Names close to none are left alone: other
    libraries use the prefix too (Comet ML's COMET_API_KEY)."""
    from django.conf import settings

    from .conf import known_settings

    known = {name.removeprefix("COMET_"): name for name in known_settings()}
    warnings: list[CheckMessage] = []
    for name in sorted(dir(settings)):
        if not name.startswith("COMET_") or name.removeprefix("COMET_") in known:
            continue
        if name == "COMET_LIBEVENT":
            hint = "COMET_LIBEVENT is read from the environment, not from the settings."
        else:
            close = _close_to(name.removeprefix("COMET_"), list(known))
            if close is None:
                continue
            hint = f"Did you mean {known[close]}?"
        warnings.append(
            Warning(f"{name} is not a django-comet setting.", hint=hint, id="django_comet.W002")
        )
    return warnings


def _close_to(name: str, known: list[str]) -> str | None:
    """The one of ``known`` that ``name`` looks like a slip for: spelt nearly the same
    (AUTHORISE, HISTORY_SIZ), or one with words added or left out (HISTORY, BROKER_URL);
    None for names of other libraries that share the prefix (Comet ML's API_KEY)."""
    import difflib

    close = difflib.get_close_matches(name, known, 1, 0.7)
    if close:
        return close[0]
    return next((k for k in known if k.startswith(name + "_") or name.startswith(k + "_")), None)


def check_authorize_deploy(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """``check --deploy``: without COMET_AUTHORIZE every stream and poll is granted, so
    anyone who guesses a channel's name hears its events (fine for a public feed)."""
    from django.conf import settings

    if getattr(settings, "COMET_AUTHORIZE", None) is not None:
        return []
    return [
        Warning(
            "COMET_AUTHORIZE is not set: every channel is open to anyone who names it.",
            hint="Set COMET_AUTHORIZE to a callable (request, channel) -> bool, or silence "
            "django_comet.W001 if all your channels are public.",
            id="django_comet.W001",
        )
    ]

"""COMET_* settings, read lazily so that ``override_settings`` just works."""

from __future__ import annotations

import inspect
from typing import Any

from django.conf import settings
from django.utils.module_loading import import_string

from .evloop.config import MAX_BYTES, MAX_THREADS, MIN_PERIOD, ServerConfig
from .evloop.deferral import MAX_SECONDS
from .evloop.proxies import TrustedProxies, proxy_entry_error

_DEFAULTS: dict[str, Any] = {
    # Worker threads for views; None means ServerConfig's measured default.
    "COMET_THREADS": None,
    "COMET_TIMEOUT": ServerConfig.timeout,
    "COMET_MAX_HEADER_SIZE": ServerConfig.max_header_size,
    "COMET_MAX_BODY_SIZE": ServerConfig.max_body_size,
    "COMET_GRACE_PERIOD": ServerConfig.grace,
    # Who may see /comet/status/ and /comet/metrics: staff, or anyone when DEBUG; True
    # opens them to all.
    "COMET_STATUS_PUBLIC": False,
    # Where events travel between processes: memory:// keeps them in this process.
    "COMET_BROKER": "memory://",
    # Events kept per channel for Last-Event-ID replay and long-poll cursors.
    "COMET_HISTORY_SIZE": 100,
    # Channels whose history a process keeps (the least recently published let go).
    "COMET_HISTORY_CHANNELS": 10_000,
    # Bytes of an event's JSON at most: each is kept in every history (and as a frame).
    "COMET_MAX_EVENT_SIZE": 1024 * 1024,
    # Channels one stream or wait may name: each is a subscription held, and a replay
    # reads each one's history.
    "COMET_MAX_CHANNELS": 32,
    # Seconds between SSE heartbeat comments (proxies close idle streams otherwise).
    "COMET_SSE_HEARTBEAT": ServerConfig.heartbeat,
    # Unsent bytes a held response may pile up: beyond it a stream falls behind (and
    # catches up from the history), a chain of stages waits for its reader.
    "COMET_MAX_PENDING_OUTPUT": ServerConfig.max_pending_output,
    # None, or a callable (or its dotted path) (request, channel) -> bool.
    "COMET_AUTHORIZE": None,
    # Seconds a response may stay held (an SSE stream, a chain of stages); 0: no limit.
    "COMET_MAX_HOLD": ServerConfig.max_hold,
    # Addresses of reverse proxies whose X-Forwarded-For / -Proto are believed.
    "COMET_TRUSTED_PROXIES": [],
    # Limits of request heads: target (414), header bytes and header count (431).
    "COMET_MAX_REQUEST_LINE": ServerConfig.max_request_line,
    "COMET_MAX_HEADER_COUNT": ServerConfig.max_header_count,
    # Seconds a new connection has to send its first request head (0: no deadline).
    "COMET_HEADER_TIMEOUT": ServerConfig.header_timeout,
    # Open connections beyond which accepting pauses (0: only the fd limit).
    "COMET_MAX_CONNECTIONS": ServerConfig.max_connections,
}

_TYPES: dict[str, tuple[type, ...]] = {
    "COMET_THREADS": (int, type(None)),
    "COMET_TIMEOUT": (int, float),
    "COMET_MAX_HEADER_SIZE": (int,),
    "COMET_MAX_BODY_SIZE": (int,),
    "COMET_GRACE_PERIOD": (int, float),
    "COMET_STATUS_PUBLIC": (bool,),
    "COMET_BROKER": (str,),
    "COMET_HISTORY_SIZE": (int,),
    "COMET_HISTORY_CHANNELS": (int,),
    "COMET_MAX_EVENT_SIZE": (int,),
    "COMET_MAX_CHANNELS": (int,),
    "COMET_SSE_HEARTBEAT": (int, float),
    "COMET_MAX_PENDING_OUTPUT": (int,),
    "COMET_MAX_HOLD": (int, float),
    "COMET_TRUSTED_PROXIES": (list, tuple),
    "COMET_MAX_REQUEST_LINE": (int,),
    "COMET_MAX_HEADER_COUNT": (int,),
    "COMET_HEADER_TIMEOUT": (int, float),
    "COMET_MAX_CONNECTIONS": (int,),
}


_SECONDS = frozenset(
    {
        "COMET_TIMEOUT",
        "COMET_GRACE_PERIOD",
        "COMET_SSE_HEARTBEAT",
        "COMET_MAX_HOLD",
        "COMET_HEADER_TIMEOUT",
    }
)


# Limits where 0 would leave nothing through (every request refused, no history kept).
_AT_LEAST_ONE = frozenset(
    {
        "COMET_MAX_HEADER_SIZE",
        "COMET_MAX_REQUEST_LINE",
        "COMET_MAX_HEADER_COUNT",
        "COMET_HISTORY_CHANNELS",
        "COMET_MAX_EVENT_SIZE",
        "COMET_MAX_CHANNELS",
        "COMET_MAX_PENDING_OUTPUT",
        "COMET_MAX_BODY_SIZE",  # (every POST refused: no form would work)
    }
)


# Byte limits handed to libevent, which cannot take more than MAX_BYTES.
_BYTES = frozenset(
    {
        "COMET_MAX_HEADER_SIZE",
        "COMET_MAX_REQUEST_LINE",
        "COMET_MAX_BODY_SIZE",
        "COMET_MAX_PENDING_OUTPUT",
    }
)

# Periods where a tiny value breaks serving (MIN_PERIOD); 0 turns off all but the first.
_PERIODS = frozenset(
    {"COMET_TIMEOUT", "COMET_SSE_HEARTBEAT", "COMET_HEADER_TIMEOUT", "COMET_MAX_HOLD"}
)


def known_settings() -> list[str]:
    return list(_DEFAULTS)


class Settings:
    """``comet_settings.THREADS`` reads ``settings.COMET_THREADS`` or its default."""

    def __getattr__(self, name: str) -> Any:
        key = "COMET_" + name
        if key not in _DEFAULTS:
            raise AttributeError(name)
        return getattr(settings, key, _DEFAULTS[key])

    def errors(self) -> list[str]:
        """Settings whose value has the wrong type, for the system check."""
        bad = []
        for key, types in _TYPES.items():
            value = getattr(settings, key, _DEFAULTS[key])
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                names = " or ".join("None" if t is type(None) else t.__name__ for t in types)
                bad.append(f"{key} must be {names}, not {value!r}")
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                bad.append(f"{key} cannot be negative ({value!r})")
            elif key in _AT_LEAST_ONE and isinstance(value, int) and value < 1:
                bad.append(f"{key} must be at least 1 ({value!r} would refuse everything)")
            elif key in _BYTES and isinstance(value, int) and value > MAX_BYTES:
                bad.append(f"{key} must be at most {MAX_BYTES} (1 TiB), not {value!r}")
            elif key == "COMET_THREADS" and isinstance(value, int) and value > MAX_THREADS:
                bad.append(f"{key} must be at most {MAX_THREADS}, not {value!r}")
            elif (
                key in _PERIODS and isinstance(value, (int, float)) and 0 < value < MIN_PERIOD
            ) or (key == "COMET_TIMEOUT" and value == 0):
                bad.append(
                    f"{key} must be at least {MIN_PERIOD:g} seconds"
                    + ("" if key == "COMET_TIMEOUT" else " (or 0: none)")
                    + f", not {value!r}"
                )
            elif (
                key in _SECONDS and isinstance(value, (int, float)) and not value <= MAX_SECONDS
            ):  # NaN
                bad.append(
                    f"{key} must be at most {MAX_SECONDS:g} seconds, not {value!r}"
                )  # or NaN
        proxies = getattr(settings, "COMET_TRUSTED_PROXIES", [])
        if isinstance(proxies, (list, tuple)):
            bad.extend(
                f"COMET_TRUSTED_PROXIES holds {p!r}, {error}"
                for p in proxies
                if (error := proxy_entry_error(p))
            )
        bad.extend(_authorize_errors(getattr(settings, "COMET_AUTHORIZE", None)))
        broker = getattr(settings, "COMET_BROKER", _DEFAULTS["COMET_BROKER"])
        if isinstance(broker, str):  # (a wrong type is reported above)
            from .brokers import url_error

            error = url_error(broker)
            bad.extend([error] if error else [])
        return bad

    def server_config(self, **overrides: Any) -> ServerConfig:
        config = ServerConfig(
            timeout=float(self.TIMEOUT),
            max_header_size=self.MAX_HEADER_SIZE,
            max_body_size=self.MAX_BODY_SIZE,
            grace=float(self.GRACE_PERIOD),
            heartbeat=float(self.SSE_HEARTBEAT),
            max_pending_output=self.MAX_PENDING_OUTPUT,
            max_hold=float(self.MAX_HOLD),
            trusted_proxies=TrustedProxies(self.TRUSTED_PROXIES),
            max_request_line=self.MAX_REQUEST_LINE,
            max_header_count=self.MAX_HEADER_COUNT,
            header_timeout=float(self.HEADER_TIMEOUT),
            max_connections=self.MAX_CONNECTIONS,
            on_thread_exit=_close_database_connections,
        )
        if self.THREADS is not None:
            config.threads = self.THREADS
        for name, value in overrides.items():
            if value is not None:
                setattr(config, name, value)
        return config


def _close_database_connections() -> None:
    """A view thread leaving the pool: its connections (Django keeps one per thread and
    database) would stay open, with ``CONN_MAX_AGE``, until a collection found them."""
    from django.db import connections

    connections.close_all()


def _authorize_errors(authorize: Any) -> list[str]:
    """COMET_AUTHORIZE must name a plain callable: an async one would answer with a
    coroutine, which is no yes or no (and is refused at run time too)."""
    if authorize is None:
        return []
    if isinstance(authorize, str):
        try:
            authorize = import_string(authorize)
        except ImportError as exc:
            return [f"COMET_AUTHORIZE cannot be imported: {exc}"]
    if not callable(authorize):
        return [f"COMET_AUTHORIZE must be a callable or a dotted path, not {authorize!r}"]
    if inspect.iscoroutinefunction(authorize):
        return [f"COMET_AUTHORIZE must be a plain function, not an async one: {authorize!r}"]
    return []


comet_settings = Settings()

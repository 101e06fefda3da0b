"""A stage of a held response, run as a Django request of its own.

What the next stage needs of the first request (its headers, the cookies the client
would send to the stage's path), the request it is made (a GET through Django's own
WSGI handler, with ``response_prev`` and, for ``defer_until``, the event), and what
becomes of its answer: its content is the next part; a non-2xx answer is a
``StageError`` (its exception, if it raised, the cause); its cookies are never sent.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
import time
from contextvars import ContextVar
from http.cookies import Morsel, SimpleCookie
from typing import Any
from urllib.parse import unquote_to_bytes

from django.core.handlers.wsgi import WSGIHandler, get_script_name
from django.core.signals import got_request_exception, request_started, setting_changed
from django.http import parse_cookie
from django.http.response import HttpResponseBase
from django.urls import set_script_prefix
from django.utils.http import parse_http_date_safe

from .evloop.deferral import ANNOUNCED

logger = logging.getLogger("django_comet.deferred")

RESPONSE_PREV_KEY = "django_comet.response_prev"
EVENT_KEY = "django_comet.event"
# What a stage's request gets from the stage before it, never from further back.
# (Nor a deferral its response announced: the server's, evloop/deferral.py.)
_STAGE_KEYS = frozenset({RESPONSE_PREV_KEY, EVENT_KEY, "wsgi.input", ANNOUNCED})


class StageError(RuntimeError):
    """A deferred stage did not answer 2xx; the stream is cut rather than ended cleanly.
    When the stage raised, that exception is its ``__cause__`` (Django's handler made
    it a 500, and outside DEBUG logs it nowhere a test would show)."""


# The exception Django's handler caught in the stage running in this context, if any.
_stage_exception: ContextVar[BaseException | None] = ContextVar(
    "django_comet_stage_exception", default=None
)


def _note_stage_exception(sender: Any, **kwargs: Any) -> None:
    if _stage_exception.get() is not None:  # a stage runs here: keep what it raised
        _stage_exception.set(sys.exc_info()[1])


got_request_exception.connect(_note_stage_exception, dispatch_uid="django_comet.deferred")


class NextStage:
    """A deferral's resume(): the next stage as a Django GET request, run on a view
    thread (the loop thread with ``--threads 0``: it must not block).  It holds what
    that request needs and nothing of the response that is being sent (no reference
    back to it: a held response must not sit in a reference cycle, which outlives it
    into the oldest GC generation, whose full collections stop the loop for every held
    response at once)."""

    __slots__ = ("_environ", "cookies", "path", "response_prev")

    def __init__(self, response_prev: HttpResponseBase, path: str, environ: dict[str, Any]):
        self.response_prev = response_prev
        self.path = path
        # Not kept for the next stage: the first request's body (a stage is a GET), and,
        # deferred from a stage, its response_prev and event (a view without an event
        # parameter must not get one; the response from two stages back need not be
        # kept); nor the headers a stage must not see (_NOT_STAGE_HEADERS).  Kept flat,
        # keys and values in turn: a tuple takes half a dict's memory (about 0.4 KiB less
        # per held staged response).
        self._environ = tuple(
            x for item in environ.items() if item[0] not in _NOT_KEPT for x in item
        )
        # The cookies of the response the client gets (the first one: a stage's own
        # are never sent), as the middleware will have left them once it is sent: the
        # stages see them as the client's next request would (a new session, a login,
        # a CSRF cookie).  Later stages inherit them with the environ.
        first = RESPONSE_PREV_KEY not in environ
        self.cookies: SimpleCookie | None = response_prev.cookies if first else None

    @property
    def environ(self) -> dict[str, Any]:
        """What the next stage's request starts from (of the first request's environ), a
        new dict each time."""
        flat = self._environ
        return dict(zip(flat[::2], flat[1::2], strict=True))

    def __call__(self, *event: Any) -> HttpResponseBase:
        """A channel wait passes the event that ended it (or None)."""
        environ = stage_environ(self.environ, self.path)
        if self.cookies:
            environ["HTTP_COOKIE"] = _with_cookies(
                environ.get("HTTP_COOKIE", ""),
                self.cookies,
                environ.get("SCRIPT_NAME", "") + environ["PATH_INFO"],
            )
        environ[RESPONSE_PREV_KEY] = self.response_prev
        if event:
            from .events import as_dict

            environ[EVENT_KEY] = as_dict(event[0]) if event[0] is not None else None
        noted = _stage_exception.set(_NOTHING_RAISED)
        try:
            response = _get_response(environ)
            raised = _stage_exception.get()
        finally:
            _stage_exception.reset(noted)
        if not 200 <= response.status_code < 300:
            response.close()
            raise StageError(
                f"deferred stage {self.path} answered {response.status_code}; cutting the stream"
            ) from (None if raised is _NOTHING_RAISED else raised)
        if response.has_header("Content-Encoding"):
            response.close()
            raise StageError(
                f"deferred stage {self.path} answered with Content-Encoding: "
                f"{response['Content-Encoding']}; a stage adds to a body already started "
                f"and cannot encode its part on its own"
            )
        if response.cookies:
            _tell_stage_cookies(self.path, response, environ.get("HTTP_COOKIE", ""))
        return response


_NOTHING_RAISED = StageError("(no exception)")  # the context variable's "a stage runs here"
_told_stage_cookies: set[str] = set()  # stage paths (the first hundred)


def _tell_stage_cookies(path: str, response: HttpResponseBase, sent: str) -> None:
    """A stage's cookies never reach the client (only the first response's headers are
    sent): said once per stage path, since what depends on them fails later, far from
    here (a session saved under a key no one holds, a CSRF token the form's POST is
    refused for, messages shown again whose cookie the stage deleted).  Not for a
    cookie set again to the value the stage's request has (Django renews a CSRF
    cookie, and a session's with SESSION_SAVE_EVERY_REQUEST): the client has it."""
    path = path.partition("?")[0]
    if path in _told_stage_cookies or len(_told_stage_cookies) >= 100:
        return
    has = parse_cookie(sent)
    changed = [
        name
        for name, morsel in response.cookies.items()
        if (name in has if _deleted(morsel) else has.get(name) != morsel.value)
    ]
    if changed:
        _told_stage_cookies.add(path)
        logger.warning(
            "Deferred stage %s set cookies (%s) that are never sent: only the first "
            "response's headers go out. Set them in the first view (for a session, "
            "modify it there; for a CSRF token, call get_token() there). Said once.",
            path,
            ", ".join(sorted(changed)),
        )


# A stage is a GET without a body, and its content joins a body already started, so a
# compressing middleware must not encode it on its own (the server sends held responses
# unencoded): it is not told that the client accepts gzip; nor that it has a version
# (a 304, a range: a part of a body is not a whole one).  Its content is iterated by
# the stage before, so a file is not handed to the server (wsgi.file_wrapper).  What
# Django's CSRF middleware noted in the first request's META is found again from the
# cookie.
_NOT_STAGE_HEADERS = frozenset(
    {
        "CONTENT_TYPE",
        "HTTP_TRANSFER_ENCODING",
        "HTTP_ACCEPT_ENCODING",
        "HTTP_IF_NONE_MATCH",
        "HTTP_IF_MODIFIED_SINCE",
        "HTTP_IF_MATCH",
        "HTTP_IF_UNMODIFIED_SINCE",
        "HTTP_RANGE",
        "HTTP_IF_RANGE",
        "wsgi.file_wrapper",
        "CSRF_COOKIE",
        "CSRF_COOKIE_NEEDS_UPDATE",
    }
)
_NOT_KEPT = _STAGE_KEYS | _NOT_STAGE_HEADERS  # what a held stage does not keep


def _with_cookies(header: str, cookies: SimpleCookie, path: str) -> str:
    """The Cookie header a client sends to ``path`` after receiving ``cookies``: those
    set for that path added or replaced, those deleted (max-age of 0 or less, or an
    expiry past) gone; the others as the client sent them, byte for byte."""
    # "name=value" as received, each (a name twice, for two paths, stays twice)
    received = [part.strip() for part in header.split(";") if part.strip()]
    names = [part.partition("=")[0].strip() if "=" in part else None for part in received]
    parts: list[str | None] = list(received)
    for name, morsel in cookies.items():
        cookie_path = morsel["path"] or "/"
        if not (
            path == cookie_path
            or path.startswith(cookie_path if cookie_path.endswith("/") else cookie_path + "/")
        ):
            continue  # a browser would not send it there
        new = None if _deleted(morsel) else f"{name}={morsel.coded_value}"
        places = [i for i, seen in enumerate(names) if seen == name]
        if places:  # replaced where it was (once: its other paths' copies are unknown)
            parts[places[0]] = new
            for i in places[1:]:
                parts[i] = None
        elif new is not None:
            parts.append(new)
    return "; ".join(part for part in parts if part is not None)


def _deleted(morsel: Morsel[str]) -> bool:
    max_age = str(morsel["max-age"]).strip()
    if max_age:
        try:
            return int(max_age) <= 0
        except ValueError:
            return False
    expires = morsel["expires"]
    if isinstance(expires, str) and expires:
        when = parse_http_date_safe(expires)
        return when is not None and when <= time.time()
    return False


def stage_environ(stage: dict[str, Any], path: str) -> dict[str, Any]:
    """``stage`` (what a stage keeps of the first request's environ: its headers), made
    the environ of a GET for ``path``, in place."""
    script_name = stage.get("SCRIPT_NAME", "")
    raw_path, _, query = path.partition("?")
    path_info = unquote_to_bytes(raw_path).decode("latin-1")
    if script_name and path_info.startswith(script_name + "/"):
        path_info = path_info[len(script_name) :]
    stage.update(
        {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": path_info,
            "QUERY_STRING": query,
            "RAW_URI": path,
            "REQUEST_URI": path,
            "CONTENT_LENGTH": "0",
            "wsgi.input": io.BytesIO(b""),
        }
    )
    return stage


_handler_instance: WSGIHandler | None = None
_handler_lock = threading.Lock()


def _handler() -> WSGIHandler:
    """The stages' own handler, made once: two view threads running their first stages
    at once loaded the middleware twice."""
    global _handler_instance
    handler = _handler_instance
    if handler is None:
        with _handler_lock:
            if _handler_instance is None:
                _handler_instance = WSGIHandler()
            handler = _handler_instance
    return handler


def _forget_handler(sender: Any, setting: str, **kwargs: Any) -> None:
    """A test's override_settings(MIDDLEWARE=...) reaches the stages too."""
    global _handler_instance
    if setting == "MIDDLEWARE":
        _handler_instance = None


setting_changed.connect(_forget_handler, dispatch_uid="django_comet.deferred")


def _get_response(environ: dict[str, Any]) -> HttpResponseBase:
    """What ``WSGIHandler.__call__`` does, up to the response object: a stage's is read
    here, never sent.  Not through ``__call__`` itself, which an APM may have replaced
    on the class with a WSGI middleware of its own (sentry-sdk's Django integration
    does: it returned an iterable of its own, with no ``status_code``)."""
    handler = _handler()
    set_script_prefix(get_script_name(environ))
    request_started.send(sender=handler.__class__, environ=environ)
    response: HttpResponseBase = handler.get_response(handler.request_class(environ))
    response._handler_class = handler.__class__  # type: ignore[attr-defined]
    return response

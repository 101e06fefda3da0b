"""The 2007 staged-response API: ``defer_in_time`` and ``@deferred_view()``.

A view returns ``defer_in_time(response, seconds, target)``.  Under runcomet the
response's status, headers and content go out at once as the first chunk; ``seconds``
later the server runs ``target`` as a full Django GET request (URL resolution, middleware,
the first request's headers and cookies) and its view, decorated with
``@deferred_view()``, receives the previous stage's response as ``response_prev``.  Its
content is the next chunk; a stage that returns a plain response ends the stream.

Under any other WSGI server (runserver, gunicorn, Django's test client) the same views
still work: iterating the response sleeps and runs the stages itself, a blocking stream.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import numbers
import reprlib
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from decimal import Decimal
from typing import Any
from urllib.parse import unquote

from asgiref.sync import iscoroutinefunction
from django.conf import settings
from django.core.signals import (
    request_finished,
    request_started,
)
from django.db import connections
from django.http import HttpRequest, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.urls import (
    NoReverseMatch,
    Resolver404,
    URLPattern,
    URLResolver,
    get_resolver,
    resolve,
    reverse,
)
from django.utils import translation
from django.utils.cache import add_never_cache_headers
from django.utils.functional import Promise

from .evloop.deferral import (
    MAX_SECONDS,
    ChannelWait,
    Deferral,
    announce,
    begin,
    blocking_through,
    withdraw,
)
from .evloop.hub import hub
from .stages import EVENT_KEY, RESPONSE_PREV_KEY, NextStage, StageError

__all__ = ["StageError", "defer_in_time", "defer_until", "deferred_view"]

logger = logging.getLogger("django_comet.deferred")

# The environ of the request being handled, so that defer_in_time(), which is not given
# the request, can build the next stage from the first request's headers.  A context
# variable, not a thread-local: an async view runs in another thread (async_to_sync),
# which gets a copy of the context but not the handler thread's locals.
_current: ContextVar[dict[str, Any] | None] = ContextVar("django_comet_environ", default=None)


def _remember_environ(sender: Any, environ: dict[str, Any] | None = None, **kwargs: Any) -> None:
    _current.set(environ)


def _forget_environ(sender: Any, **kwargs: Any) -> None:
    _current.set(None)


request_started.connect(_remember_environ, dispatch_uid="django_comet.deferred")
request_finished.connect(_forget_environ, dispatch_uid="django_comet.deferred")


def _request_environ(caller: str) -> dict[str, Any]:
    environ = _current.get()
    if environ is None:
        raise RuntimeError(
            f"{caller}() can only be used while a view handles a request through WSGI "
            f"(runcomet, or any WSGI server or Django's test client)"
        )
    return environ  # type: ignore[no-any-return]


def request_environ() -> dict[str, Any] | None:
    """The environ of the request being handled, if any: where a held response
    announces its deferral (evloop/deferral.py) as its content starts."""
    return _current.get()


def head_request() -> bool:
    """Whether the request being handled is a HEAD: a blocking stream (any server but
    runcomet) then ends after its first content instead of waiting for what no one
    reads (runserver iterates a HEAD's whole body before it answers)."""
    environ = _current.get()
    return environ is not None and environ.get("REQUEST_METHOD") == "HEAD"


def seconds_of(value: Any, caller: str, name: str) -> float:
    """A number of seconds as a float (a Decimal or a Fraction too: the loop's deadlines
    add floats), refused with the caller's name when it is not a finite one >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real | Decimal):
        raise TypeError(f"{caller}(): {name} must be a number of seconds, not {_shown(value)}")
    try:
        seconds = float(value)
    except (OverflowError, ValueError):  # an int past any float, a signaling NaN
        seconds = math.nan
    if not 0 <= seconds <= MAX_SECONDS:  # (NaN too)
        raise ValueError(f"{caller}(): {name} must be 0 to {MAX_SECONDS:g} s, not {_shown(value)}")
    return seconds


def _shown(value: Any) -> str:
    """``value``'s repr, cut short (an int's past 4,300 digits cannot even be made)."""
    if isinstance(value, int) and value.bit_length() > 256:
        return f"an int of {value.bit_length()} bits"
    return reprlib.repr(value)


def defer_in_time(response: HttpResponseBase, seconds: float, target: Any) -> DeferredResponse:
    """Send ``response`` now and, ``seconds`` later, run ``target`` for the next chunk.

    ``target`` is a path ("/stage/"), a URL name ("django_comet:stage") or a view.
    """
    _check_response(response, "defer_in_time")
    environ = _request_environ("defer_in_time")
    delay = seconds_of(seconds, "defer_in_time", "seconds")
    next_stage = NextStage(response, _stage_path(target, environ, "defer_in_time"), environ)
    return DeferredResponse(response, Deferral(next_stage, delay=delay))


def defer_until(
    response: HttpResponseBase,
    channel: str | list[str],
    target: Any,
    *,
    timeout: float = 25.0,
    since: int | None = None,
) -> DeferredResponse:
    """Long-poll: send ``response`` now, then run ``target`` when an event arrives on
    ``channel`` (a name or a list of names) or after ``timeout`` seconds.

    The ``@deferred_view()`` stage receives ``response_prev`` and ``event`` (a dict with
    channel, id, event and data; None on timeout).  With ``since`` (an event id), an event
    already newer than it answers at once from the channel's history, so that nothing is
    lost between two polls; without it, only events published from now on count.
    """
    from .brokers import get_broker
    from .events import check_channels, is_event_id, replay

    _check_response(response, "defer_until")
    if since is not None and not is_event_id(since):
        raise TypeError(
            f"defer_until(): since must be an event id (an int, 0 or more) or None, not "
            f"{since!r}: parse the client's text first (poll_response() takes it as it is)"
        )
    environ = _request_environ("defer_until")
    timeout = seconds_of(timeout, "defer_until", "timeout")
    if not timeout:
        raise ValueError("defer_until(): timeout must be over 0 (defer_in_time() waits 0 s)")
    names = [channel] if isinstance(channel, str) else channel
    channels = check_channels(names, "defer_until()")  # (none: only the timeout could end it)
    broker = get_broker()
    broker.start_listening()
    # The shared history answers for events this process has not seen.
    ready, _, after = replay(broker, channels, since)
    next_stage = NextStage(response, _stage_path(target, environ, "defer_until"), environ)
    wait = ChannelWait(next_stage, channels=channels, after=after, timeout=timeout, ready=ready)
    return DeferredResponse(response, wait)


def deferred_view() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a stage view: it receives ``response_prev`` (None outside a deferral).

    Its responses are never cached (``Cache-Control: private, no-store``...): a stage is
    a GET of the view's URL, which Django's per-site cache answered with a stage it had
    stored there (the chain jumped to its end, ``response_prev`` unseen).  Requested
    directly too, so that no copy of that URL is ever stored."""

    def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
        if iscoroutinefunction(view):  # Django must see an async view as async

            @functools.wraps(view)
            async def async_wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
                response = await view(request, *args, **_stage_kwargs(request, kwargs))
                return _never_cached(response)

            async_wrapper.comet_stage = True  # type: ignore[attr-defined]
            return async_wrapper

        @functools.wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
            response = view(request, *args, **_stage_kwargs(request, kwargs))
            return _never_cached(response)

        # (What decorates it with functools.wraps keeps the mark: _check_stage_view.)
        wrapper.comet_stage = True  # type: ignore[attr-defined]
        return wrapper

    return decorator


def _never_cached(response: Any) -> Any:
    if isinstance(response, HttpResponseBase):
        add_never_cache_headers(response)
    return response


def _stage_kwargs(request: HttpRequest, kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs["response_prev"] = request.META.get(RESPONSE_PREV_KEY)
    if EVENT_KEY in request.META:  # a stage of defer_until
        kwargs["event"] = request.META[EVENT_KEY]
    return kwargs


def _check_response(response: Any, caller: str) -> None:
    if not isinstance(response, HttpResponseBase):
        raise TypeError(
            f"{caller}(): response is the first part to send, an HttpResponse, not "
            f"{type(response).__name__}"
        )


def _stage_path(target: Any, environ: dict[str, Any], caller: str) -> str:
    path = _target_path(target, environ, caller)
    if path not in _stage_paths_checked and len(_stage_paths_checked) < STAGE_PATHS_CHECKED:
        _stage_paths_checked.add(path)  # (past the bound, no more looks: a resolve each)
        _check_stage_view(target, path, environ, caller)
    return path


# Stage paths whose view was checked for @deferred_view(), at most this many (paths with
# parameters in them are as many as the objects they name), and the views warned of.
STAGE_PATHS_CHECKED = 1000
_stage_paths_checked: set[str] = set()
_stage_views_warned: set[int] = set()


def _check_stage_view(target: Any, path: str, environ: dict[str, Any], caller: str) -> None:
    """Warn, once per view, when the stage's view is not decorated with
    ``@deferred_view()``: it would get no ``response_prev``, and fail on it, or quietly
    ignore it."""
    if callable(target):
        view = target
    else:
        try:
            view = resolve(_urlconf_path(path, environ)).func
        except Resolver404:
            return  # (resolved in another language: _resolves)
    # A class-based view's as_view(): its dispatch or its get decorated
    # (a stage is a GET), through method_decorator.
    view_class = getattr(view, "view_class", None)
    handlers = [view, getattr(view_class, "dispatch", None), getattr(view_class, "get", None)]
    if any(getattr(handler, "comet_stage", False) for handler in handlers):
        return
    if view_class is not None:
        view = view_class  # (as_view() makes a new function each call)
    if id(view) in _stage_views_warned:  # (by id: resolve() takes views that do not hash)
        return
    _stage_views_warned.add(id(view))
    logger.warning(
        "%s(): the stage's view %s.%s is not decorated with @deferred_view(): it gets no "
        "response_prev (nor event)",
        caller,
        getattr(view, "__module__", "?"),
        getattr(view, "__qualname__", view),
    )


def _target_path(target: Any, environ: dict[str, Any], caller: str) -> str:
    """Resolve now, in the view, so that a bad target fails loudly where it was written."""
    if isinstance(target, Promise):  # reverse_lazy(), as redirect() takes
        target = str(target)
    if callable(target):
        return _reverse_view(target)
    if not isinstance(target, str) or not target:
        raise TypeError(f"{caller}(): target must be a path, URL name or view, not {target!r}")
    if not target.startswith("/"):
        if "/" in target:  # a relative path, a URL: not a name
            raise ValueError(
                f"{caller}(): a target path starts with / (an absolute path on this "
                f"site, no scheme or host): {target!r}"
            )
        return reverse(target)
    path = _urlconf_path(target, environ)
    if not _resolves(path):
        raise ValueError(
            f"no URL pattern matches the deferred target {target!r} (a stage is not "
            f"redirected: give the path its URL pattern has, slash included)"
        )
    return target


def _urlconf_path(target: str, environ: dict[str, Any]) -> str:
    """A target path as the URLconf sees it: unquoted, without its query string and the
    script name it may start with."""
    path = unquote(target.partition("?")[0])
    script_name = environ.get("SCRIPT_NAME", "")
    if script_name and path.startswith(script_name + "/"):
        path = path[len(script_name) :]
    return path


def _resolves(path: str) -> bool:
    """Whether a URL pattern matches ``path``, in the active language or in the one the
    stage's LocaleMiddleware will take for it (under ``i18n_patterns``, from a view in
    French: ``/de/...`` in German, and an unprefixed path, with
    ``prefix_default_language=False``, in the default language)."""
    try:
        resolve(path)
        return True
    except Resolver404:
        language = translation.get_language_from_path(path) or settings.LANGUAGE_CODE
        if language == translation.get_language():
            return False
    with translation.override(language):
        try:
            resolve(path)
            return True
        except Resolver404:
            return False


def _reverse_view(view: Callable[..., Any]) -> str:
    """reverse() a view, also where it is only reachable inside a namespaced include
    (plain reverse(view) only sees the root URLconf's un-namespaced patterns)."""
    try:
        return reverse(view)
    except NoReverseMatch:
        pass
    for name in _names_of(view, get_resolver(), ""):
        try:
            return reverse(name)
        except NoReverseMatch:
            continue
    raise NoReverseMatch(f"no URL pattern without arguments points to the view {view!r}")


def _names_of(view: Callable[..., Any], resolver: URLResolver, prefix: str) -> Iterator[str]:
    for pattern in resolver.url_patterns:
        if isinstance(pattern, URLResolver):
            namespace = f"{prefix}{pattern.namespace}:" if pattern.namespace else prefix
            yield from _names_of(view, pattern, namespace)
        elif isinstance(pattern, URLPattern) and pattern.callback is view and pattern.name:
            yield prefix + pattern.name


class HeldResponse(StreamingHttpResponse):
    """A response that carries a deferral (``comet_deferral``) and announces it in the
    request's environ whenever its content is taken: by the server that iterates it, or
    by a middleware that wraps its content before (GZipMiddleware's compressor yields
    its header before it takes the content's first part).  So a server that a WSGI
    middleware's own iterable hid the response from finds it all the same
    (evloop/deferral.py).  The content withdraws it once it has run its first part."""

    comet_deferral: Any

    @property  # type: ignore[override]
    def streaming_content(self) -> Any:
        announce(request_environ(), self.comet_deferral)
        return _STREAMING_CONTENT.fget(self)

    @streaming_content.setter
    def streaming_content(self, value: Any) -> None:
        _STREAMING_CONTENT.fset(self, value)


_STREAMING_CONTENT: Any = vars(StreamingHttpResponse)["streaming_content"]  # the property


class DeferredResponse(HeldResponse):
    """The first stage's status, headers and cookies, streaming its content, carrying
    the deferral that says when and how the next stage comes."""

    def __init__(self, response: HttpResponseBase, deferral: Deferral | ChannelWait):
        if not getattr(response, "is_rendered", True):
            # A TemplateResponse: Django renders only the response the view returns,
            # which is this one.
            response.render()  # type: ignore[attr-defined]
        super().__init__(status=response.status_code, reason=response.reason_phrase)
        for name, value in response.items():
            if name.lower() != "content-length":  # later stages add to the body
                self[name] = value
        # A proxy that buffers (nginx does by default) would hold every stage back
        # until the last; unless the view said otherwise.
        self.setdefault("X-Accel-Buffering", "no")
        self.cookies = response.cookies
        self.response_prev = response
        self.comet_deferral = deferral
        self._head = head_request()
        self.streaming_content = self._stages(request_environ())
        # What the first response holds (a file, a generator) is let go with this one;
        # not by its close(), which would tell Django that a request finished (twice).
        closers = getattr(response, "_resource_closers", None)  # Django's, since 3.0
        if closers:
            self._resource_closers.extend(closers)  # type: ignore[attr-defined]
            closers.clear()

    def _stages(self, environ: dict[str, Any] | None) -> Iterator[bytes]:
        deferral = self.comet_deferral
        begin(environ, deferral)
        yield from _content(self.response_prev)
        withdraw(environ, deferral)
        if deferral.claimed or self._head:
            return  # a comet server runs the next stage when the delay is over
        # Any other server: block through the stages (the degraded, threaded way).
        blocking_through("A deferred response")
        next_stage = deferral.resume
        assert isinstance(next_stage, NextStage)  # what defer_in_time/defer_until set
        if isinstance(deferral, Deferral):
            time.sleep(deferral.delay)
            with _within_this_request():
                result = next_stage()
        else:  # what the shared history already had, or the next event in this process
            events = (
                deferral.ready or hub.wait(deferral.channels, deferral.after, deferral.timeout)[0]
            )
            with _within_this_request():
                result = next_stage(events[0] if events else None)
        try:
            yield from result
        finally:
            with _within_this_request():
                result.close()


@contextlib.contextmanager
def _within_this_request() -> Iterator[None]:
    """Blocking stages run inside the request whose response they extend: the signals
    of their own requests do not close this thread's database connections, which that
    request may still use (a test's transaction, under Django's test client, which
    leaves them alone for its own request too).  That request's end closes them.
    Connections are per thread, so other threads' requests are not affected."""
    kept = [
        conn
        for conn in connections.all(initialized_only=True)
        if "close_if_unusable_or_obsolete" not in vars(conn)
    ]
    for conn in kept:
        conn.close_if_unusable_or_obsolete = _leave_open  # type: ignore[method-assign]
    try:
        yield
    finally:
        for conn in kept:
            del conn.close_if_unusable_or_obsolete


def _leave_open() -> None:
    pass


def _content(response: HttpResponseBase) -> Iterator[bytes]:
    if response.streaming:
        yield from response  # (an async iterator too: Django's __iter__ consumes it)
    else:
        yield response.content  # type: ignore[attr-defined]

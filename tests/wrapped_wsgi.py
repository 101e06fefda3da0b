"""WSGI middleware of the common kinds (timing, APM): each hands on an iterable of its
own in place of the application's response, which hides its ``comet_deferral``."""

from django.core.handlers.wsgi import WSGIHandler
from django.core.wsgi import get_wsgi_application

django_application = get_wsgi_application()


def passing_on(result):
    """Each item as it comes (a generator: no attribute of the response's)."""
    try:
        yield from result
    finally:
        result.close()


def application(environ, start_response):
    return passing_on(django_application(environ, start_response))


def collecting_application(environ, start_response):
    """One that collects the whole body before handing any of it on."""
    result = django_application(environ, start_response)
    try:
        return [b"".join(result)]
    finally:
        result.close()


class ScopedResponse:
    """As sentry-sdk's _ScopedResponse: an iterable of its own around the response."""

    def __init__(self, response):
        self._response = response

    def __iter__(self):
        yield from self._response

    def close(self):
        self._response.close()


def patch_wsgi_handler():
    """As sentry-sdk's Django integration does at its init: WSGIHandler.__call__ on the
    class itself, so that every call of it (a stage's too) returns its iterable."""
    original = WSGIHandler.__call__

    def __call__(self, environ, start_response):
        return ScopedResponse(original(self, environ, start_response))

    WSGIHandler.__call__ = __call__

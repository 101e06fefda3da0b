"""A WSGI middleware of the common kind (timing, APM): it hands on a generator of its
own in place of the application's response."""

from django.core.wsgi import get_wsgi_application

django_application = get_wsgi_application()


def application(environ, start_response):
    result = django_application(environ, start_response)

    def body():
        try:
            yield from result
        finally:
            result.close()

    return body()

"""An app whose import fails inside it: a dependency that is not installed."""

import a_dependency_that_is_not_installed  # noqa: F401


def app(environ, start_response):  # never reached
    start_response("200 OK", [])
    return [b""]

"""An app that logs while it is imported, with no logging configuration of its own."""

import logging

logging.getLogger("logs_at_import").info("configuration read at import")


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]

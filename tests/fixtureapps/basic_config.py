"""An app that configures logging itself, with logging.basicConfig() at import, as a
script-sized app does."""

import logging

logging.basicConfig(level=logging.DEBUG, format="APP %(levelname)s %(name)s: %(message)s")
logger = logging.getLogger("basic_config")


def app(environ, start_response):
    logger.debug("a debug line of the app's")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]

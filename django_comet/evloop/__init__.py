"""A WSGI server on libevent (through ctypes) that can hold responses open.

Layers, each using only the ones listed after it: ``server`` (evhttp WSGI server,
deferrals), ``request``/``wsgi`` (request reading, environ, start_response), ``loop``
(timers, watchers, wake-up, signals), ``libevent_ctypes`` (the binding).  Nothing here
imports Django.
"""

import os

if os.name != "posix":  # (fork, fcntl, POSIX signals; said before an import fails on them)
    raise ImportError("django-comet's server needs a POSIX system (Linux, macOS, a BSD)")

from .config import ServerConfig
from .deferral import Deferral
from .server import Server

__all__ = ["Deferral", "Server", "ServerConfig"]

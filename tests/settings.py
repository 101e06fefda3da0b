"""demo_site's settings plus a few views that only the tests need (tests/urls.py)."""

import os
import sys

from demo_site.settings import *  # noqa: F403

ROOT_URLCONF = "tests.urls"

# A server started with these variables gets small bounds, so tests can reach them.
COMET_HISTORY_SIZE = int(os.environ.get("TEST_HISTORY_SIZE", "100"))
COMET_HISTORY_CHANNELS = int(os.environ.get("TEST_HISTORY_CHANNELS", "10000"))
COMET_SSE_HEARTBEAT = float(os.environ.get("TEST_SSE_HEARTBEAT", "15"))
COMET_MAX_PENDING_OUTPUT = int(os.environ.get("TEST_MAX_PENDING_OUTPUT", str(1024 * 1024)))
COMET_AUTHORIZE = "tests.event_views.authorize"
COMET_MAX_HOLD = float(os.environ.get("TEST_MAX_HOLD", "3600"))
COMET_TRUSTED_PROXIES = [p for p in os.environ.get("TEST_TRUSTED_PROXIES", "").split(",") if p]
COMET_HEADER_TIMEOUT = float(os.environ.get("TEST_HEADER_TIMEOUT", "20"))
COMET_TIMEOUT = float(os.environ.get("TEST_TIMEOUT", "30"))
COMET_MAX_CONNECTIONS = int(os.environ.get("TEST_MAX_CONNECTIONS", "20000"))
COMET_GRACE_PERIOD = float(os.environ.get("TEST_GRACE_PERIOD", "10"))

if os.environ.get("TEST_CONN_MAX_AGE"):  # persistent database connections
    DATABASES["default"]["CONN_MAX_AGE"] = int(os.environ["TEST_CONN_MAX_AGE"])  # noqa: F405

if os.environ.get("TEST_BAD_TIMEOUT"):  # a setting of the wrong kind
    COMET_TIMEOUT = os.environ["TEST_BAD_TIMEOUT"]
if os.environ.get("TEST_MISNAMED_SETTINGS"):  # a typo, and an environment variable's name
    COMET_HISTORY_SIZ = 5
    COMET_LIBEVENT = "/usr/lib/libevent-2.1.so.7"
    COMET_API_KEY = "another library's (Comet ML)"
    COMET_BROKER_URL = "redis://"  # a word too many
if os.environ.get("TEST_ROOT_LOG"):  # the project logs everything to a file
    LOGGING = {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {
            "file": {"class": "logging.FileHandler", "filename": os.environ["TEST_ROOT_LOG"]}
        },
        "root": {"handlers": ["file"], "level": "WARNING"},
    }

if os.environ.get("TEST_CONSOLE_LOG"):  # the project's console handler: "root" or a logger
    LOGGING = {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"console": {"class": "logging.StreamHandler"}},
        **(
            {"root": {"handlers": ["console"], "level": "INFO"}}
            if os.environ["TEST_CONSOLE_LOG"] == "root"
            else {
                "loggers": {
                    os.environ["TEST_CONSOLE_LOG"]: {
                        "handlers": ["console"],
                        "level": "INFO",
                        "propagate": False,
                    }
                }
            }
        ),
    }

if os.environ.get("TEST_EXCEPTION_LOG"):  # a handler that reads exc_info (AdminEmailHandler)
    LOGGING = {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {
            "types": {
                "()": "tests.log_handlers.ExceptionTypes",
                "filename": os.environ["TEST_EXCEPTION_LOG"],
                "level": "ERROR",
            }
        },
        "root": {"handlers": ["types"], "level": "INFO"},
    }

if os.environ.get("TEST_SLOW_LOG"):  # a handler that takes 3 s per record (mail, a shipper)
    LOGGING = {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {
            "slow": {
                "()": "tests.log_handlers.Slow",
                "filename": os.environ["TEST_SLOW_LOG"],
                "seconds": 3,
                "level": "WARNING",
            }
        },
        "root": {"handlers": ["slow"], "level": "INFO"},
    }

if os.environ.get("TEST_ACCESS_LOG_ADDRESSES"):  # the access log with the client's address
    LOGGING = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"with_address": {"format": "%(remote_addr)s %(message)s"}},
        "handlers": {"access": {"class": "logging.StreamHandler", "formatter": "with_address"}},
        "loggers": {"django_comet": {"handlers": ["access"], "level": "INFO", "propagate": False}},
    }

if os.environ.get("TEST_APP_LOGGING"):  # a typical LOGGING: an app's logger, the defaults
    LOGGING = {
        "version": 1,
        "handlers": {"console": {"class": "logging.StreamHandler"}},
        "loggers": {"myapp": {"handlers": ["console"], "level": "INFO"}},
    }

if os.environ.get("TEST_WATCHED_FILE"):  # the autoreloader restarts on edits to this file
    from pathlib import Path

    from django.utils.autoreload import autoreload_started

    def _watch(sender, **kwargs):
        sender.extra_files.add(Path(os.environ["TEST_WATCHED_FILE"]))

    autoreload_started.connect(_watch)

if os.environ.get("TEST_EXTRA_APPS_FILE"):  # a module naming more apps, for a test to
    # edit while the autoreloader runs (an app that does not load: Django's setup fails)
    import importlib.util

    sys.path.insert(0, os.path.dirname(os.environ["TEST_EXTRA_APPS_FILE"]))  # (its apps)
    _spec = importlib.util.spec_from_file_location(
        "comet_extra_apps", os.environ["TEST_EXTRA_APPS_FILE"]
    )
    assert _spec is not None and _spec.loader is not None
    _extra = importlib.util.module_from_spec(_spec)
    sys.modules["comet_extra_apps"] = _extra  # (a module: the autoreloader watches it)
    _spec.loader.exec_module(_extra)
    INSTALLED_APPS = [*INSTALLED_APPS, *_extra.EXTRA_APPS]  # noqa: F405

if os.environ.get("TEST_NOSTATIC_RUNSERVER"):  # runserver overridden to serve no static
    INSTALLED_APPS = ["tests.nostatic_runserver", *INSTALLED_APPS]

if os.environ.get("TEST_TEMPLATE_DIR"):  # one more template directory, and what the
    # autoreloader sees of it (DEBUG: "first seen", "notified as changed")
    TEMPLATES = [
        {**TEMPLATES[0], "DIRS": [os.environ["TEST_TEMPLATE_DIR"]]},  # noqa: F405
    ]
    LOGGING = {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"console": {"class": "logging.StreamHandler"}},
        "loggers": {"django.utils.autoreload": {"handlers": ["console"], "level": "DEBUG"}},
    }

if os.environ.get("TEST_WRAPPED_WSGI"):  # a middleware hands on an iterable of its own
    WSGI_APPLICATION = "tests.wrapped_wsgi." + os.environ["TEST_WRAPPED_WSGI"]

if os.environ.get("TEST_PATCHED_HANDLER"):  # an APM's (sentry-sdk's) WSGIHandler.__call__
    from tests.wrapped_wsgi import patch_wsgi_handler

    patch_wsgi_handler()

if os.environ.get("TEST_SITE_CACHE"):  # Django's per-site cache around everything
    MIDDLEWARE = [
        "django.middleware.cache.UpdateCacheMiddleware",
        *MIDDLEWARE,  # noqa: F405
        "django.middleware.cache.FetchFromCacheMiddleware",
    ]
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

if os.environ.get("TEST_REPLACING"):  # a middleware takes a response, answers another
    MIDDLEWARE = ["tests.stage_views.replacing_middleware", *MIDDLEWARE]

if os.environ.get("TEST_GZIP"):  # a compressing middleware in front of everything
    MIDDLEWARE = ["django.middleware.gzip.GZipMiddleware", *MIDDLEWARE]

if os.environ.get("TEST_WORKERS_CANNOT_START"):  # each pre-forked worker fails as it starts
    import django_comet.evloop.server as _server

    _parent, _init = os.getpid(), _server.Server.__init__

    def _init_unless_a_worker(self, *args, **kwargs):
        if os.getpid() != _parent:
            raise OSError(24, "Too many open files (TEST_WORKERS_CANNOT_START)")
        _init(self, *args, **kwargs)

    _server.Server.__init__ = _init_unless_a_worker

if os.environ.get("TEST_SLOW_CHECK"):  # a system check that takes that many seconds
    import time as _time

    from django.core import checks as _checks

    @_checks.register
    def _slow_check(app_configs, **kwargs):
        print("slow check running", flush=True)
        _time.sleep(float(os.environ["TEST_SLOW_CHECK"]))
        return []

"""django-comet: server push for synchronous Django, served by a libevent event loop.

Add ``django_comet`` to INSTALLED_APPS and run ``python manage.py runcomet``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["defer_in_time", "deferred_view"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so that `python -m django_comet.evloop` (no Django settings) imports nothing
    # of Django's.
    if name in ("defer_in_time", "deferred_view"):
        from . import deferred

        return getattr(deferred, name)
    raise AttributeError(f"module 'django_comet' has no attribute {name!r}")

from __future__ import annotations

from django.apps import AppConfig
from django.core import checks


class CometConfig(AppConfig):
    name = "django_comet"
    verbose_name = "Comet"

    def ready(self) -> None:
        from . import checks as comet_checks
        from . import deferred  # noqa: F401  (connects the request_started receiver)
        from .brokers import memory, size_the_history

        size_the_history()

        memory.watch_for_requests()  # a publish that would reach no one is told
        checks.register(comet_checks.check_libevent)
        checks.register(comet_checks.check_settings)
        checks.register(comet_checks.check_unknown_settings)
        checks.register(comet_checks.check_authorize_deploy, checks.Tags.security, deploy=True)

"""The server's figures alone, for a project's URLconf:
``path("", include("django_comet.status_urls"))`` serves ``comet/status/`` (JSON) and
``comet/metrics`` (Prometheus), without the demo's staged views of ``django_comet.urls``.
Named ``comet-status`` and ``comet-metrics``: included without a namespace, their names
are the project's, and a plain ``status`` took the place of one of its own."""

from django.urls import path, re_path

from . import views

urlpatterns = [
    path("comet/status/", views.status, name="comet-status"),
    # Prometheus' convention is /metrics; a scrape config written the Django way (with
    # the slash) is served too, rather than a 404 that looks like a dead target.
    re_path(r"^comet/metrics/?$", views.metrics, name="comet-metrics"),
]

"""The server's figures alone, for a project's URLconf:
``path("", include("django_comet.status_urls"))`` serves ``comet/status/`` (JSON) and
``comet/metrics`` (Prometheus), without the demo's staged views of ``django_comet.urls``."""

from django.urls import path

from . import views

urlpatterns = [
    path("comet/status/", views.status, name="status"),
    path("comet/metrics", views.metrics, name="metrics"),
]

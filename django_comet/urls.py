"""The demo: the 2007 staged response at the root, and the server's figures."""

from django.urls import path

from . import status_urls, views

app_name = "django_comet"

urlpatterns = [
    path("", views.comet_main, name="main"),
    path("stage/", views.comet_stage, name="stage"),
    path("stage_last/", views.comet_stage_last, name="stage_last"),
    *status_urls.urlpatterns,
]

from django.urls import path

from . import views

app_name = "django_comet"

urlpatterns = [
    path("", views.comet_main, name="main"),
    path("stage/", views.comet_stage, name="stage"),
    path("stage_last/", views.comet_stage_last, name="stage_last"),
    path("comet/status/", views.status, name="status"),
    path("comet/metrics", views.metrics, name="metrics"),
]

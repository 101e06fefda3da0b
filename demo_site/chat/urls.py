from django.urls import path

from . import views

app_name = "chat"

urlpatterns = [
    path("", views.room, name="room"),
    path("send/", views.send, name="send"),
    path("events/", views.events, name="events"),
    path("poll/", views.poll, name="poll"),
]

from django.urls import include, path

from . import views

urlpatterns = [
    path("t/echo/", views.echo, name="echo"),
    path("t/sleep/", views.sleep, name="sleep"),
    path("t/boom/", views.boom, name="boom"),
    path("t/quick-stages/", views.quick_stages, name="quick_stages"),
    path("t/quick-stage/", views.quick_stage, name="quick_stage"),
    path("t/counted/", views.counted_first, name="counted_first"),
    path("t/counted-stage/", views.counted_stage, name="counted_stage"),
    path("t/count/", views.count, name="count"),
    path("t/stage-404/", views.stage_to_missing, name="stage_to_missing"),
    path("t/big/", views.big, name="big"),
    path("t/file/", views.file_view, name="file"),
    path("t/async/", views.async_view, name="async"),
    path("t/async-staged/", views.async_staged, name="async_staged"),
    path("t/publish/", views.publish_view, name="publish"),
    path("t/stream/", views.stream_view, name="stream"),
    path("t/stream-204/", views.stream_204, name="stream_204"),
    path("t/stream-then-publish/", views.stream_then_publish, name="stream_then_publish"),
    path("t/poll/", views.poll_view, name="poll"),
    path("t/poll/answer/", views.poll_answer, name="poll_answer"),
    path("t/fastpoll/", views.fast_poll_view, name="fast_poll"),
    path("t/poll-twice/", views.poll_twice, name="poll_twice"),
    path("t/poll-again/", views.poll_again, name="poll_again"),
    path("t/poll-then-stage/", views.poll_then_stage, name="poll_then_stage"),
    path("t/after-event/", views.after_event, name="after_event"),
    path("t/timed-stage/", views.timed_stage, name="timed_stage"),
    path("", include("demo_site.urls")),
]

"""The status figures' pure parts: adding up pre-forked workers', escaping metrics labels."""

from django_comet.evloop.figures import combine
from django_comet.views import _label


def record(worker, pid, **figures):
    return {"worker": worker, "pid": pid, "figures": figures}


def test_counts_add_up_and_events_received_do_not():
    total = combine(
        [
            record(1, 11, held=2, requests=10, events_published=7, channels={"a": 1, "b": 2}),
            record(0, 10, held=1, requests=5, events_published=9, channels={"a": 3}),
        ]
    )
    assert total["workers"] == 2
    assert (total["held"], total["requests"]) == (3, 15)
    # Every worker hears every event through the broker: the most any one received.
    assert total["events_published"] == 9
    assert total["channels"] == {"a": 4, "b": 2}
    assert [(w["worker"], w["pid"], w["held"]) for w in total["per_worker"]] == [
        (0, 10, 1),
        (1, 11, 2),
    ]


def test_a_dead_workers_counters_stay_and_its_gauges_go():
    total = combine(
        [
            record(0, 10, held=1, requests=5),
            {**record(1, 11, requests=7), "gone": True},  # counters only, as read back
        ]
    )
    assert (total["workers"], total["held"], total["requests"]) == (1, 1, 12)
    assert [w["worker"] for w in total["per_worker"]] == [0]


def test_what_a_dead_worker_received_stays_and_is_carried_on():
    """events_published must not go down when the worker that received most dies: its
    count stays, and its replacement counts on from it."""
    import subprocess

    from django_comet.evloop.figures import _counters

    ended = subprocess.Popen(["true"])
    ended.wait()  # reaped: a pid of no process
    gone = record(1, ended.pid, held=2, requests=7)
    gone["figures"]["events_published"] = 9
    kept = _counters(gone)
    assert kept == {"requests": 7, "events_published": 9}
    total = combine([record(0, 10, events_published=3), {**gone, "figures": kept, "gone": True}])
    assert total["events_published"] == 9


def test_the_status_urls_leave_the_projects_url_names_alone():
    """Included without a namespace, their names are the project's: as `status`, the
    figures took the place of a project's own `reverse("status")` (found by a review)."""
    import types

    from django.test import override_settings
    from django.urls import include, path, reverse

    urlconf = types.ModuleType("project_urls")
    urlconf.urlpatterns = [  # type: ignore[attr-defined]
        path("health/", lambda request: None, name="status"),
        path("", include("django_comet.status_urls")),
    ]
    with override_settings(ROOT_URLCONF=urlconf):
        assert reverse("status") == "/health/"
        assert reverse("comet-status") == "/comet/status/"
        assert reverse("comet-metrics") == "/comet/metrics"


def test_a_channel_label_is_escaped_as_the_text_format_says():
    """Channel names allow none of these characters today; a looser rule must not break
    the exposition (a quote ended the label, a newline the sample)."""
    assert _label('a\\b"c\nd') == 'a\\\\b\\"c\\nd'

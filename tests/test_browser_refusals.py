"""comet.js in headless Chromium: a subscription the site refuses (``COMET_AUTHORIZE``, a
login page, a 404) says so, once, through ``onRefused``, where EventSource alone would
reconnect for ever; a server error is no refusal."""

from __future__ import annotations

import time

import pytest

from .browser import LOAD_COMET_JS, in_tabs
from .test_browser_chat import new_browser, unique

__all__ = ["new_browser"]  # a fixture, used by name

pytestmark = pytest.mark.browser


REFUSED = """
window.states = [];
window.refusals = [];
Comet.subscribe({sse: arguments[0], poll: arguments[1], forcePoll: arguments[2],
                 shareTabs: !!arguments[3], onEvent: function () {},
                 onState: function (state) { window.states.push(state); },
                 onRefused: function (info) { window.refusals.push(info); }});
"""


def assert_told_refused(page, comet, subscription, status, url):
    """A page subscribes with REFUSED's (sse, poll, forcePoll): it is told the refusal,
    once, with the status and the URL that said it."""
    page.get(comet.url + "/t/echo/")
    assert page.execute_async_script(LOAD_COMET_JS)
    page.execute_script(REFUSED, *subscription)
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(page, 30).until(lambda d: d.execute_script("return window.refusals.length"))
    assert page.execute_script("return [window.states, window.refusals]") == [
        ["refused"],
        [{"status": status, "url": comet.url + url}],
    ]


@pytest.mark.parametrize(
    "poll, status, url",
    [
        ("/nowhere/", 404, "/nowhere/?since=0"),
        ("/t/fastpoll/?channel=secret", 403, "/t/fastpoll/?channel=secret&since=0"),
        # Anonymous, to the login page: 200, an HTML page where the poll's JSON was due.
        ("/admin/", 200, "/admin/login/?next=/admin/%3Fsince%3D0"),
    ],
)
def test_a_long_poll_that_is_refused_says_so(comet, new_browser, poll, status, url):
    """A refusal (COMET_AUTHORIZE, an expired session's redirect to a login page) was
    "reconnecting…" for ever, and a login page even "live (long-poll)"."""
    assert_told_refused(new_browser("poll-refused"), comet, (None, poll, True), status, url)


REFUSED_AGAIN_AND_AGAIN = """
window.states = [];
window.refusals = [];
window.polls = 0;
var realOpen = XMLHttpRequest.prototype.open;
XMLHttpRequest.prototype.open = function () {
    window.polls += 1;
    return realOpen.apply(this, arguments);
};
var realSetTimeout = window.setTimeout;
window.setTimeout = function (callback, ms) {  // a minute's wait is 10 ms here
    return realSetTimeout(callback, ms === 60000 ? 10 : ms);
};
Comet.subscribe({poll: '/t/fastpoll/?channel=secret', forcePoll: true, shareTabs: arguments[0],
                 onEvent: function () {},
                 onState: function (state) { window.states.push(state); },
                 onRefused: function (info) { window.refusals.push(info.status); }});
"""


def test_a_refusal_is_told_once_while_it_lasts(comet, new_browser):
    """The poll asks again each minute: a page that shows a banner in onRefused was
    told again each time."""
    page = new_browser("refused-again")
    page.get(comet.url + "/t/echo/")
    assert page.execute_async_script(LOAD_COMET_JS)
    page.execute_script(REFUSED_AGAIN_AND_AGAIN, False)
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(page, 30).until(lambda d: d.execute_script("return window.polls >= 4"))
    assert page.execute_script("return [window.states, window.refusals]") == [["refused"], [403]]


def test_a_tab_joining_a_refused_subscription_is_told_of_the_refusal(comet, new_browser):
    """A tab that joins the connected tab's subscription got the state 'refused', but
    its onRefused only at the connected tab's next poll, a minute later."""
    from selenium.webdriver.support.ui import WebDriverWait

    page = new_browser("refused-tabs")

    def subscribed(_):
        page.get(comet.url + "/t/echo/")
        assert page.execute_async_script(LOAD_COMET_JS)
        page.execute_script(REFUSED, None, "/t/fastpoll/?channel=secret", True, True)
        WebDriverWait(page, 30).until(lambda d: d.execute_script("return window.refusals.length"))

    tabs = in_tabs(page, range(2), subscribed)
    for handle in tabs:
        page.switch_to.window(handle)
        assert page.execute_script("return [window.states, window.refusals]") == [
            ["refused"],
            [{"status": 403, "url": comet.url + "/t/fastpoll/?channel=secret&since=0"}],
        ]


@pytest.mark.parametrize(
    "sse, poll, status, url",
    [
        ("/t/stream/?channels=secret", None, 403, "/t/stream/?channels=secret&lastEventId=0"),
        # With a poll endpoint, the poll tells (a proxy may refuse streams alone).
        (
            "/t/stream/?channels=secret",
            "/t/fastpoll/?channel=secret",
            403,
            "/t/fastpoll/?channel=secret&since=0",
        ),
        ("/nowhere/", None, 404, "/nowhere/?lastEventId=0"),
        # Anonymous, to the login page: an HTML page where the stream was due.
        ("/admin/", None, 200, "/admin/login/?next=/admin/%3FlastEventId%3D0"),
    ],
)
def test_a_refused_stream_says_so(comet, new_browser, sse, poll, status, url):
    """EventSource does not tell a refusal from a server away: a stream-only
    subscription said "reconnecting…" for ever, and one with a poll said so until the
    poll it fell back to after three failures told the refusal; now at once."""
    assert_told_refused(new_browser("stream-refused"), comet, (sse, poll, False), status, url)


def test_a_stream_refused_where_the_poll_is_not_goes_on_in_long_poll(comet, new_browser):
    """A proxy that refuses streams alone (a 403, or its HTML page): the poll works, and
    the subscription must use it, not say the site refused it (found by a review)."""
    page = new_browser("stream-refused-poll-ok")
    page.get(comet.url + "/t/echo/")
    assert page.execute_async_script(LOAD_COMET_JS)
    page.execute_script(REFUSED, "/nowhere/", "/t/fastpoll/?channel=poll-ok&timeout=30", False)
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(page, 30).until(
        lambda d: "live (long-poll)" in d.execute_script("return window.states")
    )
    assert page.execute_script("return [window.states, window.refusals]") == [
        ["live (long-poll)"],
        [],
    ]


def test_a_tab_joining_after_the_connected_tab_changed_is_told_of_the_refusal(comet, new_browser):
    """A tab that joined a refused subscription kept its state but not the refusal
    itself: once it led, the tabs that joined it got 'refused' and no onRefused (found
    by a review)."""
    from selenium.webdriver.support.ui import WebDriverWait

    page = new_browser("refused-third-tab")

    def subscribed(_):
        page.get(comet.url + "/t/echo/")
        assert page.execute_async_script(LOAD_COMET_JS)
        page.execute_script(REFUSED, "/t/stream/?channels=secret", None, False, True)
        WebDriverWait(page, 30).until(lambda d: d.execute_script("return window.refusals.length"))

    first, second = in_tabs(page, range(2), subscribed)
    page.switch_to.window(first)
    page.close()  # the second tab leads
    page.switch_to.window(second)
    page.switch_to.new_window("tab")
    subscribed(None)
    assert page.execute_script("return [window.states, window.refusals]") == [
        ["refused"],
        [{"status": 403, "url": comet.url + "/t/stream/?channels=secret&lastEventId=0"}],
    ]


STREAM_ASKED_AGAIN = """
window.states = [];
window.refusals = [];
window.streams = 0;
window.asked = 0;
var RealEventSource = window.EventSource;
window.EventSource = function (url) { window.streams += 1; return new RealEventSource(url); };
window.EventSource.CLOSED = RealEventSource.CLOSED;
var realOpen = XMLHttpRequest.prototype.open;
XMLHttpRequest.prototype.open = function () {
    window.asked += 1;
    return realOpen.apply(this, arguments);
};
var realSetTimeout = window.setTimeout;
window.setTimeout = function (callback, ms) {  // a minute's wait, and backoffs, are 10 ms
    return realSetTimeout(callback, ms >= 500 && ms !== 10000 ? 10 : ms);
};
Comet.subscribe({sse: arguments[0], shareTabs: false, onEvent: function () {},
                 onState: function (state) { window.states.push(state); },
                 onRefused: function (info) { window.refusals.push(info.status); }});
"""


@pytest.mark.parametrize(
    "sse, states, refusals",
    [
        ("/t/stream/?channels=secret", ["refused"], [403]),
        ("/t/boom/", ["reconnecting…"], []),  # a 500: the server's fault, retried
    ],
)
def test_a_stream_given_up_is_asked_why_each_time(comet, new_browser, sse, states, refusals):
    """A refusal is told once while it lasts (the stream is asked again each minute);
    a server error is no refusal."""
    page = new_browser("stream-asked-again")
    page.get(comet.url + "/t/echo/")
    assert page.execute_async_script(LOAD_COMET_JS)
    page.execute_script(STREAM_ASKED_AGAIN, sse)
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(page, 30).until(lambda d: d.execute_script("return window.asked >= 4"))
    assert page.execute_script("return window.streams") >= 4
    assert page.execute_script("return [window.states, window.refusals]") == [states, refusals]


STREAM_ONLY = """
window.states = [];
window.thrown = [];
try {
    Comet.subscribe({sse: '/t/stream/?channels=' + arguments[0], shareTabs: arguments[1],
                     onEvent: function () {},
                     onState: function (state) { window.states.push(state); }});
} catch (e) {
    window.thrown.push(String(e));
}
"""


@pytest.mark.parametrize("shared", [True, False])
def test_a_stream_only_subscription_without_eventsource_says_it_failed(comet, new_browser, shared):
    """No EventSource and no poll endpoint: shared, the subscription did nothing and
    said nothing; unshared, it threw a TypeError (it polled "undefined")."""
    from .test_browser_chat import NO_EVENTSOURCE

    page = new_browser(f"stream-only-{shared}")
    page.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": NO_EVENTSOURCE})
    page.get(comet.url + "/t/echo/")
    assert page.execute_async_script(LOAD_COMET_JS)
    page.execute_script(STREAM_ONLY, unique("stream-only-").replace(" ", ""), shared)
    deadline = time.monotonic() + 10
    while not page.execute_script("return window.states.length || window.thrown.length"):
        assert time.monotonic() < deadline, "the subscription said nothing"
        time.sleep(0.05)
    assert page.execute_script("return [window.states, window.thrown]") == [["failed"], []]

"""comet.js in headless Chromium: the tabs of one browser share one stream; where the
network misbehaves, a stream that stalls without closing is reopened, and a stream that
keeps failing is retried with backoff rather than at every ``retry:`` interval."""

from __future__ import annotations

import time

import pytest
import requests

from .processes import runcomet
from .proxy import Proxy
from .publishing import publish
from .test_browser_chat import new_browser, open_chat, say, unique, wait_for_message

__all__ = ["new_browser"]  # a fixture, used by name

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def beating(demo_db):
    """A server with a 0.3 s heartbeat: comet.js takes 0.9 s of silence for a stall."""
    server = runcomet(db=demo_db, env={"TEST_SSE_HEARTBEAT": "0.3"})
    yield server
    assert server.stop() == 0


def test_a_stream_that_stalls_without_closing_is_reopened(beating, new_browser):
    proxy = Proxy(beating.port)
    try:
        page = new_browser("stall")
        open_chat(page, f"http://127.0.0.1:{proxy.port}", "live (sse)")
        proxy.freeze()  # the stream's connection (and any idle one) goes silent
        text = unique("sent while the stream was stalled:")
        publish(beating, "chat", {"name": "Probe", "text": text})
        wait_for_message(page, "Probe", text)  # through a connection opened since
    finally:
        proxy.close()


FAKE_EVENTSOURCE = """
window.FakeEventSource = function (url) {
    this.url = url; this.readyState = 0; this.closed = false;
    window.FakeEventSource.last = this;
};
window.FakeEventSource.CLOSED = 2;
window.FakeEventSource.prototype.addEventListener = function () {};
window.FakeEventSource.prototype.close = function () { this.closed = true; this.readyState = 2; };
"""

LOAD_COMET_JS = """
var done = arguments[arguments.length - 1];
var script = document.createElement('script');
script.src = '/static/django_comet/comet.js';
script.onload = function () { done(true); };
script.onerror = function () { done(false); };
document.head.appendChild(script);
"""

FAIL_TWICE = """
var delays = [];
var setTimeoutBefore = window.setTimeout;
window.setTimeout = function (callback, ms) {  // (the first-frame watchdog aside)
    if (ms !== 12345) { delays.push(ms); }
    return 0;
};
window.EventSource = window.FakeEventSource;
try {
    Comet.subscribe({sse: '/nowhere/', poll: '/nowhere/', onEvent: function () {},
                     shareTabs: false, openTimeout: 12345});
    var source = window.FakeEventSource.last;
    source.readyState = 1; source.onopen();
    source.readyState = 0; source.onerror();  // the browser reconnects by itself
    var afterOne = {closed: source.closed, delays: delays.slice()};
    source.onerror();  // and fails again
    return {afterOne: afterOne, closed: source.closed, delays: delays};
} finally {
    window.setTimeout = setTimeoutBefore;
}
"""


POLL_WITH_TIMEOUT = """
window.got = [];
window.states = [];
Comet.subscribe({poll: '/t/fastpoll/?channel=ptimeout&timeout=30', forcePoll: true,
                 pollTimeout: 1000, shareTabs: false,
                 onEvent: function (event) { window.got.push(event.id); },
                 onState: function (state) { window.states.push(state); }});
"""


def test_a_long_poll_that_stalls_without_closing_is_retried(comet, new_browser):
    """A poll whose connection goes silent (a network that dropped it without a word)
    is given up after pollTimeout and asked again, from the same cursor."""
    proxy = Proxy(comet.port)
    try:
        page = new_browser("poll-stall")
        page.get(f"http://127.0.0.1:{proxy.port}/t/echo/")
        assert page.execute_async_script(LOAD_COMET_JS)
        page.execute_script(POLL_WITH_TIMEOUT)
        comet.wait_for_status(lambda s: s["channels"].get("ptimeout") == 1)
        proxy.freeze()  # the waiting poll's connection goes silent
        published = requests.post(
            comet.url + "/t/publish/", data={"channel": "ptimeout", "data": '"late"'}, timeout=30
        ).json()["id"]
        deadline = time.monotonic() + 30
        while not page.execute_script("return window.got.length"):
            assert time.monotonic() < deadline, page.execute_script("return window.states")
            time.sleep(0.05)
        assert page.execute_script("return window.got") == [published]
    finally:
        proxy.close()


LOCKS_REFUSED = """
navigator.locks.request = function () {
    return Promise.reject(new DOMException('refused here', 'SecurityError'));
};
window.got = [];
window.sub = Comet.subscribe({sse: '/t/stream/?channels=nolocks', poll: '/nowhere/',
                 onEvent: function (event) { window.got.push(event.id); }});
"""


def test_a_page_refused_web_locks_connects_unshared(comet, new_browser):
    """Where Web Locks are refused (a sandboxed or opaque origin), a subscription cannot
    share a connection with other tabs: it connects on its own rather than never."""
    page = new_browser("no-locks")
    page.get(comet.url + "/t/echo/")
    assert page.execute_async_script(LOAD_COMET_JS)
    page.execute_script(LOCKS_REFUSED)
    comet.wait_for_status(lambda s: s["channels"].get("nolocks") == 1)
    published = requests.post(
        comet.url + "/t/publish/", data={"channel": "nolocks", "data": '"hi"'}, timeout=30
    ).json()["id"]
    deadline = time.monotonic() + 30
    while not page.execute_script("return window.got.length"):
        assert time.monotonic() < deadline, "the event never arrived"
        time.sleep(0.05)
    assert page.execute_script("return window.got") == [published]
    page.execute_script("window.sub.close()")
    comet.wait_for_status(lambda s: "nolocks" not in s["channels"])


def test_a_stream_failing_twice_in_a_row_is_retried_with_backoff(comet, new_browser):
    page = new_browser("backoff")
    page.get(comet.url + "/t/echo/")  # a page of the site, for its comet.js
    page.execute_script(FAKE_EVENTSOURCE)
    assert page.execute_async_script(LOAD_COMET_JS)
    result = page.execute_script(FAIL_TWICE)
    assert result["afterOne"] == {"closed": False, "delays": []}  # the browser's retry
    assert result["closed"] is True  # then comet.js's own, after a backoff of 1-2 s
    assert len(result["delays"]) == 1 and 1000 <= result["delays"][0] <= 2000, result


GAP_WITH_A_CURSOR = """
var retries = [];
var setTimeoutBefore = window.setTimeout;
window.setTimeout = function (callback, ms) {  // (the first-frame watchdog aside)
    if (ms !== 12345) { retries.push(callback); }
    return 0;
};
window.EventSource = window.FakeEventSource;
window.FakeEventSource.prototype.addEventListener = function (name, listener) {
    (this.listeners = this.listeners || {})[name] = listener;
};
try {
    var gaps = 0;
    Comet.subscribe({sse: '/s/', poll: '/p/', lastId: 5, onEvent: function () {},
                     onGap: function () { gaps += 1; }, shareTabs: false, openTimeout: 12345});
    var first = window.FakeEventSource.last;
    first.readyState = 1; first.onopen();
    var info = {last_event_id: 5, channels: ['c'], cursor: 42};
    first.listeners['comet-history-gap']({data: JSON.stringify(info), lastEventId: '42'});
    first.readyState = 2; first.onerror();  // closed: comet.js opens the next stream
    retries.forEach(function (retry) { retry(); });
    return {first: first.url, next: window.FakeEventSource.last.url, gaps: gaps};
} finally {
    window.setTimeout = setTimeoutBefore;
}
"""


def test_a_gap_with_a_cursor_moves_the_next_streams_cursor(comet, new_browser):
    """A gap with no event after it says where to go on from: the next stream asks from
    there, or it would be told of the same gap again (test_sse's told-once test)."""
    page = new_browser("gap-cursor")
    page.get(comet.url + "/t/echo/")
    page.execute_script(FAKE_EVENTSOURCE)
    assert page.execute_async_script(LOAD_COMET_JS)
    result = page.execute_script(GAP_WITH_A_CURSOR)
    assert result == {  # (the endpoints as resolved against the page)
        "first": comet.url + "/s/?lastEventId=5",
        "next": comet.url + "/s/?lastEventId=42",
        "gaps": 1,
    }


STALE_GAP = """
window.EventSource = window.FakeEventSource;
window.FakeEventSource.prototype.addEventListener = function (name, listener) {
    (this.listeners = this.listeners || {})[name] = listener;
};
var got = [], gaps = 0;
Comet.subscribe({sse: '/s/', poll: '/p/', lastId: 5, onEvent: function (e) { got.push(e.id); },
                 onGap: function () { gaps += 1; }, shareTabs: false, openTimeout: 60000});
var source = window.FakeEventSource.last;
source.readyState = 1; source.onopen();
function send(id) { source.listeners.message({data: '"x"', lastEventId: String(id)}); }
[6, 7, 8, 9, 10, 11].forEach(send);
// A gap told for cursor 5, which this subscription went past (a stream tried again
// while polling went on, its head held back): the replay after it is old news.
var info = {last_event_id: 5, channels: ['c']};
source.listeners['comet-history-gap']({data: JSON.stringify(info), lastEventId: ''});
[7, 8, 12].forEach(send);
return {got: got, gaps: gaps};
"""


def test_a_gap_told_for_a_cursor_already_passed_changes_nothing(comet, new_browser):
    """It set the subscription to take the next event whatever its id (ids restart
    after some gaps): the replay that followed was delivered a second time, and the
    page told of a gap it had not had."""
    page = new_browser("stale-gap")
    page.get(comet.url + "/t/echo/")
    page.execute_script(FAKE_EVENTSOURCE)
    assert page.execute_async_script(LOAD_COMET_JS)
    assert page.execute_script(STALE_GAP) == {"got": [6, 7, 8, 9, 10, 11, 12], "gaps": 0}


def in_tabs(page, items, load):
    """``load(item)`` for each item, each in a tab of its own (the first in the page's
    current one); the tabs' handles."""
    tabs = []
    for n, item in enumerate(items):
        if n:
            page.switch_to.new_window("tab")
        tabs.append(page.current_window_handle)
        load(item)
    return tabs


def test_the_tabs_of_one_browser_share_one_stream(beating, new_browser):
    """Seven chat tabs of one browser: over HTTP/1.1 a stream each would take all six
    connections to the site, and the seventh would not even load."""
    page = new_browser("tabs")
    tabs = in_tabs(page, range(7), lambda _: open_chat(page, beating.url, "live (sse)"))
    beating.wait_for_status(lambda s: s["channels"].get("chat") == 1)  # one for all
    text = unique("to every tab:")
    say(page, "Seventh", text)
    page.switch_to.new_window("tab")  # one more joins: it gets what the others saw
    tabs.append(page.current_window_handle)
    open_chat(page, beating.url, "live (sse)")
    for handle in tabs:
        page.switch_to.window(handle)
        wait_for_message(page, "Seventh", text)
    # The tab holding the stream closes: the next one connects, from its last id.
    page.switch_to.window(tabs[0])
    page.close()
    page.switch_to.window(tabs[1])
    text = unique("after the first tab closed:")
    say(page, "Second", text)
    for handle in tabs[1:]:
        page.switch_to.window(handle)
        wait_for_message(page, "Second", text)
    beating.wait_for_status(lambda s: s["channels"].get("chat") == 1)


# Two subscriptions' events (window.__seen) and the page's uncaught errors.
RECORDING = """
var channel = arguments[0];
var done = arguments[arguments.length - 1];
var seen = {one: [], two: []};
window.__seen = seen;
window.__errors = [];
window.addEventListener('error', function (e) { window.__errors.push(String(e.message)); });
"""

TWO_SUBSCRIPTIONS = (
    RECORDING
    + """
function subscribe(name) {
    var sub = Comet.subscribe({
        sse: '/t/stream/?channels=' + channel, poll: '/t/fastpoll/?channel=' + channel,
        onEvent: function (e) { seen[name].push(e.data.text); if (name === 'two') { sub.close(); } },
        onState: function (mode) { if (mode === 'live (sse)') { done(true); } }
    });
}
subscribe('one');
subscribe('two');  // says hello before 'one' holds the lock
"""
)


def test_a_second_subscription_to_the_same_stream_hears_it_too(beating, new_browser):
    """The second subscription says hello before the first holds the lock, so no one
    welcomes it then: it says hello again when the first takes over.  Its onEvent
    closes it, which must raise nothing."""
    page = new_browser("twice")
    page.get(beating.url + "/t/echo/")
    assert page.execute_async_script(LOAD_COMET_JS)
    channel = unique("twice-").replace(" ", "")
    assert page.execute_async_script(TWO_SUBSCRIPTIONS, channel)
    text = unique("to both subscriptions:")
    publish(beating, channel, {"name": "Probe", "text": text})
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(page, 20).until(
        lambda d: d.execute_script("return window.__seen.one.length && window.__seen.two.length")
    )
    seen = page.execute_script("return window.__seen")
    assert seen == {"one": [text], "two": [text]}, seen
    assert page.execute_script("return window.__errors") == []


MUTATING_ON_EVENT = (
    RECORDING
    + """
var url = {sse: '/t/stream/?channels=' + channel, poll: '/t/fastpoll/?channel=' + channel};
Comet.subscribe({sse: url.sse, poll: url.poll, onEvent: function (e) {
    seen.one.push(e.data.text);
    e.data.row = document.createElement('li');  // what a page may well do with it
}, onState: function (mode) { if (mode === 'live (sse)') { done(true); } }});
Comet.subscribe({sse: url.sse, poll: url.poll, onEvent: function (e) {
    seen.two.push(JSON.stringify(e.data));
}});
"""
)


def test_what_a_page_does_to_an_events_data_stays_in_that_subscription(beating, new_browser):
    """The connected subscription passed on the very object its page had just been
    handed: an element put in it could not be cloned, and the other subscriptions
    got nothing (or got the page's changes)."""
    page = new_browser("mutating")
    page.get(beating.url + "/t/echo/")
    assert page.execute_async_script(LOAD_COMET_JS)
    channel = unique("mutating-").replace(" ", "")
    assert page.execute_async_script(MUTATING_ON_EVENT, channel)
    texts = [unique("mutated:") for _ in range(2)]
    for text in texts:
        publish(beating, channel, {"name": "P", "text": text})
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(page, 20).until(
        lambda d: d.execute_script("return window.__seen.two.length") == 2
    )
    seen = page.execute_script("return window.__seen")
    assert seen["one"] == texts
    assert seen["two"] == [f'{{"name":"P","text":"{text}"}}' for text in texts]
    assert page.execute_script("return window.__errors") == []


QUEUED_AND_CLOSED = """
var channel = arguments[0];
var done = arguments[arguments.length - 1];
var url = {sse: '/t/stream/?channels=' + channel, poll: '/t/fastpoll/?channel=' + channel};
Comet.subscribe({sse: url.sse, poll: url.poll, onEvent: function () {},
                 onState: function (mode) {
    if (mode !== 'live (sse)' || window.started) { return; }
    window.started = true;
    for (var n = 0; n < 20; n++) {  // each waits for the lock the first one holds
        Comet.subscribe({sse: url.sse, poll: url.poll, onEvent: function () {}}).close();
    }
    navigator.locks.query().then(function (state) { done(state.pending.length); });
}});
"""


def test_a_closed_subscription_leaves_no_lock_request_queued(comet, new_browser):
    """A subscription closed while another held the stream left its request for the
    lock queued, holding it (and what it kept) until that one let go."""
    page = new_browser("queued")
    page.get(comet.url + "/t/echo/")
    assert page.execute_async_script(LOAD_COMET_JS)
    channel = unique("queued-").replace(" ", "")
    assert page.execute_async_script(QUEUED_AND_CLOSED, channel) == 0


BUFFERED = """
window.got = [];
window.states = [];
Comet.subscribe({sse: '/t/stream/?channels=' + arguments[0],
                 poll: '/t/fastpoll/?channel=' + arguments[0],
                 openTimeout: 500, streamAgain: 1000, shareTabs: false,
                 onEvent: function (event) { window.got.push(event.id); },
                 onState: function (state) { window.states.push(state); }});
"""


def test_a_proxy_that_buffers_streams_makes_the_page_fall_back_to_long_poll(comet, new_browser):
    """Behind a proxy that passes a stream's head and holds its body, the page must not
    say it is live (it would show nothing until the stream ends, an hour later): no
    first frame within openTimeout counts as a failure, and three of them switch to
    long-poll, through which events arrive."""
    channel = unique("buffered-").replace(" ", "")
    proxy = Proxy(comet.port, buffer_answer_to=b"/t/stream/")
    try:
        page = new_browser("buffering-proxy")
        page.get(f"http://127.0.0.1:{proxy.port}/t/echo/")
        assert page.execute_async_script(LOAD_COMET_JS)
        page.execute_script(BUFFERED, channel)
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(page, 60).until(
            lambda d: "live (long-poll)" in d.execute_script("return window.states")
        )
        published = requests.post(
            comet.url + "/t/publish/", data={"channel": channel, "data": '"through"'}, timeout=30
        ).json()["id"]
        WebDriverWait(page, 30).until(lambda d: d.execute_script("return window.got.length"))
        assert page.execute_script("return window.got") == [published]
        assert "live (sse)" not in page.execute_script("return window.states")
        # The proxy mends its ways: a while later the page tries a stream again.
        proxy.buffer_answer_to = None
        WebDriverWait(page, 60).until(
            lambda d: d.execute_script("return window.states").pop() == "live (sse)"
        )
        comet.wait_for_status(lambda s: s["channels"].get(channel) == 1)
        published = requests.post(
            comet.url + "/t/publish/", data={"channel": channel, "data": '"streamed"'}, timeout=30
        ).json()["id"]
        WebDriverWait(page, 30).until(lambda d: len(d.execute_script("return window.got")) == 2)
        assert page.execute_script("return window.got")[1] == published
    finally:
        proxy.close()


REFUSED = """
window.states = [];
window.refusals = [];
Comet.subscribe({sse: arguments[0], poll: arguments[1], forcePoll: arguments[2],
                 shareTabs: !!arguments[3], onEvent: function () {},
                 onState: function (state) { window.states.push(state); },
                 onRefused: function (info) { window.refusals.push(info); }});
"""


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
    page = new_browser("poll-refused")
    page.get(comet.url + "/t/echo/")
    assert page.execute_async_script(LOAD_COMET_JS)
    page.execute_script(REFUSED, None, poll, True)
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(page, 30).until(lambda d: d.execute_script("return window.refusals.length"))
    assert page.execute_script("return [window.states, window.refusals]") == [
        ["refused"],
        [{"status": status, "url": comet.url + url}],
    ]


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
    page = new_browser("stream-refused")
    page.get(comet.url + "/t/echo/")
    assert page.execute_async_script(LOAD_COMET_JS)
    page.execute_script(REFUSED, sse, poll, False)
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(page, 30).until(lambda d: d.execute_script("return window.refusals.length"))
    assert page.execute_script("return [window.states, window.refusals]") == [
        ["refused"],
        [{"status": status, "url": comet.url + url}],
    ]


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


SHARE_KEYS = """
var channel = arguments[0];
['alice', 'bob'].forEach(function (user) {
    Comet.subscribe({sse: '/t/stream/?channels=' + channel, poll: '/nowhere/',
                     shareKey: user, onEvent: function () {}});
});
"""


def test_subscriptions_with_different_share_keys_do_not_share_a_stream(comet, new_browser):
    """Tabs share a stream only with the same shareKey: one opened for another signed-in
    user must not be handed over."""
    page = new_browser("share-keys")
    page.get(comet.url + "/t/echo/")
    assert page.execute_async_script(LOAD_COMET_JS)
    channel = unique("keyed-").replace(" ", "")
    page.execute_script(SHARE_KEYS, channel)
    comet.wait_for_status(lambda s: s["channels"].get(channel) == 2)


ROOM = """
var done = arguments[arguments.length - 1];
window.got = [];
Comet.subscribe({sse: 'events/', poll: 'poll/',
                 onEvent: function (event) { window.got.push(event.data); },
                 onState: function (mode) { if (mode === 'live (sse)') { done(true); } }});
"""


def test_tabs_whose_relative_endpoints_name_other_streams_do_not_share_them(comet, new_browser):
    """Two rooms' pages subscribe with the same relative URLs ("events/"), which name
    two streams: the second room's tab was handed the first one's stream, and got that
    room's events, never its own."""
    rooms = [unique("room-").replace(" ", "") for _ in range(2)]
    page = new_browser("rooms")

    def subscribe_in_room(room):
        page.get(f"{comet.url}/t/rooms/{room}/")
        assert page.execute_async_script(LOAD_COMET_JS)
        assert page.execute_async_script(ROOM)

    tabs = in_tabs(page, rooms, subscribe_in_room)
    texts = [unique(f"to {room}:") for room in rooms]
    for room, text in zip(rooms, texts, strict=True):
        publish(comet, room, text)
    for handle, text in zip(tabs, texts, strict=True):
        page.switch_to.window(handle)
        deadline = time.monotonic() + 30
        while text not in page.execute_script("return window.got"):
            assert time.monotonic() < deadline, page.execute_script("return window.got")
            time.sleep(0.05)
        assert page.execute_script("return window.got") == [text]
    assert all(comet.status()["channels"].get(room) == 1 for room in rooms)


def test_relative_endpoints_are_resolved_as_the_browser_does_against_a_base(comet, new_browser):
    """A page with <base href>: EventSource and XHR resolve "events/" against it; comet.js
    resolved it against the page's own address, and subscribed to another stream."""
    page_room, base_room = (unique("room-").replace(" ", "") for _ in range(2))
    page = new_browser("base")
    page.get(f"{comet.url}/t/rooms/{page_room}/")
    page.execute_script(
        "var base = document.createElement('base');"
        "base.href = arguments[0]; document.head.appendChild(base);",
        f"/t/rooms/{base_room}/",
    )
    assert page.execute_async_script(LOAD_COMET_JS)
    assert page.execute_async_script(ROOM)
    publish(comet, page_room, "to the page's room")
    publish(comet, base_room, "to the base's room")
    deadline = time.monotonic() + 30
    while not page.execute_script("return window.got"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert page.execute_script("return window.got") == ["to the base's room"]


TAB = """
var done = arguments[arguments.length - 1];
window.marker = 'not reloaded';
window.got = [];
Comet.subscribe({sse: '/t/stream/?channels=' + arguments[0],
                 poll: '/t/fastpoll/?channel=' + arguments[0],
                 onEvent: function (event) { window.got.push(event.data); },
                 onState: function (mode) { if (mode === 'live (sse)') { done(true); } }});
"""


def test_a_tab_in_the_back_forward_cache_lets_the_others_take_over(comet, new_browser):
    """The connected tab, put in the back/forward cache by a link the user followed,
    kept the lock: the other tabs heard nothing until the browser evicted it.  It lets
    go, and when the user comes back, subscribes again from its last id."""
    channel = unique("bfcache-").replace(" ", "")
    page = new_browser("bfcache")

    def subscribe(_):
        page.get(comet.url + "/t/echo/")
        assert page.execute_async_script(LOAD_COMET_JS)
        assert page.execute_async_script(TAB, channel)

    tabs = in_tabs(page, range(2), subscribe)
    comet.wait_for_status(lambda s: s["channels"].get(channel) == 1)  # the first tab's

    def wait_for(handle, text, timeout=30.0):
        page.switch_to.window(handle)
        deadline = time.monotonic() + timeout
        while text not in page.execute_script("return window.got"):
            assert time.monotonic() < deadline, page.execute_script("return window.got")
            time.sleep(0.05)

    texts = [unique(when) for when in ("before:", "while away:", "after coming back:")]
    publish(comet, channel, texts[0])
    wait_for(tabs[1], texts[0])
    page.switch_to.window(tabs[0])
    page.get(comet.url + "/t/echo/?away")  # into the back/forward cache
    publish(comet, channel, texts[1])
    wait_for(tabs[1], texts[1], timeout=15)  # not after Chromium evicts the page
    page.switch_to.window(tabs[0])
    page.back()
    assert page.execute_script("return window.marker") == "not reloaded"  # from the cache
    publish(comet, channel, texts[2])
    for handle in tabs:
        wait_for(handle, texts[2])
        assert page.execute_script("return window.got") == texts
    comet.wait_for_status(lambda s: s["channels"].get(channel) == 1)


OLDER_JOINER = """
var channel = arguments[0], ids = arguments[1];
var done = arguments[arguments.length - 1];
window.joiner = {events: [], gaps: 0};
Comet.subscribe({sse: '/t/stream/?channels=' + channel, poll: '/nowhere/',
                 lastId: ids[4], onEvent: function () {},
                 onState: function (mode) {
    if (mode !== 'live (sse)' || window.joinerStarted) { return; }
    window.joinerStarted = true;
    // A second subscription joins with an older cursor: the connected one never saw
    // what came between, so it must be told of a gap, not handed a silent hole.
    Comet.subscribe({sse: '/t/stream/?channels=' + channel, poll: '/nowhere/',
                     lastId: ids[1],
                     onEvent: function (e) { window.joiner.events.push(e.id); },
                     onGap: function () { window.joiner.gaps += 1; }});
    done(true);
}});
"""


def test_a_tab_joining_with_an_older_cursor_hears_of_the_gap(comet, new_browser):
    channel = unique("older-").replace(" ", "")
    ids = [
        requests.post(
            comet.url + "/t/publish/", data={"channel": channel, "data": str(n)}, timeout=30
        ).json()["id"]
        for n in range(7)
    ]
    page = new_browser("older-joiner")
    page.get(comet.url + "/t/echo/")
    assert page.execute_async_script(LOAD_COMET_JS)
    assert page.execute_async_script(OLDER_JOINER, channel, ids)
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(page, 30).until(lambda d: d.execute_script("return window.joiner.gaps"))
    assert page.execute_script("return window.joiner") == {"events": ids[5:], "gaps": 1}


JOINER_AFTER = """
var channel = arguments[0], firstLastId = arguments[1], joinerLastId = arguments[2];
var done = arguments[arguments.length - 1];
window.joiner = {events: [], gaps: 0};
Comet.subscribe({sse: '/t/stream/?channels=' + channel, poll: '/nowhere/',
                 lastId: firstLastId, onEvent: function () {}, onState: function (mode) {
    if (mode !== 'live (sse)' || window.joinerStarted) { return; }
    window.joinerStarted = true;
    Comet.subscribe({sse: '/t/stream/?channels=' + channel, poll: '/nowhere/',
                     lastId: joinerLastId,
                     onEvent: function (e) { window.joiner.events.push(e.id); },
                     onGap: function () { window.joiner.gaps += 1; }});
    setTimeout(function () { done(true); }, 0);
}});
"""


def published(server, channel, count):
    return [
        requests.post(
            server.url + "/t/publish/", data={"channel": channel, "data": str(n)}, timeout=30
        ).json()["id"]
        for n in range(count)
    ]


@pytest.mark.parametrize(
    ("first", "joiner", "expected"),
    [
        # From 0 the connected tab has the history, no further: one older is a gap (the
        # tab said it had seen everything since 0).
        ("zero", "older", {"events": "history", "gaps": 1}),
        # A cursor read back from storage is text: the gap it got made its own mark ten
        # times too large, and a tab joining up to date was told of a gap.
        ("text", "newest", {"events": [], "gaps": 0}),
    ],
)
def test_a_joining_tab_hears_of_a_gap_only_when_it_missed_events(
    comet, new_browser, first, joiner, expected
):
    channel = unique("joiner-").replace(" ", "")
    ids = published(comet, channel, 103)  # the history keeps 100
    page = new_browser("joiner-" + first)
    page.get(comet.url + "/t/echo/")
    assert page.execute_async_script(LOAD_COMET_JS)
    first_last_id = 0 if first == "zero" else str(ids[0])
    joiner_last_id = ids[1] if joiner == "older" else ids[-1]
    assert page.execute_async_script(JOINER_AFTER, channel, first_last_id, joiner_last_id)
    from selenium.webdriver.support.ui import WebDriverWait

    # Then one more event: once the joiner has it, it has had all it is to get.
    later = published(comet, channel, 1)
    WebDriverWait(page, 30).until(
        lambda d: later[0] in d.execute_script("return window.joiner.events")
    )
    events = (ids[3:] if expected["events"] == "history" else []) + later
    assert page.execute_script("return window.joiner") == {**expected, "events": events}


WAITING_POLL = """
window.states = [];
Comet.subscribe({poll: '/t/fastpoll/?channel=' + arguments[0] + '&timeout=60', forcePoll: true,
                 lastId: 1, shareTabs: false, onEvent: function () {},
                 onState: function (state) { window.states.push(state); }});
"""


def test_a_waiting_poll_shows_as_live(comet, new_browser):
    """A poll that waits for the next event is live: the server begins its answer at
    once (a space), since a browser tells a script of an answer only with its body."""
    channel = unique("waiting-").replace(" ", "")
    page = new_browser("waiting-poll")
    page.get(comet.url + "/t/echo/")
    assert page.execute_async_script(LOAD_COMET_JS)
    page.execute_script(WAITING_POLL, channel)
    comet.wait_for_status(lambda s: s["channels"].get(channel) == 1)
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(page, 30).until(lambda d: d.execute_script("return window.states.length"))
    assert page.execute_script("return window.states") == ["live (long-poll)"]
    assert comet.status()["channels"].get(channel) == 1  # still waiting: no answer yet


BACK_ONLINE = """
var channel = arguments[0], mode = arguments[1];
window.got = []; window.states = []; window.backoffs = [];
// The network is down for the first connection only (a port nobody listens on: a
// network error; a 404 would be a refusal).
var realOpen = XMLHttpRequest.prototype.open, polls = 0;
XMLHttpRequest.prototype.open = function (method, url) {
    polls += 1;
    return realOpen.call(this, method, polls === 1 ? 'http://127.0.0.1:1/' : url);
};
var RealEventSource = window.EventSource, streams = 0;
window.EventSource = function (url) {
    streams += 1;
    return new RealEventSource(streams === 1 ? '/nowhere/' : url);
};
window.EventSource.CLOSED = RealEventSource.CLOSED;
// Backoffs and watchdogs never fire: only the online event can reconnect.
var realSetTimeout = window.setTimeout;
window.setTimeout = function (callback, ms) {
    if (ms) { window.backoffs.push(ms); return 0; }
    return realSetTimeout(callback, 0);
};
Comet.subscribe({sse: '/t/stream/?channels=' + channel,
                 poll: '/t/fastpoll/?channel=' + channel + '&timeout=60',
                 forcePoll: mode === 'poll', shareTabs: false,
                 onEvent: function (event) { window.got.push(event.id); },
                 onState: function (state) { window.states.push(state); }});
"""


@pytest.mark.parametrize("mode", ["sse", "poll"])
def test_the_network_coming_back_reconnects_at_once(comet, new_browser, mode):
    """After a failure, the browser's `online` event reconnects without waiting out the
    backoff (up to 30 s), in both modes."""
    from selenium.webdriver.support.ui import WebDriverWait

    channel = unique(f"online-{mode}-").replace(" ", "")
    page = new_browser(f"online-{mode}")
    page.get(comet.url + "/t/echo/")
    assert page.execute_async_script(LOAD_COMET_JS)
    page.execute_script(BACK_ONLINE, channel, mode)
    WebDriverWait(page, 30).until(
        lambda d: d.execute_script("return window.states.indexOf('reconnecting…') !== -1")
    )
    assert channel not in comet.status()["channels"]  # waiting out its backoff
    page.execute_script("window.dispatchEvent(new Event('online'))")
    comet.wait_for_status(lambda s: s["channels"].get(channel) == 1)
    published = requests.post(
        comet.url + "/t/publish/", data={"channel": channel, "data": '"back"'}, timeout=30
    ).json()["id"]
    WebDriverWait(page, 30).until(lambda d: d.execute_script("return window.got.length"))
    assert page.execute_script("return window.got") == [published]
    live = "live (sse)" if mode == "sse" else "live (long-poll)"
    assert page.execute_script("return window.states") == ["reconnecting…", live]


LIVE_THEN_BUFFERED = """
window.got = [];
window.states = [];
Comet.subscribe({sse: '/t/stream/?channels=' + arguments[0],
                 poll: '/t/fastpoll/?channel=' + arguments[0],
                 openTimeout: 500, streamAgain: 600000, shareTabs: false,
                 onEvent: function (event) { window.got.push(event.id); },
                 onState: function (state) { window.states.push(state); }});
"""


def test_a_page_whose_streams_worked_falls_back_when_a_proxy_starts_buffering(beating, new_browser):
    """A live page whose network starts buffering streams (a laptop moved behind such a
    proxy): its stream stalls, and the streams it opens next give no frame; three of
    them switch it to long-poll, as they do a page that never streamed."""
    from selenium.webdriver.support.ui import WebDriverWait

    channel = unique("rebuffered-").replace(" ", "")
    proxy = Proxy(beating.port)
    try:
        page = new_browser("buffering-later")
        page.get(f"http://127.0.0.1:{proxy.port}/t/echo/")
        assert page.execute_async_script(LOAD_COMET_JS)
        page.execute_script(LIVE_THEN_BUFFERED, channel)
        WebDriverWait(page, 30).until(
            lambda d: (d.execute_script("return window.states") or [""])[-1] == "live (sse)"
        )
        proxy.buffer_answer_to = b"/t/stream/"
        proxy.freeze()  # the live stream goes silent; the next ones are held back
        WebDriverWait(page, 60).until(
            lambda d: (d.execute_script("return window.states") or [""])[-1] == "live (long-poll)"
        )
        published = requests.post(
            beating.url + "/t/publish/", data={"channel": channel, "data": '"polled"'}, timeout=30
        ).json()["id"]
        WebDriverWait(page, 30).until(lambda d: d.execute_script("return window.got"))
        assert page.execute_script("return window.got") == [published]
    finally:
        proxy.close()


MUTED_POLL = """
window.got = [];
window.states = [];
Comet.subscribe({poll: '/t/mutepoll/?timeout=30&channel=' + arguments[0], forcePoll: true,
                 pollTimeout: 60000, openTimeout: 1000, shareTabs: false,
                 onEvent: function (event) { window.got.push(event.id); },
                 onState: function (state) { window.states.push(state); }});
"""


def test_a_poll_that_gets_no_first_byte_is_retried_at_once(demo_db, new_browser):
    """poll_response answers with a space at once.  A poll that gets none (sent on a
    connection that died without a word: the browser reuses idle ones after a network
    blip) is retried after openTimeout, not after pollTimeout (a minute, and as long
    again if the retry also went out on a dead one)."""
    from selenium.webdriver.support.ui import WebDriverWait

    server = runcomet(db=demo_db, env={"TEST_GRACE_PERIOD": "1"})
    channel = unique("muted-").replace(" ", "")
    try:
        page = new_browser("muted-poll")
        page.get(server.url + "/t/echo/")
        assert page.execute_async_script(LOAD_COMET_JS)
        page.execute_script(MUTED_POLL, channel)
        server.wait_for_status(lambda s: s["channels"].get(channel) == 1)  # waiting
        publish = server.url + "/t/publish/"
        first = requests.post(publish, data={"channel": channel, "data": "1"}, timeout=30)
        WebDriverWait(page, 30).until(lambda d: d.execute_script("return window.got"))
        # The next poll (after the first id) gets no byte for 20 s: it is given up.
        second = requests.post(publish, data={"channel": channel, "data": "2"}, timeout=30)
        WebDriverWait(page, 15).until(lambda d: len(d.execute_script("return window.got")) == 2)
        ids = [first.json()["id"], second.json()["id"]]
        assert page.execute_script("return window.got") == ids
    finally:
        server.stop()

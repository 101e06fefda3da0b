"""comet.js in headless Chromium where the network misbehaves: a stream that stalls
without closing is reopened, a stream that keeps failing is retried with backoff rather
than at every ``retry:`` interval, a proxy that buffers streams sends the page to
long-poll, and the network coming back reconnects at once."""

from __future__ import annotations

import time

import pytest
import requests

from .browser import LOAD_COMET_JS
from .processes import runcomet
from .proxy import Proxy
from .publishing import publish
from .test_browser_chat import new_browser, open_chat, unique, wait_for_message

__all__ = ["new_browser"]  # a fixture, used by name

pytestmark = pytest.mark.browser


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


def test_a_stream_with_nothing_to_replay_gives_the_page_its_cursor(comet, new_browser):
    """A page on a quiet channel kept cursor 0 until its first event, and so asked
    afresh after a restart, never told what the old process published meanwhile: the
    first heartbeat's id is its cursor now (test_sse's restart test has the rest)."""
    from selenium.webdriver.support.ui import WebDriverWait

    channel = unique("quiet-").replace(" ", "")
    page = new_browser("quiet-cursor")
    page.get(comet.url + "/t/echo/")
    assert page.execute_async_script(LOAD_COMET_JS)
    page.execute_script(
        "window.sub = Comet.subscribe({sse: '/t/stream/?channels=' + arguments[0],"
        " onEvent: function () {}, shareTabs: false});",
        channel,
    )
    comet.wait_for_status(lambda s: s["channels"].get(channel) == 1)
    cursor = WebDriverWait(page, 30).until(lambda d: d.execute_script("return window.sub.lastId"))
    published = requests.post(
        comet.url + "/t/publish/", data={"channel": "elsewhere", "data": '"x"'}, timeout=30
    ).json()["id"]
    assert 0 < cursor < published


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

"""comet.js in headless Chromium: the tabs of one browser share one stream (through Web
Locks and a BroadcastChannel), and only the subscriptions that ask for the same thing,
for the same user, share it."""

from __future__ import annotations

import time

import pytest
import requests

from .browser import LOAD_COMET_JS, in_tabs
from .publishing import publish
from .test_browser_chat import new_browser, open_chat, say, unique, wait_for_message

__all__ = ["new_browser"]  # a fixture, used by name

pytestmark = pytest.mark.browser


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


TAKE_OVER = """
window.urls = [];
var Real = window.EventSource;
window.EventSource = function (url) { window.urls.push(url); return new Real(url); };
window.EventSource.CLOSED = Real.CLOSED;
window.sub = Comet.subscribe({sse: '/t/stream/?channels=' + arguments[0],
                             onEvent: function () {}});
"""


def test_a_tab_that_takes_over_connects_from_the_cursor_the_stream_gave(comet, new_browser):
    """A stream with nothing to replay gives its cursor on its first heartbeat: only the
    connected tab took it, and a tab that took over after it closed asked afresh
    (lastEventId=0), never told of what a restart lost (found by a diff review)."""
    from selenium.webdriver.support.ui import WebDriverWait

    channel = unique("take-over-").replace(" ", "")
    page = new_browser("take-over")
    page.get(comet.url + "/t/echo/")
    leader = page.current_window_handle
    assert page.execute_async_script(LOAD_COMET_JS)
    page.execute_script(TAKE_OVER, channel)
    cursor = WebDriverWait(page, 30).until(lambda d: d.execute_script("return window.sub.lastId"))
    page.switch_to.new_window("tab")
    follower = page.current_window_handle
    page.get(comet.url + "/t/echo/")
    assert page.execute_async_script(LOAD_COMET_JS)
    page.execute_script(TAKE_OVER, channel)
    # Joined (the welcome carries the cursor): it has the leader's.
    WebDriverWait(page, 30).until(lambda d: d.execute_script("return window.sub.lastId"))
    assert page.execute_script("return window.sub.lastId") == cursor
    assert page.execute_script("return window.urls") == []  # following, not connected
    page.switch_to.window(leader)
    page.close()  # the connected tab goes: the follower takes the lock and connects
    page.switch_to.window(follower)
    WebDriverWait(page, 30).until(lambda d: d.execute_script("return window.urls.length"))
    (url,) = page.execute_script("return window.urls")
    assert url.endswith(f"&lastEventId={cursor}"), (url, cursor)


LEAD = """
var channel = arguments[0], done = arguments[arguments.length - 1];
window.a = {events: []};
window.subA = Comet.subscribe({sse: '/t/stream/?channels=' + channel,
    onEvent: function (e) { window.a.events.push(e.id); },
    onState: function (m) { if (m === 'live (sse)') { done(true); } }});
"""

JOIN_AHEAD = """
window.b = {events: [], gaps: 0};
window.subB = Comet.subscribe({sse: '/t/stream/?channels=' + arguments[0],
    lastId: arguments[1],
    onEvent: function (e) { window.b.events.push(e.id); },
    onGap: function () { window.b.gaps += 1; }});
"""


def test_a_tab_joining_with_a_cursor_from_before_the_ids_went_back_hears_of_it(comet, new_browser):
    """A cursor ahead of the connected tab's is from before the ids went back (a reset
    database; a cursor kept in storage): on its own connection the server tells it a gap
    and sends what there is; joining a shared one, it got nothing and dropped every event
    until the ids passed it (found by a review)."""
    from selenium.webdriver.support.ui import WebDriverWait

    channel = unique("ahead-").replace(" ", "")
    ids = [publish(comet, channel, {"n": n}) for n in range(3)]
    page = new_browser("ahead")
    page.get(comet.url + "/t/echo/")
    assert page.execute_async_script(LOAD_COMET_JS)
    assert page.execute_async_script(LEAD, channel)
    WebDriverWait(page, 30).until(lambda d: d.execute_script("return window.a.events") == ids)
    page.execute_script(JOIN_AHEAD, channel, ids[-1] + 10**6)
    WebDriverWait(page, 30).until(lambda d: d.execute_script("return window.b.gaps"))
    later = publish(comet, channel, {"n": 3})
    WebDriverWait(page, 30).until(lambda d: later in d.execute_script("return window.b.events"))
    assert page.execute_script("return window.b") == {"events": [*ids, later], "gaps": 1}


FAKE_POLLS = """
window.polls = [];
function FakeXHR() { this.readyState = 0; this.status = 0; this.responseText = ''; }
FakeXHR.prototype.open = function (method, url) { this.url = url; };
FakeXHR.prototype.setRequestHeader = function () {};
FakeXHR.prototype.getResponseHeader = function () { return 'application/json'; };
FakeXHR.prototype.abort = function () { this.aborted = true; };
FakeXHR.prototype.send = function () { window.polls.push(this); };
window.XMLHttpRequest = FakeXHR;
window.answer = function (i, body) {  // the i-th poll is answered with ``body``
  var xhr = window.polls[i];
  xhr.readyState = 4; xhr.status = 200; xhr.responseText = JSON.stringify(body);
  if (xhr.onload) { xhr.onload(); }
  if (xhr.onloadend) { xhr.onloadend(); }
};
window.sub = function () {
  return Comet.subscribe({poll: '/fake/poll/', forcePoll: true, onEvent: function () {}});
};
window.A = window.sub();
"""


def test_long_poll_ids_that_go_back_reach_the_other_tabs(comet, new_browser):
    """The connected tab's poll answer says the ids went back (last_id 3 after 10): it
    took the new cursor, the other tabs kept 10, and one that took over polled from 10
    and was told of the same gap again (found by a review)."""
    from selenium.webdriver.support.ui import WebDriverWait

    page = new_browser("poll-back")
    page.get(comet.url + "/t/echo/")
    assert page.execute_async_script(LOAD_COMET_JS)
    page.execute_script(FAKE_POLLS)

    def polls():
        return page.execute_script("return window.polls.map(function (x) { return x.url; })")

    WebDriverWait(page, 30).until(lambda d: len(polls()) == 1)
    page.execute_script("window.answer(0, {events: [{id: 10, data: 1}], last_id: 10});")
    WebDriverWait(page, 30).until(lambda d: len(polls()) == 2)
    page.execute_script("window.B = window.sub();")
    WebDriverWait(page, 30).until(lambda d: d.execute_script("return window.B.lastId") == 10)
    page.execute_script("window.answer(1, {events: [], last_id: 3, gap: true});")
    WebDriverWait(page, 30).until(lambda d: d.execute_script("return window.B.lastId") == 3)
    page.execute_script("window.A.close();")  # the other tab takes over
    WebDriverWait(page, 30).until(lambda d: len(polls()) >= 4)
    assert polls()[-1].endswith("since=3"), polls()

"""The demo's staged response, rendered progressively by a real (headless) Chromium.

The server sends ``First content<br /> `` at once and then one more chunk a second
until ``last_stage4<br /> ``, all on one chunked response.  A browser must show each
chunk as it arrives, not only the finished page.  The assertions are about the order
of what the page shows (polled from ``document.body.innerText``), never about timings.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from .browser import CHROMEDRIVER, CHROMIUM, add_flags
from .processes import ROOT

# Written to docs/ (the picture in the README) only when asked, so that a test run leaves
# the work tree clean: SAVE_SCREENSHOTS=1 pytest tests/test_browser.py
SCREENSHOT = (
    ROOT / "docs" / "staged-demo.png"
    if os.environ.get("SAVE_SCREENSHOTS")
    else Path(tempfile.gettempdir()) / "staged-demo.png"
)
PIECES = ["First content", "stage1", "stage2", "stage3", "last_stage4"]

# What one poll sees: which document, how far it has loaded and the text it shows.
SNAPSHOT_JS = """
return {
    href: location.href,
    readyState: document.readyState,
    text: document.body ? document.body.innerText : ""
};
"""

pytestmark = pytest.mark.browser


@pytest.fixture
def chromium(tmp_path):
    """A headless Chromium through chromedriver, always quit afterwards."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(
            f"headless Chromium tests need {' and '.join(missing)} "
            "(Debian packages chromium and chromium-driver)"
        )
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    options.page_load_strategy = "none"  # driver.get returns before the response ends
    add_flags(options, tmp_path / "chromium-profile", "640,360")
    service = Service(CHROMEDRIVER, log_output=subprocess.DEVNULL)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def poll_until(driver, url, predicate, seen, timeout=20.0):
    """Poll the page until ``predicate(snapshot)`` holds (with a deadline) and return
    that snapshot; every distinct text of ``url``'s document goes into ``seen``."""
    deadline = time.monotonic() + timeout
    while True:
        snap = driver.execute_script(SNAPSHOT_JS)
        if snap["href"] == url:  # not the about:blank that precedes the navigation
            if snap["text"] and (not seen or seen[-1] != snap["text"]):
                seen.append(snap["text"])
            if predicate(snap):
                return snap
        if time.monotonic() > deadline:
            raise AssertionError(f"page never satisfied the condition: {snap!r}; seen {seen!r}")
        time.sleep(0.02)


def assert_in_order(text, pieces):
    position = -1
    for piece in pieces:
        found = text.find(piece, position + 1)
        assert found > position, f"{piece!r} missing or out of order in {text!r}"
        position = found


def test_demo_renders_progressively(comet, chromium):
    url = comet.url + "/"
    seen: list[str] = []
    chromium.get(url)

    first = poll_until(chromium, url, lambda s: "First content" in s["text"], seen)
    # The first chunk is on screen while the response is still going on.
    assert "last_stage4" not in first["text"], first
    assert first["readyState"] != "complete", first

    final = poll_until(chromium, url, lambda s: "last_stage4" in s["text"], seen)
    assert_in_order(final["text"], PIECES)
    # The page reached 'complete' only once the last chunk was there.
    poll_until(chromium, url, lambda s: s["readyState"] == "complete", seen)

    # Each state grew out of the previous one, and several came before the final one.
    for before, after in itertools.pairwise(seen):
        assert after.startswith(before.rstrip()), (before, after)
    intermediate = [text for text in seen if "last_stage4" not in text]
    assert len(set(intermediate)) >= 3, seen
    assert intermediate[0].strip() == "First content", seen

    SCREENSHOT.parent.mkdir(exist_ok=True)
    assert chromium.save_screenshot(str(SCREENSHOT))


# comet.js under fake EventSource, XMLHttpRequest and timers, in the browser's own engine.
FAKES = """
var timers = [], sources = [], xhrs = [], timerIds = 0;
window.setTimeout = function (f, d) { timers.push({f: f, d: d, id: ++timerIds}); return timerIds; };
window.clearTimeout = function (id) {
  timers = timers.filter(function (t) { return t.id !== id; });
};
function FakeSource(url) { this.url = url; this.readyState = 0; this.listeners = {}; sources.push(this); }
FakeSource.CLOSED = 2;
FakeSource.prototype.addEventListener = function (n, f) { this.listeners[n] = f; };
FakeSource.prototype.close = function () { this.readyState = 2; };
window.EventSource = FakeSource;
function FakeXHR() { xhrs.push(this); }
FakeXHR.prototype.open = function (m, u) { this.url = u; };
FakeXHR.prototype.send = function () {};
FakeXHR.prototype.abort = function () {};
FakeXHR.prototype.setRequestHeader = function () {};
FakeXHR.prototype.getResponseHeader = function () { return null; };
window.XMLHttpRequest = FakeXHR;
function polls() { return xhrs.filter(function (x) { return x.url.indexOf('/p/') === 0; }); }
// The first timer set to at most ``within`` ms, run.
function runTimer(within) {
  var t = timers.filter(function (t) { return t.d <= within; })[0];
  if (t) { timers.splice(timers.indexOf(t), 1); try { t.f(); } catch (e) {} }
  return t;
}
"""

SCENARIO = """
var got = [], waits = [];
var sub = window.Comet.subscribe({sse: '/e/', poll: '/p/', onEvent: function (e) {
  got.push(e.id);
  if (e.id === 1) { throw new Error('a page bug'); }
}});
for (var i = 0; i < 3; i++) {  // the SSE endpoint answers an HTTP error, three times
  var s = sources[sources.length - 1];
  s.readyState = 2;
  s.onerror();
  var asked = xhrs[xhrs.length - 1];  // why: a server error (no refusal)
  asked.readyState = 2; asked.status = 503; asked.onreadystatechange();
  if (i < 2) { waits.push(timers[0].d); runTimer(30000); }  // the only timer: a backoff
}
var x = polls()[0];
x.status = 200;
x.responseText = JSON.stringify({last_id: 3, events: [
  {id: 1, data: 'a'}, {id: 2, data: 'b'}, {id: 3, data: 'c', event: 'private'}]});
x.onload();
while (runTimer(0)) {}
var later = timers.map(function (t) { return t.d; });  // a stream is tried again, later
return {sources: sources.length, asked: xhrs.length - polls().length, polls: polls().length, got: got, lastId: sub.lastId, waits: waits,
        later: later};
"""


def test_comet_js_falls_back_backs_off_and_survives_a_page_bug(chromium):
    source = (ROOT / "django_comet" / "static" / "django_comet" / "comet.js").read_text()
    chromium.get("about:blank")
    result = chromium.execute_script(FAKES + source + SCENARIO)
    assert result["sources"] == 3  # the first and two retries, then long-poll
    assert result["asked"] == 3  # why each stream was given up
    assert result["polls"] == 2  # the first poll, and the next despite the throw
    assert result["got"] == [1, 2]  # the throw on 1 lost nothing; "private" not asked for
    assert result["lastId"] == 3
    assert all(500 <= wait <= 30000 for wait in result["waits"])  # backoff, not a tight loop
    assert result["later"] == [60000]


def test_events_given_as_one_name_is_refused_at_once(chromium):
    """``events: 'chat'`` was taken letter by letter: with tabs shared (the default) the
    leading tab's listeners failed inside the lock's callback, where the error was
    swallowed, and the page heard nothing at all (found by a review)."""
    source = (ROOT / "django_comet" / "static" / "django_comet" / "comet.js").read_text()
    chromium.get("about:blank")
    said = chromium.execute_script(
        source
        + """
        var said = [];
        [ 'chat', [], [''], ['chat', 3] ].forEach(function (events) {
            try { Comet.subscribe({sse: '/s/', events: events}); said.push('taken'); }
            catch (e) { said.push(e.name + ': ' + e.message); }
        });
        return said;
        """
    )
    assert (
        said[0]
        == "TypeError: Comet.subscribe: events is a list of event names, like ['chat'], not \"chat\""
    )
    assert all(s.startswith("TypeError: ") for s in said[1:]), said

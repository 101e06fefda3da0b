"""The chat demo (``/chat/``) in real (headless) Chromium pages.

Two browsers with separate profiles (so separate cookies, CSRF tokens and localStorage)
talk to each other through runcomet over Server-Sent Events; a third page, whose
``EventSource`` is deleted before any page script runs, must fall back to long-poll and
still receive what is published.  Other tests publish on the ``chat`` channel too, so
the log may hold more than our messages: ours are found by unique text.  Every wait is
an awaited condition with a deadline, and the assertions are about which events arrive,
exactly once and in which order, never about timings.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from .browser import CHROMEDRIVER, CHROMIUM, add_flags
from .processes import ROOT

# Written to docs/ (the picture in the README) only when asked, so that a test run leaves
# the work tree clean: SAVE_SCREENSHOTS=1 pytest tests/test_browser_chat.py
SCREENSHOT = (
    ROOT / "docs" / "chat-demo.png"
    if os.environ.get("SAVE_SCREENSHOTS")
    else Path(tempfile.gettempdir()) / "chat-demo.png"
)
NO_EVENTSOURCE = "delete window.EventSource;"

# What one poll sees of the chat page: the connection state and every log entry.
CHAT_JS = """
var state = document.getElementById('state');
var log = document.getElementById('log');
if (!state || !log) { return null; }
return {
    state: state.textContent,
    eventSource: typeof window.EventSource,
    text: document.getElementById('text').value,
    log: Array.prototype.map.call(log.children, function (li) {
        var who = li.querySelector('b');
        return {
            id: li.dataset.id,
            name: who ? who.textContent : null,
            text: li.lastChild ? li.lastChild.textContent : null,
            shown: li.textContent
        };
    })
};
"""

pytestmark = pytest.mark.browser

Browser = Any  # a selenium.webdriver.Chrome
NewBrowser = Callable[..., Browser]


@pytest.fixture
def new_browser(tmp_path) -> Iterator[NewBrowser]:
    """A factory of headless Chromium sessions, each with its own profile directory
    (cookies, localStorage); every session is quit afterwards, whatever happens."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(
            f"headless Chromium tests need {' and '.join(missing)} "
            "(Debian packages chromium and chromium-driver)"
        )
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    drivers: list[Browser] = []

    def start(name: str, *, window: str = "720,720", prefs: dict | None = None) -> Browser:
        profile = tmp_path / f"profile-{name}"
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        add_flags(options, profile, window)
        if prefs:
            options.add_experimental_option("prefs", prefs)
        service = Service(CHROMEDRIVER, log_output=subprocess.DEVNULL)
        driver = webdriver.Chrome(service=service, options=options)
        drivers.append(driver)
        return driver

    try:
        yield start
    finally:
        for driver in reversed(drivers):
            with contextlib.suppress(Exception):  # quit the others even if one fails
                driver.quit()
        for profile in tmp_path.glob("profile-*"):
            shutil.rmtree(profile, ignore_errors=True)


def snapshot(driver: Browser) -> dict | None:
    return driver.execute_script(CHAT_JS)


def wait_for(
    driver: Browser, predicate: Callable[[dict], bool], what: str, timeout: float = 30.0
) -> dict:
    """Poll the chat page until ``predicate(snapshot)`` holds (an awaited condition with
    a deadline) and return that snapshot."""
    deadline = time.monotonic() + timeout
    while True:
        snap = snapshot(driver)
        if snap is not None and predicate(snap):
            return snap
        if time.monotonic() > deadline:
            raise AssertionError(f"the page never showed {what}: {snap!r}")
        time.sleep(0.05)


def entries(snap: dict, text: str) -> list[dict]:
    return [e for e in snap["log"] if e["text"] == text]


def wait_for_message(driver: Browser, name: str, text: str) -> dict:
    """Wait until the log shows ``name: text`` and return the page's snapshot."""
    return wait_for(driver, lambda s: entries(s, text), f"{name}: {text}")


def the_entry(snap: dict, name: str, text: str) -> dict:
    """The one log entry with ``text``: shown exactly once, under ``name``."""
    found = entries(snap, text)
    assert len(found) == 1, f"{text!r} shown {len(found)} times: {snap['log']!r}"
    entry = found[0]
    assert entry["name"] == name + ":", entry
    assert entry["shown"] == f"{name}:{text}", entry
    assert entry["id"] and int(entry["id"]) > 0, entry
    return entry


def assert_ids_ascend(snap: dict) -> None:
    ids = [int(e["id"]) for e in snap["log"]]
    assert ids == sorted(set(ids)), f"log not in event order or with repeats: {ids}"


def open_chat(driver: Browser, base_url: str, state: str) -> dict:
    driver.get(base_url + "/chat/")
    return wait_for(driver, lambda s: s["state"] == state, repr(state))


def say(driver: Browser, name: str, text: str) -> None:
    """Type a name and a message and submit the form the way a user does (the button,
    so the form's validation and submit handler run)."""
    from selenium.webdriver.common.by import By

    name_input = driver.find_element(By.ID, "name")
    name_input.clear()
    name_input.send_keys(name)
    driver.find_element(By.ID, "text").send_keys(text)
    driver.find_element(By.CSS_SELECTOR, "#send button[type=submit]").click()


def unique(label: str) -> str:
    return f"{label} {uuid.uuid4().hex[:12]}"


def test_two_browsers_chat_over_sse(comet, new_browser):
    alice_page = new_browser("alice")
    bob_page = new_browser("bob")
    for page in (alice_page, bob_page):
        ready = open_chat(page, comet.url, "live (sse)")
        assert ready["eventSource"] == "function", ready
    # Separate profiles: each page got its own CSRF cookie.
    alice_csrf = alice_page.get_cookie("csrftoken")
    bob_csrf = bob_page.get_cookie("csrftoken")
    assert alice_csrf and bob_csrf and alice_csrf["value"] != bob_csrf["value"]

    hello = unique("Hello Bob, this is Alice:")
    say(alice_page, "Alice", hello)
    at_bob = wait_for_message(bob_page, "Alice", hello)
    at_alice = wait_for_message(alice_page, "Alice", hello)
    first_id = the_entry(at_bob, "Alice", hello)["id"]
    assert the_entry(at_alice, "Alice", hello)["id"] == first_id
    assert at_alice["text"] == "", "the message box is emptied after sending"

    reply = unique("Hi Alice! Bob here:")
    say(bob_page, "Bob", reply)
    at_alice = wait_for_message(alice_page, "Bob", reply)
    at_bob = wait_for_message(bob_page, "Bob", reply)
    reply_id = the_entry(at_alice, "Bob", reply)["id"]
    assert the_entry(at_bob, "Bob", reply)["id"] == reply_id
    assert int(reply_id) > int(first_id)

    # Both pages: each message exactly once, in publication order, and still live.
    for snap in (at_alice, at_bob):
        the_entry(snap, "Alice", hello)
        assert_ids_ascend(snap)
        assert snap["state"] == "live (sse)", snap
    ours = [e["id"] for e in at_alice["log"] if e["text"] in (hello, reply)]
    assert ours == [first_id, reply_id]
    assert [e["id"] for e in at_bob["log"] if e["text"] in (hello, reply)] == ours
    # Each page remembers its own name (localStorage is per profile).
    assert alice_page.execute_script("return localStorage.getItem('chat-name')") == "Alice"
    assert bob_page.execute_script("return localStorage.getItem('chat-name')") == "Bob"

    # A refusal shows the server's reason, and keeps what was typed.
    from selenium.webdriver.support.ui import WebDriverWait

    say(bob_page, "Bob", "   ")  # passes the input's "required", not the server
    refusal = "not sent: HTTP 400: Empty message."
    WebDriverWait(bob_page, 20).until(
        lambda d: d.execute_script("return document.getElementById('error').textContent") == refusal
    )
    bob_page.execute_script("document.getElementById('text').value = '';")

    bob_page.execute_script("window.scrollTo(0, 0); document.activeElement.blur();")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    assert bob_page.save_screenshot(str(SCREENSHOT))

    # A CSRF refusal (the cookie changed: a sign-in in another tab) says what to do,
    # not Django's HTML page.
    bob_page.delete_cookie("csrftoken")
    say(bob_page, "Bob", "after the cookie went")
    refusal = "not sent: refused (HTTP 403): reload the page and try again"
    WebDriverWait(bob_page, 20).until(
        lambda d: d.execute_script("return document.getElementById('error').textContent") == refusal
    )


def send_with_requests(base_url: str, name: str, text: str) -> int:
    """POST to /chat/send/ as a non-browser client: the CSRF cookie from GET /chat/,
    echoed in X-CSRFToken, with the Origin and Referer a browser would send."""
    with requests.Session() as session:
        with session.get(base_url + "/chat/", timeout=30) as page:
            assert page.status_code == 200
        token = session.cookies["csrftoken"]
        with session.post(
            base_url + "/chat/send/",
            data={"name": name, "text": text},
            headers={
                "X-CSRFToken": token,
                "Origin": base_url,
                "Referer": base_url + "/chat/",
            },
            timeout=30,
        ) as sent:
            assert sent.status_code == 201, sent.text
            return int(sent.json()["id"])


def test_long_poll_fallback_without_eventsource(comet, new_browser):
    poll_page = new_browser("long-poll")
    # Runs in every new document before the page's own scripts (and comet.js).
    poll_page.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": NO_EVENTSOURCE})
    ready = open_chat(poll_page, comet.url, "live (long-poll)")
    assert ready["eventSource"] == "undefined", ready
    assert_ids_ascend(ready)

    # A message from outside the browser, published while the page's poll is waiting.
    outside = unique("Published by requests:")
    outside_id = send_with_requests(comet.url, "Robot", outside)
    snap = wait_for_message(poll_page, "Robot", outside)
    assert int(the_entry(snap, "Robot", outside)["id"]) == outside_id

    # A message from an SSE page reaches the long-poll page, and vice versa.
    sse_page = new_browser("sse")
    open_chat(sse_page, comet.url, "live (sse)")
    from_sse = unique("From the SSE page:")
    say(sse_page, "Streamer", from_sse)
    snap = wait_for_message(poll_page, "Streamer", from_sse)
    from_sse_id = the_entry(snap, "Streamer", from_sse)["id"]

    from_poll = unique("From the long-poll page:")
    say(poll_page, "Poller", from_poll)
    at_sse = wait_for_message(sse_page, "Poller", from_poll)
    at_poll = wait_for_message(poll_page, "Poller", from_poll)
    from_poll_id = the_entry(at_poll, "Poller", from_poll)["id"]
    assert the_entry(at_sse, "Poller", from_poll)["id"] == from_poll_id
    assert the_entry(at_sse, "Streamer", from_sse)["id"] == from_sse_id

    # Every message once, in publication order, and the page never left long-poll.
    the_entry(at_poll, "Robot", outside)
    the_entry(at_poll, "Streamer", from_sse)
    assert_ids_ascend(at_poll)
    assert_ids_ascend(at_sse)
    ours = [int(e["id"]) for e in at_poll["log"] if e["text"] in (outside, from_sse, from_poll)]
    assert ours == [outside_id, int(from_sse_id), int(from_poll_id)]
    assert at_poll["state"] == "live (long-poll)", at_poll
    assert at_poll["eventSource"] == "undefined", at_poll


def test_a_browser_that_blocks_site_data_still_chats(comet, new_browser):
    """Where the user blocks sites' data, reading localStorage throws: the page's script
    stopped before it subscribed (the chat said "connecting…" for ever), and a send
    did nothing at all."""
    blocked = {"profile.default_content_setting_values.cookies": 2}
    page = new_browser("no-site-data", prefs=blocked)
    open_chat(page, comet.url, "live (sse)")
    text = unique("to a page without site data:")
    send_with_requests(comet.url, "Robot", text)
    wait_for_message(page, "Robot", text)
    # No CSRF cookie either: the send is refused, and says so.
    say(page, "Nobody", "not without a cookie")
    from selenium.webdriver.support.ui import WebDriverWait

    refusal = "not sent: refused (HTTP 403): reload the page and try again"
    WebDriverWait(page, 20).until(
        lambda d: d.execute_script("return document.getElementById('error').textContent") == refusal
    )

"""What both browser tests need to start headless Chromium (Debian's chromium and
chromium-driver, which `make test` installs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# As root, in a machine with no network but loopback: no sandbox, nothing that phones home.
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def add_flags(options: Any, profile: Path, window: str) -> None:
    """Headless flags, a fresh profile directory and a window size on ChromeOptions."""
    for flag in (*FLAGS, f"--window-size={window}", f"--user-data-dir={profile}"):
        options.add_argument(flag)


# Loads comet.js into the page (execute_async_script): true once it has run.
LOAD_COMET_JS = """
var done = arguments[arguments.length - 1];
var script = document.createElement('script');
script.src = '/static/django_comet/comet.js';
script.onload = function () { done(true); };
script.onerror = function () { done(false); };
document.head.appendChild(script);
"""


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

"""demo_site's settings plus a few views that only the tests need (tests/urls.py)."""

from demo_site.settings import *  # noqa: F403

ROOT_URLCONF = "tests.urls"

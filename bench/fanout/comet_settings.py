"""The test project's settings (tests/settings.py) as the benchmarks run them: DEBUG off,
/comet/status/ open so that the benchmark can read the subscriber counts."""

from tests.settings import *  # noqa: F403

DEBUG = False
COMET_STATUS_PUBLIC = True

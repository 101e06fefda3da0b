"""The status figures of pre-forked workers, combined.

Each request reaches whichever worker accepts it, so one worker's figures say little
about the server.  Every worker writes its own to a file in a directory the parent made,
once a second when they changed (atomically: a new file renamed over the old one); the
status view, in whichever worker answers, adds up the others' files and its own live
figures, having written those first (so that no answer shows less than one before it,
whichever worker gives it).  Files rather than shared memory: the figures include a
per-channel count of any size, and a worker that dies holds no lock.  Another worker's
figures are therefore up to a second old.  Of a worker that is gone (its process id no
longer exists) only the counters stay, and its replacement carries them on, so that a
counter of the server never goes down (Prometheus would read that as a reset).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .loop import Handle
    from .server import Server

WRITE_SECONDS = 1.0
# Every worker receives every event through the shared broker: not a sum.
HIGHEST = frozenset({"events_published"})
# Totals since start: kept when a worker dies (HIGHEST too).  Every other figure is a
# count of now.
COUNTERS = (
    "requests",
    "refused",
    "dropped_slow",
    "stages_delayed",
    "header_timeouts",
    "accept_pauses",
    "backlog_pauses",
    "connection_pauses",
)
# Figures shown for each worker too, to see how evenly the load is spread.
PER_WORKER = ("held", "requests", "in_flight", "connections", "streams")


class WorkerFigures:
    def __init__(self, server: Server, directory: str, number: int):
        self.server = server
        self.directory = directory
        self.number = number
        self._path = os.path.join(directory, f"{number}.json")
        self._written: dict[str, Any] | None = None
        self._lock = threading.Lock()  # the loop thread's writes, and status views'
        # The counters of the worker this one replaces, if it died.
        self._carried = _counters(_read(self._path))
        # Written at once, then every second: until its file exists, the other workers
        # leave this one out of the figures they answer with.
        self._timer: Handle | None = server.loop.call_later(0.0, self._write, background=True)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _write(self) -> None:
        """Loop thread, once a second."""
        self._timer = self.server.loop.call_later(WRITE_SECONDS, self._write, background=True)
        with self._lock:
            figures = self.own(self.server.stats())
            if figures != self._written:
                self._save(figures)

    def _save(self, figures: dict[str, Any]) -> None:
        record = {"worker": self.number, "pid": os.getpid(), "figures": figures}
        partial = f"{self._path}.{os.getpid()}.tmp"  # (under the lock: one at a time)
        try:
            with open(partial, "w") as file:
                json.dump(record, file, separators=(",", ":"))
            os.replace(partial, self._path)
        except OSError:  # the directory is gone: the server is stopping
            return
        self._written = figures

    def own(self, stats: dict[str, Any]) -> dict[str, Any]:
        """This worker's figures, with its predecessor's counters carried on."""
        for key, value in self._carried.items():
            stats[key] = stats.get(key, 0) + value
        return stats

    def combined(self, stats: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``stats()`` (this worker's live figures) with every other worker's added.
        Written first: what a worker answered with is on disk for the others (and its
        replacement) before anyone sees it, so a total never goes down from one answer
        to the next, whichever workers give them (one that had answered with more than
        its last write showed fewer requests in the next answer by another)."""
        with self._lock:  # (taken and written in turn: never an older one over a newer)
            figures = self.own(stats())
            self._save(figures)
        records = [{"worker": self.number, "pid": os.getpid(), "figures": figures}]
        with contextlib.suppress(OSError):
            for name in sorted(os.listdir(self.directory)):
                if name.endswith(".json") and name != f"{self.number}.json":
                    record = _read(os.path.join(self.directory, name))
                    if record is None:
                        continue
                    if not _alive(record["pid"]):  # until its replacement writes
                        record = {**record, "figures": _counters(record), "gone": True}
                    records.append(record)
        return combine(records)


def combine(records: list[dict[str, Any]]) -> dict[str, Any]:
    live = [r for r in records if not r.get("gone")]
    total: dict[str, Any] = {"workers": len(live)}
    channels: dict[str, int] = {}
    for record in records:
        for key, value in record["figures"].items():
            if key == "channels":
                for channel, count in value.items():
                    channels[channel] = channels.get(channel, 0) + count
            elif key in HIGHEST:
                total[key] = max(total.get(key, value), value)
            else:
                total[key] = total.get(key, 0) + value
    total["channels"] = dict(sorted(channels.items()))
    total["per_worker"] = [
        {"worker": r["worker"], "pid": r["pid"], **{k: r["figures"].get(k) for k in PER_WORKER}}
        for r in sorted(live, key=lambda r: r["worker"])
    ]
    return total


def _counters(record: dict[str, Any] | None) -> dict[str, Any]:
    """A dead worker's counters, and what it received (its replacement goes on from
    there, so that no total goes down); none from a live one: only a dead one is
    replaced."""
    if record is None or _alive(record["pid"]):
        return {}
    return {k: v for k, v in record["figures"].items() if k in COUNTERS or k in HIGHEST}


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as file:
            record: dict[str, Any] = json.load(file)
    except (OSError, ValueError):
        return None
    return record


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now
        return False
    return True

"""The status figures of pre-forked workers, combined.

Each request reaches whichever worker accepts it, so one worker's figures say little
about the server.  Every worker writes its own to a file in a directory the parent made,
once a second when they changed (atomically: a new file renamed over the old one); the
status view, in whichever worker answers, adds up the others' files and its own live
figures.  Files rather than shared memory: the figures include a per-channel count of
any size, and a worker that dies holds no lock.  Another worker's figures are therefore
up to a second old, and those of a worker that is gone are left out (its process id no
longer exists).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .loop import Handle
    from .server import Server

WRITE_SECONDS = 1.0
# Every worker receives every event through the shared broker: not a sum.
HIGHEST = frozenset({"events_published"})
# Figures shown for each worker too, to see how evenly the load is spread.
PER_WORKER = ("held", "requests", "in_flight", "connections", "streams")


class WorkerFigures:
    def __init__(self, server: Server, directory: str, number: int):
        self.server = server
        self.directory = directory
        self.number = number
        self._path = os.path.join(directory, f"{number}.json")
        self._written: dict[str, Any] | None = None
        self._timer: Handle | None = server.loop.call_later(WRITE_SECONDS, self._write)

    @property
    def handles(self) -> int:
        """Loop handles this keeps (its timer)."""
        return 1 if self._timer is not None else 0

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _write(self) -> None:
        """Loop thread, once a second."""
        self._timer = self.server.loop.call_later(WRITE_SECONDS, self._write)
        figures = self.server.stats()
        if figures == self._written:
            return
        record = {"worker": self.number, "pid": os.getpid(), "figures": figures}
        partial = f"{self._path}.{os.getpid()}.tmp"
        try:
            with open(partial, "w") as file:
                json.dump(record, file, separators=(",", ":"))
            os.replace(partial, self._path)
        except OSError:  # the directory is gone: the server is stopping
            return
        self._written = figures

    def combined(self, own: dict[str, Any]) -> dict[str, Any]:
        """``own`` (this worker's live figures) with every other live worker's added."""
        records = [{"worker": self.number, "pid": os.getpid(), "figures": own}]
        with contextlib.suppress(OSError):
            for name in sorted(os.listdir(self.directory)):
                if name.endswith(".json") and name != f"{self.number}.json":
                    record = _read(os.path.join(self.directory, name))
                    if record is not None and _alive(record["pid"]):
                        records.append(record)
        return combine(records)


def combine(records: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"workers": len(records)}
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
        for r in sorted(records, key=lambda r: r["worker"])
    ]
    return total


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

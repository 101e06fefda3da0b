"""The wire formats of held responses: Server-Sent Events frames (an event's, the
heartbeat's, the gap event's, the last ``retry:``) and a chunk of HTTP/1.1's chunked
coding.  Each is made once and written as-is to every connection it goes to.
"""

from __future__ import annotations

import json
import random
import re

_NEWLINES = re.compile(r"\r\n|\r|\n")
_FIELD_JUNK = re.compile(r"[\r\n\0]")


def sse_frame(event_id: int | None, name: str | None, data: str) -> bytes:
    """One Server-Sent Events frame: ``id:``, ``event:``, one ``data:`` line per line."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if name:
        lines.append("event: " + _FIELD_JUNK.sub("", name))
    lines.extend("data: " + line for line in _NEWLINES.split(data))
    return ("\n".join(lines) + "\n\n").encode("utf-8")


# The event a stream gets when some events newer than its cursor are gone from the
# history; its data is {"last_event_id": <the cursor>, "channels": [...]}.  The client
# should then reload whatever state it derives from the stream.  A replay that has no
# event after the gap gives it an id, also in its data as "cursor": the stream goes on
# from there, past what is gone (from the same cursor, a client on a quiet channel would
# be told of the same gap at every reconnect).
GAP_EVENT = "comet-history-gap"


# Sent on idle streams every COMET_SSE_HEARTBEAT seconds, so that proxies keep them and
# clients can tell a quiet stream from a dead connection; its data is the interval in
# seconds.  An event, not a comment: EventSource passes comments to no script.
HEARTBEAT_EVENT = "comet-heartbeat"


def heartbeat_frame(interval: float, event_id: int | None = None) -> bytes:
    return sse_frame(event_id, HEARTBEAT_EVENT, f"{interval:g}")


def gap_frame(after: int, channels: list[str], cursor: int | None = None) -> bytes:
    info: dict[str, object] = {"last_event_id": after, "channels": channels}
    if cursor is not None:
        info["cursor"] = cursor
    return sse_frame(cursor, GAP_EVENT, json.dumps(info))


def jittered_retry() -> bytes:
    """The last frame of a stream the server ends: reconnect in 1-5 s, spread out so
    that the clients of a stopping server do not all come back at once."""
    return b"retry: %d\n\n" % random.randint(1000, 5000)


def chunked(frame: bytes) -> bytes:
    """``frame`` as one chunk of HTTP/1.1's chunked coding."""
    return b"%x\r\n%b\r\n" % (len(frame), frame)

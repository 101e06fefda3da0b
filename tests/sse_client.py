"""A small SSE client over a raw socket, checking chunked framing as it reads."""

from __future__ import annotations

import time


class SSEClient:
    def __init__(self, server, path: str, headers: bytes = b"", timeout: float = 15):
        self.sock = server.connect()  # TCP, or the server's Unix socket
        self.sock.settimeout(timeout)
        self.timeout = timeout
        self.sock.sendall(
            b"GET "
            + path.encode()
            + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
            + headers
            + b"\r\n"
        )
        self.file = self.sock.makefile("rb")
        self.status_line = self.file.readline()
        self.headers: dict[bytes, bytes] = {}
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            self.headers[name.strip().lower()] = value.strip()
        self.status = int(self.status_line.split()[1])
        self._text = b""
        self.ended = False

    def _read_chunk(self) -> bytes:
        size_line = self.file.readline()
        if not size_line:
            raise ConnectionError("connection closed without the last chunk")
        assert size_line.endswith(b"\r\n"), size_line
        size = int(size_line, 16)
        data = self.file.read(size)
        assert self.file.read(2) == b"\r\n"
        if size == 0:
            self.ended = True
        return data

    def frames(self):
        """Yield raw frames (bytes between blank lines), comments included."""
        while True:
            while b"\n\n" not in self._text:
                if self.ended:
                    return
                self._text += self._read_chunk()
            frame, self._text = self._text.split(b"\n\n", 1)
            yield frame

    def next_event(self, skip_comments: bool = True) -> dict:
        """The next event; comments and heartbeats skipped unless ``skip_comments`` is
        false.  Heartbeats do not extend the wait: after ``timeout`` seconds, an error."""
        deadline = time.monotonic() + self.timeout
        for frame in self.frames():
            fields: dict = {"data": []}
            for line in frame.split(b"\n"):
                if line.startswith(b":"):
                    fields.setdefault("comments", []).append(line[1:].strip().decode())
                    continue
                name, _, value = line.decode().partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data":
                    fields["data"].append(value)
                else:
                    fields[name] = value
            if skip_comments and (
                (set(fields) <= {"data", "comments", "retry"} and not fields["data"])
                or fields.get("event") == "comet-heartbeat"
            ):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no event within {self.timeout} s, only heartbeats")
                continue
            fields["data"] = "\n".join(fields["data"])
            return fields
        raise ConnectionError("stream ended")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

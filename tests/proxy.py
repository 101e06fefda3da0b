"""A TCP proxy for tests where the network misbehaves between a server and what it
talks to (a browser, a broker)."""

from __future__ import annotations

import contextlib
import socket
import threading


class Proxy:
    """Forwards each connection to ``port``.  ``freeze()`` makes the connections open at
    that moment forward nothing more, either way, without closing: a network that dropped
    them silently.  A connection whose client sends ``hold_on`` (bytes) forwards nothing
    more from then on until ``release()``: a slow network for that one.  A connection
    whose client sends ``buffer_answer_to`` (bytes) gets the head of the answer and then
    nothing until the server ends it: a proxy that buffers response bodies.  Other
    connections are forwarded as usual."""

    def __init__(
        self, port: int, hold_on: bytes | None = None, buffer_answer_to: bytes | None = None
    ):
        self.target = port
        self.buffer_answer_to = buffer_answer_to
        self.buffering: set[int] = set()  # connections whose answers are buffered
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.opened = 0
        self.frozen_below = 0  # connections numbered below this forward nothing
        self.hold_on = hold_on
        self.released = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return
            number, self.opened = self.opened, self.opened + 1
            self.sockets += [client, upstream]
            for source, sink, outgoing in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(
                    target=self._pump, args=(source, sink, number, outgoing), daemon=True
                ).start()

    def _pump(
        self, source: socket.socket, sink: socket.socket, number: int, outgoing: bool
    ) -> None:
        held = False
        buffered, head_sent = b"", False  # a buffered answer: what is held back
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                held = held or bool(outgoing and self.hold_on and self.hold_on in data)
                if held:
                    self.released.wait()
                if outgoing and self.buffer_answer_to and self.buffer_answer_to in data:
                    self.buffering.add(number)  # (before the server can answer)
                if not outgoing and number in self.buffering:
                    buffered += data
                    if not head_sent and b"\r\n\r\n" in buffered:
                        head, ends, buffered = buffered.partition(b"\r\n\r\n")
                        sink.sendall(head + ends)  # the head passes, the body waits
                        head_sent = True
                    continue
                if number >= self.frozen_below:
                    sink.sendall(data)
            if buffered:
                sink.sendall(buffered)
            if number >= self.frozen_below:
                sink.shutdown(socket.SHUT_WR)

    def freeze(self) -> None:
        self.frozen_below = self.opened

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                # close() alone leaves the connection open while a pump is blocked in
                # recv() on it: the server would go on holding what it forwarded.
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

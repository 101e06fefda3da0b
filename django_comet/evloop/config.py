"""Every server tunable in one place, each with the reason for its default."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .proxies import TrustedProxies

# The most view threads: more would each take a stack and a share of the GIL for
# nothing a second worker process would not do better (--workers).
MAX_THREADS = 1024
# The largest byte limit (head sizes, body, pending output): 1 TiB is "no limit" in
# practice, and keeps 2 x (head + line) within a C ssize_t.
MAX_BYTES = 2**40
# The shortest period for a timeout or a heartbeat: below it a server serves nothing
# (every connection times out) or only heartbeats.
MIN_PERIOD = 0.1


@dataclasses.dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # loopback by default: exposing a dev server is a choice
    port: int = 8000
    # A Unix socket's path to listen on instead of host and port (behind a local proxy).
    unix_socket: str = ""
    # Threads that run views off the loop thread; 0 runs them in the loop thread (the 2007
    # behaviour: fastest for quick views, but one slow view stalls every connection).
    threads: int = 8
    # Seconds a connection may take to send a request, or sit idle between keep-alive
    # requests, or take to accept written data (libevent's one evhttp timeout).  Held
    # connections (deferrals, streams) have no read timeout while they are held.
    timeout: float = 30.0
    # Header lines together, in bytes (431 beyond), the request-target (414 beyond) and
    # the number of header lines (431 beyond).  libevent's own buffer for the request
    # line and headers is twice their sum; beyond that it answers 400 itself.
    max_header_size: int = 16 * 1024
    max_request_line: int = 8190
    max_header_count: int = 100
    # Request body, in bytes, after de-chunking; over it: 413.  libevent buffers a body
    # whole before the application sees it, so this also bounds memory per request.
    max_body_size: int = 32 * 1024 * 1024
    # A response body that is all there (a list) and larger than this is streamed chunk
    # by chunk instead of being sent at once with a Content-Length (any other streams
    # from its first bytes: producer.py).
    stream_threshold: int = 256 * 1024
    # A streaming response's producer thread waits while this many bytes are unsent.
    write_high_water: int = 1024 * 1024
    # Seconds between SSE heartbeat events, so that proxies keep idle streams open and
    # clients can tell a quiet stream from a dead connection.
    heartbeat: float = 15.0
    # Unsent bytes a held response may have: beyond it a stream falls behind (it is cut
    # only a whole history behind), a chain of stages waits for its reader.
    max_pending_output: int = 1024 * 1024
    # Seconds a new connection has to deliver its first complete request head; a slower
    # sender is disconnected (slowloris).  0: no deadline.
    header_timeout: float = 20.0
    # Open connections beyond which accepting pauses (new clients wait in the kernel's
    # listen backlog).  0: no limit but the file-descriptor limit.
    max_connections: int = 20000
    # Seconds a response may stay held (stream, chain of stages); then it is ended
    # cleanly (SSE clients reconnect with Last-Event-ID).  0: no limit.
    max_hold: float = 3600.0
    # Peers (addresses, networks) whose X-Forwarded-For / X-Forwarded-Proto are
    # believed: a reverse proxy, a load balancer's subnet.
    trusted_proxies: TrustedProxies = dataclasses.field(default_factory=TrustedProxies)
    # Seconds to let in-flight responses finish on SIGTERM/Ctrl-C before cutting them.
    grace: float = 10.0
    backlog: int = 1024
    # Listen on IPv6 even for a host name (runserver's --ipv6); an IPv6 literal always is.
    ipv6: bool = False
    script_name: str = ""
    url_scheme: str = "http"
    access_log: bool = True
    # Set for pre-forked workers: the environ's wsgi.multiprocess (PEP 3333).
    multiprocess: bool = False
    # Called in a view thread as it leaves the pool (a thread that stood aside for a slow
    # reader, and every thread at a stop): runcomet closes its Django database
    # connections there, which a persistent connection (CONN_MAX_AGE) would otherwise
    # keep open until a garbage collection found the thread's leftovers.
    on_thread_exit: Callable[[], None] | None = None

"""``python floor.py MODULE:CALLABLE``: the microseconds of CPU one request costs the
application alone, called in-process with no server, no socket and no HTTP; the floor
under every server's time per request in bench/hello.  Prints the median of a few
batches, the statistic bench/hello reports for the servers too (this machine's speed
wanders, and a best-of would make every server look slower beside it)."""

import gc
import importlib
import io
import statistics
import sys
import time

BATCHES, CALLS = 7, 2000


def environ(target: str = "/") -> dict:
    """A GET for ``target`` as a server would pass it (also used by bench/fanout)."""
    path, _, query = target.partition("?")
    return {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "127.0.0.1",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "40000",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.url_scheme": "http",
        "wsgi.version": (1, 0),
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }


def start_response(status, headers, exc_info=None):
    return lambda data: None


def batch(app) -> float:
    started = time.process_time()
    for _ in range(CALLS):
        result = app(environ(), start_response)
        b"".join(result)
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return (time.process_time() - started) / CALLS * 1e6


def main() -> None:
    module, _, name = sys.argv[1].partition(":")
    app = getattr(importlib.import_module(module), name)
    batch(app)  # warm up
    gc.collect()
    gc.freeze()  # as runcomet does before serving
    print(f"{statistics.median(batch(app) for _ in range(BATCHES)):.2f}")


if __name__ == "__main__":
    main()

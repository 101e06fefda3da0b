"""The floor under bench/fanout's "CPU ms per stage": the demo's staged response run
in-process, with no server, no sockets and no delays; only Django's requests for each
stage (the first request, then one GET per stage, as runcomet makes them).

    DJANGO_SETTINGS_MODULE=... python stage_floor.py PATH STAGES [RESPONSES [GAP_MS]]

Prints the CPU milliseconds per stage request.  With GAP_MS, the process sleeps that long
after each request, as a server does whose stages come one at a time: the CPU goes idle
in between, and each request starts with colder caches than in a tight loop.
"""

import gc
import sys
import time
from pathlib import Path

import django
from django.core.wsgi import get_wsgi_application

from django_comet.evloop.deferral import claim

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "hello"))
from floor import environ, start_response  # bench/hello/floor.py


def staged_response(app, path: str, gap: float = 0.0) -> int:
    """Run every stage of one staged response at once (``gap`` seconds idle after each
    request); return how many requests it took."""
    result = app(environ(path), start_response)
    requests = 1
    while True:
        deferral = claim(result)  # as runcomet does: this stage's content only
        b"".join(result)
        result.close()
        if gap:
            time.sleep(gap)
        if deferral is None:
            return requests
        result = deferral.resume()
        requests += 1


def main() -> None:
    path, stages = sys.argv[1], int(sys.argv[2])
    responses = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    gap = float(sys.argv[4]) / 1000 if len(sys.argv) > 4 else 0.0
    django.setup(set_prefix=False)
    app = get_wsgi_application()
    for _ in range(50):  # warm up: URLconf, translations, caches
        staged_response(app, path)
    gc.collect()
    gc.freeze()  # as the server does before serving
    started = time.process_time()
    requests = sum(staged_response(app, path, gap) for _ in range(responses))
    cpu = time.process_time() - started
    if requests != responses * stages:
        sys.exit(f"expected {stages} requests per response, made {requests / responses:.1f}")
    print(f"{1000 * cpu / requests:.3f}")


if __name__ == "__main__":
    main()

"""The ASGI app of the HTTP benchmarks (settings: bench.site)."""

from __future__ import annotations

import gc
import os
import time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")

from django.core.asgi import get_asgi_application

application = get_asgi_application()

if os.environ.get("BENCH_GC_FREEZE", "1") == "1":
    # What a long-running server should do once it is set up (see
    # docs/deploying.md): move everything loaded so far out of the collector's sight,
    # so a full collection scans the objects of live requests and runs only.
    gc.freeze()

if os.environ.get("BENCH_GC_THRESHOLD", "1") == "1":
    # And collect the youngest objects less often (docs/deploying.md): a
    # token's short-lived objects (its wake-up, its timer, its ASGI message)
    # then die before a collection sees them, instead of being promoted until
    # a full collection stops the loop for tens of milliseconds every second
    # or two.
    gc.set_threshold(10_000, 10, 10)

if os.environ.get("BENCH_GC_LOG"):
    # A diagnostic: one line per collection, with its generation and pause.
    _log = open(os.environ["BENCH_GC_LOG"], "a", buffering=1)  # noqa: SIM115
    _began = [0.0]

    def _timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            _began[0] = time.perf_counter()
        else:
            pause = (time.perf_counter() - _began[0]) * 1000
            _log.write(f"{time.monotonic():.3f} gen{info['generation']} {pause:.2f} ms\n")

    gc.callbacks.append(_timed)

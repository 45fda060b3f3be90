"""The ASGI app of the HTTP benchmarks (settings: bench.site)."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")

from django.core.asgi import get_asgi_application

application = get_asgi_application()

if os.environ.get("BENCH_GC_FREEZE", "1") == "1":
    # What a long-running server should do once it is set up (see README,
    # Deploying): move everything loaded so far out of the collector's sight,
    # so a full collection scans the objects of live requests and runs only.
    import gc

    gc.freeze()

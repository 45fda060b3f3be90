"""The ASGI app of the HTTP benchmarks (settings: bench.site)."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")

from django.core.asgi import get_asgi_application

application = get_asgi_application()

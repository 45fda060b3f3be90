"""The ASGI app the end-to-end tests serve with a real daphne process."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

from django.core.asgi import get_asgi_application

# Set Django up before anything imports models.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from detached_runs.lifecycle import LifespanApp  # noqa: E402
from detached_runs.routing import websocket_urlpatterns  # noqa: E402

if os.environ.get("TEST_SWEEP_ROWS") == "0":
    # A server that outlives the test that started it (`tests.conftest.server`)
    # shares the database with the servers of later tests, but not their
    # Redis prefix: its sweep of rows left running would end theirs as runs
    # its backend does not hold (one process per database must share the
    # backend: docs/deploying.md).
    from detached_runs.backends import redis

    redis.SWEEP_ROWS_EVERY = 10**9

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # Servers that speak ASGI lifespan (uvicorn) end runs on shutdown through it.
        "lifespan": LifespanApp(),
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
        ),
    }
)

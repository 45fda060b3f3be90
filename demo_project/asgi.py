"""ASGI entry point of the demo: Django for HTTP, the run consumer for WebSockets."""

from __future__ import annotations

import gc
import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_project.settings")

from django.core.asgi import get_asgi_application

# Set Django up before anything imports models.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from detached_runs.lifecycle import LifespanApp  # noqa: E402
from detached_runs.routing import websocket_urlpatterns  # noqa: E402

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

# A long-running server, once set up: what was loaded so far (Django, the
# project, their modules) moves out of the garbage collector's sight, so its
# full collections scan only live requests and runs; and the youngest objects
# are collected less often, so a streamed token's short-lived objects die
# before a collection promotes them (see docs/deploying.md).
gc.freeze()
gc.set_threshold(10_000, 10, 10)

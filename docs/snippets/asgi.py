# mysite/asgi.py: Django for HTTP (and SSE), the run consumer for WebSockets.
import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

from django.core.asgi import get_asgi_application

# Set Django up before anything imports models.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack
from channels.routing import ProtocolTypeRouter, URLRouter
from channels.security.websocket import AllowedHostsOriginValidator

from detached_runs.lifecycle import LifespanApp
from detached_runs.routing import websocket_urlpatterns  # ws/runs/<key>/

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # Servers that speak ASGI lifespan (uvicorn) end runs gracefully through it.
        "lifespan": LifespanApp(),
        # The session cookie gives the owner; the Origin must be in ALLOWED_HOSTS.
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
        ),
    }
)

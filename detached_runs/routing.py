"""WebSocket routes. Mount them behind Channels' auth stack::

from channels.auth import AuthMiddlewareStack
from channels.routing import ProtocolTypeRouter, URLRouter
from channels.security.websocket import AllowedHostsOriginValidator
from detached_runs.routing import websocket_urlpatterns

application = ProtocolTypeRouter({
    "http": django_asgi_app,
    "websocket": AllowedHostsOriginValidator(
        AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
    ),
})
"""

from __future__ import annotations

from django.urls import path

from .consumers import RunConsumer

websocket_urlpatterns = [
    path("ws/runs/<str:session_key>/", RunConsumer.as_asgi(), name="detached_runs_ws"),
]

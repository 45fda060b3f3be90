"""Include with ``path("api/", include("detached_runs.aisdk.urls"))``.

The paths are those of ``new DefaultChatTransport({api: "/api/chat"})``
(``ai`` 7): it posts to the ``api`` itself, with no trailing slash, and
appends ``/<chat id>/stream`` to resume. So the include's prefix stops
before ``chat``: included at ``"api/chat/"``, the posts to ``/api/chat``
would not match, and routes that begin with a slash make Django's URL
check warn (``urls.W002``).
"""

from __future__ import annotations

from django.urls import path

from .. import views as run_views
from . import views

app_name = "detached_runs_aisdk"

urlpatterns = [
    path("chat", views.chat, name="chat"),
    path("chat/<str:session_key>/stream", views.stream, name="stream"),
    path("chat/<str:session_key>/stop", run_views.stop, name="stop"),
    path("chat/<str:session_key>/messages", views.messages, name="messages"),
]

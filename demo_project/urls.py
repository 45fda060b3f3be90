from __future__ import annotations

from django.contrib import admin
from django.contrib.staticfiles.urls import staticfiles_urlpatterns
from django.urls import include, path

from . import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("runs/", include("detached_runs.urls")),
    # The AI SDK's useChat: DefaultChatTransport({api: "/api/chat"}).
    path("api/", include("detached_runs.aisdk.urls")),
    # Prometheus metrics, for staff users (docs/metrics.md).
    path("metrics", include("detached_runs.metrics.urls")),
    path("react/", views.react_chat, name="react_chat"),
    path("", views.chat, name="chat"),
]

# The chat page's script (detached_runs/static/) under daphne or uvicorn, where no
# runserver serves static files: only with DEBUG, like runserver; collectstatic and
# a web server in production.
urlpatterns += staticfiles_urlpatterns()

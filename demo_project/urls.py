from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from . import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("runs/", include("detached_runs.urls")),
    path("history/<str:session_key>/", views.history, name="history"),
    path("", views.chat, name="chat"),
]

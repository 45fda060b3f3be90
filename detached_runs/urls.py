"""Include with ``path("runs/", include("detached_runs.urls"))``."""

from __future__ import annotations

from django.urls import path

from . import views

app_name = "detached_runs"

urlpatterns = [
    path("", views.sessions, name="sessions"),
    path("<str:session_key>/", views.session, name="session"),
    path("<str:session_key>/runs/", views.session_runs, name="runs"),
    path("<str:session_key>/events/", views.events, name="events"),
    path("<str:session_key>/stop/", views.stop, name="stop"),
    path("<str:session_key>/input/", views.answer, name="input"),
]

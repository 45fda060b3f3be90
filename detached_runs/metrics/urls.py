"""Include with ``path("metrics", include("detached_runs.metrics.urls"))``
(or at any prefix): one URL, the Prometheus text format."""

from __future__ import annotations

from django.urls import path

from . import views

app_name = "detached_runs_metrics"

urlpatterns = [path("", views.metrics, name="metrics")]

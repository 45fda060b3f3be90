from __future__ import annotations

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class DetachedRunsConfig(AppConfig):
    name = "detached_runs"
    verbose_name = _("Detached runs")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)

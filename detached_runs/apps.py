from __future__ import annotations

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class DetachedRunsConfig(AppConfig):
    name = "detached_runs"
    verbose_name = _("Detached runs")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.contrib.auth.signals import user_logged_in

        from . import checks  # noqa: F401  (registers the system checks)
        from .owners import adopt_on_login

        # A visitor who logs in keeps what they started anonymously (login()
        # and alogin() send it; Channels' login needs owners.adopt_scope_runs).
        user_logged_in.connect(adopt_on_login, dispatch_uid="detached_runs.adopt_on_login")

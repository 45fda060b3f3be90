from __future__ import annotations

from typing import Any

from asgiref.sync import async_to_sync
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from . import runs
from .models import Run


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    list_display = (
        "short_id",
        "session_key",
        "prompt_excerpt",
        "status",
        "owner",
        "started_at",
        "finished_at",
        "output_length",
    )
    list_filter = ("status", "started_at")
    search_fields = ("session_key", "prompt", "id")
    date_hierarchy = "started_at"
    ordering = ("-started_at",)
    list_per_page = 50
    actions = ("stop_runs",)
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "id",
                    "session_key",
                    "status",
                    "owner",
                    "user",
                    "prompt",
                    "output",
                    "error",
                )
            },
        ),
        (_("Times"), {"fields": ("started_at", "updated_at", "finished_at")}),
        (_("Log"), {"fields": ("last_event_id",), "classes": ("collapse",)}),
    )

    def get_readonly_fields(self, request: HttpRequest, obj: Run | None = None) -> Any:
        # Runs are a record of what happened: nothing here is editable.
        return [field.name for field in Run._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.display(description=_("id"), ordering="id")
    def short_id(self, obj: Run) -> str:
        return str(obj.id)[:8]

    @admin.display(description=_("prompt"))
    def prompt_excerpt(self, obj: Run) -> str:
        return obj.prompt if len(obj.prompt) <= 60 else obj.prompt[:59] + "…"

    @admin.display(description=_("output chars"))
    def output_length(self, obj: Run) -> int:
        return len(obj.output)

    @admin.action(description=_("Stop selected running runs"), permissions=["change"])
    def stop_runs(self, request: HttpRequest, queryset: QuerySet[Run]) -> None:
        stopped = 0
        for run in queryset.filter(status=Run.Status.RUNNING):
            # Under ASGI this runs the coroutine on the server's loop, where the run lives.
            stopped += bool(async_to_sync(runs.get_service().stop_run)(run.id))
        self.message_user(
            request,
            ngettext("Stopped %d run.", "Stopped %d runs.", stopped) % stopped,
            messages.SUCCESS if stopped else messages.WARNING,
        )

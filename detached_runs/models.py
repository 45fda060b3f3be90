from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _


class Run(models.Model):
    """One execution of the agent for one prompt: the saved assistant message.

    Created when the run starts, checkpointed while it runs (``output`` and
    ``updated_at``, which doubles as the heartbeat of the process running it)
    and saved with its terminal status when it ends.
    """

    class Status(models.TextChoices):
        RUNNING = "running", _("running")
        DONE = "done", _("done")
        ERROR = "error", _("error")
        STOPPED = "stopped", _("stopped")
        INTERRUPTED = "interrupted", _("interrupted")

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    session_key = models.CharField(_("session"), max_length=64)
    owner = models.CharField(
        _("owner"),
        max_length=200,
        blank=True,
        db_index=True,
        help_text=_("user:<pk> for a user, anon:<id> for an anonymous browser session."),
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="detached_runs",
    )
    prompt = models.TextField(_("prompt"))
    output = models.TextField(_("output"), blank=True)
    status = models.CharField(
        _("status"),
        max_length=16,
        choices=Status.choices,
        default=Status.RUNNING,
        db_index=True,
    )
    error = models.TextField(_("error"), blank=True)
    #: The id of the last event the saved output covers (the terminal one once ended).
    last_event_id = models.CharField(max_length=80, blank=True)
    #: The process running it (host:pid:boot id), to tell orphans after a crash.
    worker = models.CharField(max_length=200, blank=True)
    started_at = models.DateTimeField(_("started"), default=timezone.now, db_index=True)
    updated_at = models.DateTimeField(_("last checkpoint"), default=timezone.now)
    finished_at = models.DateTimeField(_("finished"), null=True, blank=True)

    class Meta:
        ordering = ["-started_at"]
        indexes = [
            models.Index(fields=["session_key", "-started_at"], name="detached_run_session"),
            # The sweep for rows left running by a dead process (`RunService.sweep`).
            models.Index(fields=["status", "updated_at"], name="detached_run_heartbeat"),
        ]
        verbose_name = _("run")
        verbose_name_plural = _("runs")

    def __str__(self) -> str:
        return f"{self.session_key} · {self.status} · {self.id}"

    @property
    def is_running(self) -> bool:
        return self.status == self.Status.RUNNING

    def as_json(self) -> dict[str, Any]:
        """The ``run`` object of the status endpoint."""
        return {
            "id": str(self.id),
            "status": self.status,
            "prompt": self.prompt,
            "output": self.output,
            "error": self.error,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }

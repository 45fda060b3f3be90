from __future__ import annotations

import uuid
from datetime import datetime
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
        #: Accepted with ``multitask="enqueue"``; waits for the session's earlier runs.
        QUEUED = "queued", _("queued")
        RUNNING = "running", _("running")
        #: The agent asked the user something (``ctx.ask``) and waits for the answer.
        WAITING = "waiting", _("waiting")
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
    #: The options sent with the prompt, as the project's VALIDATE_OPTIONS cleaned them.
    options = models.JSONField(_("options"), default=dict, blank=True)
    #: What the agent reported with ``{"event": "usage", "data": {...}}``, merged
    #: (later keys win): ``input_tokens``, ``output_tokens``, ``cost``...
    usage = models.JSONField(_("usage"), default=dict, blank=True)
    #: The id of the last event the saved output covers (the terminal one once ended).
    last_event_id = models.CharField(max_length=80, blank=True)
    #: The process running it (host:pid:boot id), to tell orphans after a crash.
    worker = models.CharField(max_length=200, blank=True)
    started_at = models.DateTimeField(_("started"), default=timezone.now, db_index=True)
    updated_at = models.DateTimeField(_("last checkpoint"), default=timezone.now)
    finished_at = models.DateTimeField(_("finished"), null=True, blank=True)
    #: When the first text delta was logged (time to first token: minus started_at).
    first_token_at = models.DateTimeField(_("first token"), null=True, blank=True)

    #: Not a column: while the run is ``waiting``, the pending request as the
    #: backend holds it (``{"request": "<id>", ...}``), set on the live state
    #: the service shows (`detached_runs.runs.RunService.status`).
    input_request: dict[str, Any] | None = None

    class Meta:
        ordering = ["-started_at"]
        indexes = [
            models.Index(fields=["session_key", "-started_at"], name="detached_run_session"),
            # The sweep for rows left running by a dead process (`RunService.sweep`).
            models.Index(fields=["status", "updated_at"], name="detached_run_heartbeat"),
            # An owner's sessions, most recently active first (the sessions list).
            models.Index(fields=["owner", "-started_at"], name="detached_run_owner"),
        ]
        verbose_name = _("run")
        verbose_name_plural = _("runs")

    def __str__(self) -> str:
        return f"{self.session_key} · {self.status} · {self.id}"

    @property
    def is_running(self) -> bool:
        """In flight: running, or waiting for the user's answer."""
        return self.status in (self.Status.RUNNING, self.Status.WAITING)

    def as_json(self) -> dict[str, Any]:
        """The ``run`` object of the status endpoint; while ``waiting``, with
        its pending ``input_request``."""
        data = {
            "id": str(self.id),
            "status": self.status,
            "prompt": self.prompt,
            "output": self.output,
            "error": self.error,
            "options": self.options,
            "usage": self.usage,
            "started_at": _iso(self.started_at),
            "first_token_at": _iso(self.first_token_at),
            "finished_at": _iso(self.finished_at),
        }
        if self.status == self.Status.WAITING and self.input_request is not None:
            data["input_request"] = self.input_request
        return data


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None

"""The admin of runs: a record of what happened, read only; with each run's
usage (tokens, cost, time to first token) in the list and on its page,
filters on them, and their sums for the runs the list shows (its filters
and search applied: `RunAdmin.changelist_view`).

A run's page is a view, never a form (no Save buttons; a POST to it is
refused). While the run is in flight it follows it live: a script
(``detached_runs/admin-live.js``) polls `RunAdmin.live_view`, a JSON view
for staff, about once a second, and updates the page with the run's text,
status, usage and the events in its log, read through the log its clients
read (`detached_runs.live`). Times show to the second.

Token counts and costs are read from `Run.usage` in SQL (a JSON key, cast to
a number: ``usage__input_tokens``), which SQLite, PostgreSQL and MariaDB or
MySQL all do; the agent boundary made sure they are numbers
(`detached_runs.usage.clean_usage`)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from asgiref.sync import async_to_sync
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.db.models import (
    Avg,
    BigIntegerField,
    Count,
    DurationField,
    ExpressionWrapper,
    F,
    FloatField,
    Q,
    QuerySet,
    Sum,
)
from django.db.models.expressions import Combinable
from django.db.models.fields.json import KT
from django.db.models.functions import Cast
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.timezone import localtime
from django.utils.translation import gettext, ngettext
from django.utils.translation import gettext_lazy as _

from . import live, rows, runs
from .exceptions import BackendUnavailable
from .models import Run
from .usage import TOKEN_KEYS


def _tokens(key: str) -> Cast:
    """The token count ``usage[key]`` as a number in SQL (NULL without it)."""
    return Cast(KT(f"usage__{key}"), BigIntegerField())


def _cost() -> Cast:
    return Cast(KT("usage__cost"), FloatField())


def _ttft() -> Combinable:
    """Time to first token in SQL: ``first_token_at - started_at`` (NULL without it)."""
    return ExpressionWrapper(F("first_token_at") - F("started_at"), output_field=DurationField())


#: The rows of a run's page that show its usage (a fieldset; all of them
#: follow a run in flight).
USAGE_ROWS = (
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cost",
    "time_to_first_token",
    "usage_json",
)


class UsageFilter(admin.SimpleListFilter):
    """Runs by where their token counts come from: the endpoint, an estimate, none."""

    title = _("usage")
    parameter_name = "usage"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [
            ("reported", _("reported")),
            ("estimated", _("estimated")),
            ("none", _("no tokens")),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Run]) -> QuerySet[Run] | None:
        has_tokens = Q(usage__has_any_keys=list(TOKEN_KEYS))
        estimated = Q(usage__estimated=True)
        if self.value() == "reported":
            # Not exclude(estimated): in SQL a missing key is NULL, and NOT NULL
            # would leave out every run without the key.
            not_estimated = ~Q(usage__has_key="estimated") | Q(usage__estimated=False)
            return queryset.filter(has_tokens & not_estimated)
        if self.value() == "estimated":
            return queryset.filter(has_tokens & estimated)
        if self.value() == "none":
            return queryset.exclude(has_tokens)
        return None


class _RangeFilter(admin.SimpleListFilter):
    """A filter of runs by ranges of a number: `within` gives the runs of the
    chosen range of ``RANGES``."""

    #: (parameter value, label, lower bound included, upper bound excluded)
    RANGES: tuple[tuple[str, str, float | None, float | None], ...] = ()

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [(value, _(label)) for value, label, _low, _high in self.RANGES]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Run]) -> QuerySet[Run] | None:
        for value, _label, low, high in self.RANGES:
            if self.value() == value:
                return self.within(queryset, low, high)
        return None

    def within(
        self, queryset: QuerySet[Run], low: float | None, high: float | None
    ) -> QuerySet[Run]:
        raise NotImplementedError("subclasses of _RangeFilter must provide within()")


class CostFilter(_RangeFilter):
    """Runs by their cost (``usage["cost"]``, in the currency the agent reports)."""

    title = _("cost")
    parameter_name = "cost"
    #: (parameter value, label, lower bound included, upper bound excluded)
    RANGES: tuple[tuple[str, str, float | None, float | None], ...] = (
        ("none", "no cost", None, None),
        ("lt0.01", "under 0.01", 0.0, 0.01),
        ("0.01-0.1", "0.01 to 0.1", 0.01, 0.1),
        ("0.1-1", "0.1 to 1", 0.1, 1.0),
        ("ge1", "1 and over", 1.0, None),
    )

    def within(
        self, queryset: QuerySet[Run], low: float | None, high: float | None
    ) -> QuerySet[Run]:
        if low is None:
            return queryset.exclude(usage__has_key="cost")
        priced = queryset.alias(run_cost=_cost()).filter(run_cost__gte=low)
        return priced if high is None else priced.filter(run_cost__lt=high)


class FirstTokenFilter(_RangeFilter):
    """Runs by their time to first token (``first_token_at - started_at``)."""

    title = _("time to first token")
    parameter_name = "ttft"
    #: (parameter value, label, lower bound in seconds included, upper excluded)
    RANGES: tuple[tuple[str, str, float | None, float | None], ...] = (
        ("lt1", "under 1 s", None, 1.0),
        ("1-5", "1 to 5 s", 1.0, 5.0),
        ("5-30", "5 to 30 s", 5.0, 30.0),
        ("ge30", "30 s and over", 30.0, None),
        ("none", "no text", None, None),
    )

    def within(
        self, queryset: QuerySet[Run], low: float | None, high: float | None
    ) -> QuerySet[Run]:
        if low is None and high is None:
            return queryset.filter(first_token_at__isnull=True)
        # Compared as moments, not durations: the same SQL on every database.
        if low is not None:
            queryset = queryset.filter(first_token_at__gte=F("started_at") + timedelta(seconds=low))
        if high is not None:
            queryset = queryset.filter(first_token_at__lt=F("started_at") + timedelta(seconds=high))
        return queryset


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    list_display = (
        "short_id",
        "started",
        "session",
        "prompt_excerpt",
        "status",
        "owner_excerpt",
        "total_tokens",
        "cost",
        "time_to_first_token",
    )
    list_filter = ("status", "started_at", UsageFilter, CostFilter, FirstTokenFilter)
    search_fields = ("session_key", "prompt", "id")
    date_hierarchy = "started_at"
    ordering = ("-started_at",)
    list_per_page = 50
    actions = ("stop_runs", "cancel_queued_runs")
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "id",
                    "session_key",
                    "run_status",
                    "owner",
                    "user",
                    "prompt",
                    "options",
                    "output_text",
                    "error_text",
                )
            },
        ),
        (
            _("Usage"),
            {"fields": USAGE_ROWS},
        ),
        (_("Times"), {"fields": ("started", "first_token", "last_checkpoint", "finished")}),
        (_("Log"), {"fields": ("last_event",)}),
    )

    #: What the list sums for the runs it shows (`changelist_view`).
    TOTALS = (*TOKEN_KEYS, "cost")
    #: The rows of a run's page that follow it while it is in flight: the
    #: display methods that `live_view` gives the page again at each poll.
    LIVE_FIELDS = (
        "run_status",
        "output_text",
        "error_text",
        *USAGE_ROWS,
        "first_token",
        "last_checkpoint",
        "finished",
        "last_event",
    )
    #: How the events of a run's log show on its page and in `live_view`.
    EVENTS_TEMPLATE = "admin/detached_runs/run/log_events.html"

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        """The list, and the sums of its runs' tokens and costs, their count,
        how many of them are estimated and their mean time to first token:
        over every run the filters and the search select (all pages), in one
        query (``usage_totals`` in the template's context)."""
        response = super().changelist_view(request, extra_context)
        if not isinstance(response, TemplateResponse) or response.context_data is None:
            return response  # a redirect (an action), or an error page
        changelist = response.context_data.get("cl")
        if changelist is None:
            return response
        totals = changelist.queryset.order_by().aggregate(
            runs=Count("pk"),
            estimated=Count("pk", filter=Q(usage__estimated=True)),
            # Summed as floats: SQLite's integer sum() raises "integer overflow"
            # past 2**63 - 1, which 1,025 runs at the largest count a report may
            # have (2**53 - 1, docs/usage.md) reach; a float sum never fails, and
            # is exact while the sum stays below 2**53.
            **{key: Sum(Cast(_tokens(key), FloatField())) for key in TOKEN_KEYS},
            cost=Sum(_cost()),
            ttft=Avg(_ttft()),
        )
        response.context_data["usage_totals"] = {
            "runs": totals["runs"],
            "estimated": totals["estimated"],
            **{key: f"{round(totals[key] or 0):,}" for key in TOKEN_KEYS},
            "cost": _money(totals["cost"] or 0.0),
            "ttft": _seconds(totals["ttft"]),
        }
        return response

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Run | None = None) -> bool:
        """No run changes through a form: its page is a view without Save
        buttons, and a POST to it is refused (403). Without a run, the
        permission is the user's: the list's actions, which stop runs in
        flight and cancel queued ones, need it."""
        if obj is not None:
            return False
        return super().has_change_permission(request)

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "<path:object_id>/live/",
                self.admin_site.admin_view(self.live_view),
                name=self._live_url_name,
            ),
            *super().get_urls(),
        ]

    @property
    def _live_url_name(self) -> str:
        return f"{self.opts.app_label}_{self.opts.model_name}_live"

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: Run | None = None,
    ) -> HttpResponse:
        # The page shows the run as it is now: live while in flight, with the
        # events of its log; its script follows it from there (`live_view`).
        if obj is not None:
            context.update(self._live_context(request, obj))
        return super().render_change_form(request, context, add, change, form_url, obj)

    def live_view(self, request: HttpRequest, object_id: str) -> JsonResponse:
        """``GET <id>/live/``, for staff who may view the run: the run as it
        is now, what its page's script polls while it is in flight.

        A JSON object: the run's ``as_json()`` (``status``, ``output``: its
        whole text so far, ``usage``, ``started_at``, ``first_token_at``,
        ``finished_at`` as ISO 8601...) and ``in_flight`` (running or
        waiting: poll again), ``last_event_id``, ``time_to_first_token``
        (seconds, or null), ``log`` (``{"events": {type: count}, "text_chars":
        characters of text, "last_event_id"}``, or null once the log is no
        longer kept), ``fields`` (each live row of the page as it shows it:
        `LIVE_FIELDS`) and ``events_html`` (the page's table of events).

        Errors, as ``{"error": message}``: 404 for an unknown run, 403 for a
        staff user without the view permission, 405 for another method, 503
        if the backend cannot be reached. Someone not logged in as staff is
        redirected to the admin's login page, as for any admin page.
        """
        if request.method != "GET":
            return JsonResponse({"error": "Use GET."}, status=405)
        obj = self.get_object(request, unquote(object_id))
        if obj is None:
            return JsonResponse({"error": "No such run."}, status=404)
        if not self.has_view_or_change_permission(request, obj):
            return JsonResponse({"error": "You may not view this run."}, status=403)
        try:
            summary = async_to_sync(live.refresh)(obj)
        except BackendUnavailable as error:
            return JsonResponse({"error": str(error)}, status=503)
        first_token = obj.first_token_at
        return JsonResponse(
            {
                **obj.as_json(),
                "in_flight": obj.is_running,
                "last_event_id": obj.last_event_id,
                "time_to_first_token": (
                    None if first_token is None else (first_token - obj.started_at).total_seconds()
                ),
                "log": None
                if summary is None
                else {
                    "events": summary.counts,
                    "text_chars": summary.text_chars,
                    "last_event_id": summary.last_id,
                },
                "fields": {name: str(getattr(self, name)(obj)) for name in self.LIVE_FIELDS},
                "events_html": render_to_string(
                    self.EVENTS_TEMPLATE, self._events_context(obj, summary), request
                ),
            }
        )

    def _live_context(self, request: HttpRequest, obj: Run) -> dict[str, Any]:
        unreachable = ""
        try:
            summary = async_to_sync(live.refresh)(obj)
        except BackendUnavailable as error:
            # The page shows the row; its script, if the run is in flight, tries again.
            summary, unreachable = None, str(error)
        return {
            "live_url": reverse(
                f"admin:{self._live_url_name}",
                args=(obj.pk,),
                current_app=self.admin_site.name,
            ),
            "run_in_flight": obj.is_running,
            "events_template": self.EVENTS_TEMPLATE,
            **self._events_context(obj, summary, unreachable),
        }

    def _events_context(
        self, obj: Run, summary: live.LogSummary | None, unreachable: str = ""
    ) -> dict[str, Any]:
        """The table of the log's events (``log_events``): a row per event
        type, the text as its characters (the log merges consecutive
        deltas), with the time the run records for it (its start, first
        token, end); or why there is none (``log_missing``)."""
        if summary is None:
            if unreachable:
                missing = gettext("The log cannot be read now: %(error)s") % {"error": unreachable}
            elif obj.is_running:
                missing = gettext("This process does not hold the log (another may drive the run).")
            else:
                missing = gettext("Log no longer kept: the run is served from its row.")
            return {"log_events": None, "log_missing": missing}
        times = {"start": obj.started_at, "done": obj.finished_at}
        events = [
            {"event": event, "count": f"{count:,}", "at": _moment(times.get(event))}
            for event, count in summary.counts.items()
        ]
        if summary.text_chars:
            chars = summary.text_chars
            text = ngettext("%(chars)s character", "%(chars)s characters", chars) % {
                "chars": f"{chars:,}"
            }
            # Where its text begins: after the start.
            events.insert(
                min(1, len(events)),
                {"event": "delta", "count": text, "at": _moment(obj.first_token_at)},
            )
        return {"log_events": events, "log_missing": ""}

    @admin.display(description=_("id"), ordering="id")
    def short_id(self, obj: Run) -> str:
        return str(obj.id)[:8]

    @admin.display(description=_("session"), ordering="session_key")
    def session(self, obj: Run) -> SafeString:
        return _excerpt(obj.session_key, 20)

    @admin.display(description=_("prompt"))
    def prompt_excerpt(self, obj: Run) -> SafeString:
        return _excerpt(obj.prompt, 40)

    @admin.display(description=_("owner"), ordering="owner")
    def owner_excerpt(self, obj: Run) -> SafeString:
        return _excerpt(obj.owner, 14)

    @admin.display(description=_("started"), ordering="started_at")
    def started(self, obj: Run) -> str:
        return _moment(obj.started_at)

    @admin.display(description=_("finished"), ordering="finished_at")
    def finished(self, obj: Run) -> str:
        return _moment(obj.finished_at)

    @admin.display(description=_("first token"))
    def first_token(self, obj: Run) -> str:
        return _moment(obj.first_token_at)

    @admin.display(description=_("last checkpoint"))
    def last_checkpoint(self, obj: Run) -> str:
        return _moment(obj.updated_at)

    @admin.display(description=_("status"))
    def run_status(self, obj: Run) -> str:
        return str(obj.get_status_display())

    @admin.display(description=_("output"))
    def output_text(self, obj: Run) -> str:
        return obj.output

    @admin.display(description=_("error"))
    def error_text(self, obj: Run) -> str:
        return obj.error or "-"

    @admin.display(description=_("usage"))
    def usage_json(self, obj: Run) -> str:
        usage = _usage(obj)
        return json.dumps(usage, ensure_ascii=False) if usage else "-"

    @admin.display(description=_("last event id"))
    def last_event(self, obj: Run) -> str:
        return obj.last_event_id or "-"

    @admin.display(description=_("input tokens"), ordering=_tokens("input_tokens"))
    def input_tokens(self, obj: Run) -> str:
        return _count(obj, "input_tokens")

    @admin.display(description=_("output tokens"), ordering=_tokens("output_tokens"))
    def output_tokens(self, obj: Run) -> str:
        return _count(obj, "output_tokens")

    @admin.display(description=_("total tokens"), ordering=_tokens("total_tokens"))
    def total_tokens(self, obj: Run) -> str:
        return _count(obj, "total_tokens")

    @admin.display(description=_("cost"), ordering=_cost())
    def cost(self, obj: Run) -> str:
        cost = _usage(obj).get("cost")
        if not isinstance(cost, int | float) or isinstance(cost, bool):
            return "-"
        return ("≈ " if _usage(obj).get("estimated") is True else "") + _money(cost)

    @admin.display(description=_("time to first token"), ordering=_ttft())
    def time_to_first_token(self, obj: Run) -> str:
        if obj.first_token_at is None:
            return "-"
        return _seconds(obj.first_token_at - obj.started_at)

    @admin.action(description=_("Stop selected runs in flight"), permissions=["change"])
    def stop_runs(self, request: HttpRequest, queryset: QuerySet[Run]) -> None:
        stopped = 0
        for run in queryset.filter(status__in=(Run.Status.RUNNING, Run.Status.WAITING)):
            # Under ASGI this runs the coroutine on the server's loop, where the run lives.
            stopped += bool(async_to_sync(runs.get_service().stop_run)(run.id))
        self.message_user(
            request,
            ngettext("Stopped %d run.", "Stopped %d runs.", stopped) % stopped,
            messages.SUCCESS if stopped else messages.WARNING,
        )

    @admin.action(description=_("Cancel selected queued runs"), permissions=["change"])
    def cancel_queued_runs(self, request: HttpRequest, queryset: QuerySet[Run]) -> None:
        # Saved as stopped with no output; a run that started meanwhile is not
        # touched (stop it instead).
        cancelled = rows.cancel_runs(list(queryset.values_list("pk", flat=True)))
        self.message_user(
            request,
            ngettext("Cancelled %d queued run.", "Cancelled %d queued runs.", cancelled)
            % cancelled,
            messages.SUCCESS if cancelled else messages.WARNING,
        )


def _usage(obj: Run) -> dict[str, Any]:
    return obj.usage if isinstance(obj.usage, dict) else {}


def _count(obj: Run, key: str) -> str:
    """A token count as the list shows it: ``≈`` before an estimate, ``-`` if none."""
    value = _usage(obj).get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        return "-"
    return ("≈ " if _usage(obj).get("estimated") is True else "") + f"{value:,}"


def _money(amount: float) -> str:
    """A cost to six decimals, without trailing zeros (a run often costs less than a cent)."""
    return f"{amount:,.6f}".rstrip("0").rstrip(".")


def _seconds(duration: timedelta | None) -> str:
    return "-" if duration is None else f"{duration.total_seconds():.2f} s"


def _moment(value: datetime | None) -> str:
    """A time to the second, in the current time zone: ``2025-01-31 14:05:09``."""
    if value is None:
        return "-"
    if timezone.is_aware(value):
        value = localtime(value)
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _excerpt(text: str, size: int) -> SafeString:
    """``text`` on one line, cut to ``size`` characters with an ellipsis; the
    whole of it (up to 1,000 characters) in its title, shown on hover."""
    line = " ".join(text.split())
    if len(line) <= size:
        return format_html("{}", line)
    return format_html('<span title="{}">{}…</span>', line[:1000], line[: size - 1])

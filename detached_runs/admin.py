"""The admin of runs: a record of what happened, read only; with each run's
usage (tokens, cost, time to first token) in the list and on its page,
filters on them, and their sums for the runs the list shows (its filters
and search applied: `RunAdmin.changelist_view`).

A run's page is a view, never a form (no Save buttons; a POST to it is
refused). Times show to the second.

Token counts and costs are read from `Run.usage` in SQL (a JSON key, cast to
a number: ``usage__input_tokens``), which SQLite, PostgreSQL and MariaDB or
MySQL all do; the agent boundary made sure they are numbers
(`detached_runs.usage.clean_usage`)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from asgiref.sync import async_to_sync
from django.contrib import admin, messages
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
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.timezone import localtime
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from . import rows, runs
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
                    "status",
                    "owner",
                    "user",
                    "prompt",
                    "options",
                    "output",
                    "error",
                )
            },
        ),
        (
            _("Usage"),
            {
                "fields": (
                    "input_tokens",
                    "output_tokens",
                    "total_tokens",
                    "cost",
                    "time_to_first_token",
                    "usage",
                )
            },
        ),
        (_("Times"), {"fields": ("started", "first_token", "last_checkpoint", "finished")}),
        (_("Log"), {"fields": ("last_event_id",), "classes": ("collapse",)}),
    )

    #: What the list sums for the runs it shows (`changelist_view`).
    TOTALS = (*TOKEN_KEYS, "cost")

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

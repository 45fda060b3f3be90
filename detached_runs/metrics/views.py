"""The metrics URL: the Prometheus text format, for staff or a bearer token."""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import re
from typing import Any

from django.db.models import Count, Q
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache

from ..backends.base import ACTIVE
from ..conf import get_config
from ..db import database_errors
from ..models import Run
from ..workers import pid_gone, stale_after
from . import prometheus_client

logger = logging.getLogger(__name__)

#: The statuses ``detached_runs_runs`` reports, read from the database.
COUNTED = (Run.Status.RUNNING, Run.Status.WAITING, Run.Status.QUEUED)


@never_cache  # each scrape reads the figures of now, whatever caches the project has
def metrics(request: HttpRequest) -> HttpResponse:
    """``GET``: every metric of this process (or of all of them, in
    prometheus_client's multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR``), and
    ``detached_runs_runs{status}`` counted in the database.

    Answers ``403`` unless the request's user is staff or it carries
    ``Authorization: Bearer <DETACHED_RUNS["METRICS_TOKEN"]>``; ``501``
    without prometheus_client (the ``metrics`` extra); ``405`` for another
    method.

    The database failing (when its failures are worth reading) takes
    nothing from a scraper with the token: the token is checked before the
    user (whose session is in the database), and ``detached_runs_runs`` is
    left out of an answer that has every other figure. A request that only
    its user may let in gets ``503`` then."""
    if request.method not in ("GET", "HEAD"):
        return _plain(405, "Use GET.", Allow="GET, HEAD")
    try:
        allowed = _allowed(request)
    except database_errors():
        logger.warning("Metrics: the database is unavailable; could not tell who asks")
        return _plain(503, "The database is unavailable; try again.", **{"Retry-After": "1"})
    if not allowed:
        return _plain(403, "Staff only, or Authorization: Bearer <METRICS_TOKEN>.")
    if prometheus_client is None:
        return _plain(
            501,
            "Metrics need prometheus_client: pip install 'prometheus_client>=0.20'.",
        )
    from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess

    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        _forget_dead_processes(path)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    counted = CollectorRegistry()
    counted.register(_RunsInDatabase())
    body = generate_latest(registry) + generate_latest(counted)
    return HttpResponse(body, content_type=prometheus_client.CONTENT_TYPE_LATEST)


#: The file of a process's live gauges in prometheus_client's multiprocess
#: directory (``gauge_livesum_<pid>.db``): `metrics.subscribers`.
_LIVE_GAUGES = re.compile(r"\Agauge_live[a-z]+_(\d+)\.db\Z")


def _forget_dead_processes(path: str) -> None:
    """Drop the live gauges of the processes that are gone.

    prometheus_client keeps a process's file after it exits; its live
    gauges (the clients it streamed to) are dropped only by
    ``mark_process_dead(pid)``, which a server that restarts one worker at
    a time, or a worker killed with ``kill -9``, never calls. Every scrape
    does it here: the directory is this host's, so a pid that no process
    has is a process that is gone. Its counters and histograms stay, as
    prometheus_client means them to."""
    from prometheus_client import multiprocess

    try:
        names = os.listdir(path)
    except OSError:
        return  # prometheus_client says what is wrong with the directory
    for name in names:
        match = _LIVE_GAUGES.match(name)
        if match is not None and pid_gone(int(match[1])):
            with contextlib.suppress(OSError):  # another worker's scrape was first
                multiprocess.mark_process_dead(int(match[1]), path)


def _allowed(request: HttpRequest) -> bool:
    """The bearer token (`METRICS_TOKEN`, if the system check would take it),
    else a staff user: the token first, since the user is read from the
    database (its session), which may be down."""
    token = get_config()["METRICS_TOKEN"]
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    # A token the system check refuses (E010: not a string of 16 characters
    # or more) lets nobody in: daphne and uvicorn do not run the checks.
    if (
        isinstance(token, str)
        and len(token) >= 16
        and scheme.lower() == "bearer"
        and hmac.compare_digest(value.strip().encode(), str(token).encode())
    ):
        return True
    user = getattr(request, "user", None)
    return bool(user is not None and user.is_active and user.is_staff)


class _RunsInDatabase:
    """``detached_runs_runs{status}``: the runs in flight (``running``,
    ``waiting``) and ``queued``, as the database has them (one query).

    A row left ``running`` by a worker that died is not in flight: it stays
    so until something reads it (`RunService.resolve`), which may be never.
    So a row in flight counts only while its heartbeat is fresh (younger
    than `workers.stale_after`), the app's own test of a live worker."""

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        try:
            found = dict(
                Run.objects.filter(
                    Q(status=Run.Status.QUEUED)
                    | Q(status__in=ACTIVE, updated_at__gte=timezone.now() - stale_after())
                )
                .order_by()
                .values_list("status")
                .annotate(n=Count("id"))
            )
        except database_errors() as exc:
            # Left out, not guessed: the other figures are this process's own.
            logger.warning("Metrics: detached_runs_runs left out, the database failed: %s", exc)
            return []
        family = GaugeMetricFamily(
            "detached_runs_runs",
            "Runs in flight (running, waiting) and queued, as the database has them.",
            labels=["status"],
        )
        for status in COUNTED:
            family.add_metric([str(status)], found.get(status, 0))
        return [family]


def _plain(status: int, message: str, **headers: str) -> HttpResponse:
    response = HttpResponse(message + "\n", status=status, content_type="text/plain")
    for name, value in headers.items():
        response[name] = value
    return response

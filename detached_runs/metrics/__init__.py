"""Prometheus metrics of runs, in the Prometheus text format.

They need prometheus_client (``pip install "prometheus_client>=0.20"``, or
the ``metrics`` extra of the package); without it every metric
here is a no-op and the metrics view answers ``501``. The view
(`detached_runs.metrics.views.metrics`, mounted with
``include("detached_runs.metrics.urls")``) serves them to staff users or to a
scraper with ``Authorization: Bearer <DETACHED_RUNS["METRICS_TOKEN"]>``.

Several worker processes: set ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's
multiprocess mode, https://prometheus.github.io/client_python/multiprocess/)
in the environment of every worker, to a directory emptied before they start;
any worker's view then serves the sum of all of them.

What is counted where, so that each run is counted once:

* ``detached_runs_runs_started_total``: by the process whose backend took the
  run (`RunService._launch`).
* ``detached_runs_runs_ended_total{status}``, ``..._run_duration_seconds`` and
  ``..._time_to_first_token_seconds``: by the process whose write ended the
  run's row (the run's worker after its final save, or the one that found
  it orphaned or saved its end from Redis), from the row's times.
* ``detached_runs_events_logged_total{event}``, ``..._text_bytes_total`` and
  ``..._stop_latency_seconds``: by the process driving the run. An event
  type the app does not define is counted as ``event="other"`` (agents name
  their own events; a label per name would grow without bound).
* ``detached_runs_subscribers``: the clients each process streams to now.
* ``detached_runs_runs{status}`` (``running``, ``waiting``, ``queued``): read
  from the database at each scrape, so it is the same from every worker.
* ``detached_runs_checkpoint_lag_seconds``: per checkpoint write, how old
  the run's row was (seconds since its last checkpoint or its start).
* ``detached_runs_save_failures_total{save}``: failed database writes of a
  run (``checkpoint``, ``final``: the final save's retries included).
* ``detached_runs_redis_errors_total``: Redis commands that failed (the
  Redis backend; each attempt of a retried write counts).
"""

from __future__ import annotations

from typing import Any

from ..events import RESERVED, USAGE

try:
    import prometheus_client
except ImportError:  # the extra is not installed
    prometheus_client = None  # type: ignore[assignment]

__all__ = [
    "available",
    "event_logged",
    "run_ended",
    "run_started",
    "text_logged",
]

#: Event types counted under their own label: the service's own, and those of
#: the bundled OpenAI-compatible agent (`detached_runs.agents.openai`).
KNOWN_EVENTS = RESERVED | {USAGE, "reasoning", "tool_call", "tool_result"}

#: The histograms' buckets, in seconds.
FIRST_TOKEN_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60)
DURATION_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
STOP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
CHECKPOINT_LAG_BUCKETS = (0.5, 1, 2, 3, 5, 10, 30, 60, 120, 300)


class _Noop:
    """Stands in for a metric without prometheus_client."""

    def labels(self, *args: Any, **kwargs: Any) -> _Noop:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


_NOOP = _Noop()


def available() -> bool:
    """Whether prometheus_client is installed (the ``metrics`` extra)."""
    return prometheus_client is not None


def _metric(kind: str, name: str, documentation: str, **kwargs: Any) -> Any:
    if prometheus_client is None:
        return _NOOP
    return getattr(prometheus_client, kind)(name, documentation, **kwargs)


runs_started = _metric("Counter", "detached_runs_runs_started", "Runs started.")
runs_ended = _metric(
    "Counter", "detached_runs_runs_ended", "Runs ended, by status.", labelnames=["status"]
)
run_duration = _metric(
    "Histogram",
    "detached_runs_run_duration_seconds",
    "Seconds from a run's start to its end.",
    buckets=DURATION_BUCKETS,
)
time_to_first_token = _metric(
    "Histogram",
    "detached_runs_time_to_first_token_seconds",
    "Seconds from a run's start to its first text delta.",
    buckets=FIRST_TOKEN_BUCKETS,
)
events_logged = _metric(
    "Counter",
    "detached_runs_events_logged",
    "Events logged by the runs this process drives, by type (text deltas excluded).",
    labelnames=["event"],
)
text_bytes = _metric(
    "Counter", "detached_runs_text_bytes", "UTF-8 bytes of text logged by the runs driven here."
)
stop_latency = _metric(
    "Histogram",
    "detached_runs_stop_latency_seconds",
    "Seconds from a stop request reaching the run's worker to the run's terminal event.",
    buckets=STOP_BUCKETS,
)
checkpoint_lag = _metric(
    "Histogram",
    "detached_runs_checkpoint_lag_seconds",
    "How old a run's row was when a checkpoint wrote it (seconds since the last one).",
    buckets=CHECKPOINT_LAG_BUCKETS,
)
save_failures = _metric(
    "Counter",
    "detached_runs_save_failures",
    "Database writes of a run that failed, by save (checkpoint, final).",
    labelnames=["save"],
)
redis_errors = _metric(
    "Counter", "detached_runs_redis_errors", "Redis commands that failed (the Redis backend)."
)
subscribers = _metric(
    "Gauge",
    "detached_runs_subscribers",
    "Clients this process streams a run to now.",
    multiprocess_mode="livesum",
)


# Labels known in advance start at 0, so that a dashboard shows 0 rather
# than "no data" before the first one happens.
for _status in ("done", "stopped", "error", "interrupted"):
    runs_ended.labels(status=_status)
for _save in ("checkpoint", "final"):
    save_failures.labels(save=_save)


def run_started() -> None:
    runs_started.inc()


def run_ended(run: Any) -> None:
    """Count the end of ``run`` (a `Run` row: its ``status``, ``started_at``,
    ``finished_at``, ``first_token_at``)."""
    runs_ended.labels(status=run.status).inc()
    if run.started_at is None or run.finished_at is None:
        return
    run_duration.observe(max((run.finished_at - run.started_at).total_seconds(), 0.0))
    if run.first_token_at is not None:
        time_to_first_token.observe(max((run.first_token_at - run.started_at).total_seconds(), 0.0))


def event_logged(event: str) -> None:
    events_logged.labels(event=event if event in KNOWN_EVENTS else "other").inc()


def text_logged(size: int) -> None:
    text_bytes.inc(size)

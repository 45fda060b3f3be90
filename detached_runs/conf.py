"""``settings.DETACHED_RUNS`` with its defaults, read in one place.

`get_config()` returns a merged dict; it is cached and reset when a test
overrides ``DETACHED_RUNS`` (``setting_changed``), like debug-toolbar's.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

DEFAULTS: dict[str, Any] = {
    # Dotted path to (or the callable itself) ``agent(ctx) -> AsyncIterator[str | dict]``.
    "AGENT": None,
    "BACKEND": "detached_runs.backends.memory.MemoryBackend",
    # Keyword arguments of the backend's class, over those it reads from the
    # keys below (EVICT_AFTER...): {"connection_kwargs": {...}} for Redis.
    "BACKEND_OPTIONS": {},
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    # Prefix of every Redis key (several projects can share one Redis).
    "REDIS_PREFIX": "detached_runs",
    # Upper bound of entries in one run's Redis stream. Older entries are not
    # dropped: they are compacted (deltas merged) into the run's head, so that
    # a replay on any worker still has the whole run with the same ids.
    "REDIS_STREAM_MAXLEN": 100_000,
    # Seconds a finished run stays in memory after it ended (and its last subscriber left).
    "EVICT_AFTER": 180.0,
    # Seconds between saves of a running run's output.
    "CHECKPOINT_EVERY": 1.0,
    # Threads the app's queries run on (detached_runs.db): 1 is asgiref's one
    # shared thread; more lets a slow query hold one of them only. SQLite
    # keeps one whatever this says (one writer at a time).
    "DATABASE_THREADS": 1,
    # Seconds of silence after which an SSE stream sends a ": keep-alive" comment.
    "KEEPALIVE": 15.0,
    "SHUTDOWN_TIMEOUT": 10.0,
    # On SIGTERM: "interrupt" the runs in flight, or "drain": take no new runs
    # and let those in flight end within SHUTDOWN_TIMEOUT, then interrupt.
    "SHUTDOWN_MODE": "interrupt",
    "MAX_PROMPT_CHARS": 32_000,
    # Bytes of the JSON of the options sent with a prompt, at most.
    "MAX_OPTIONS_BYTES": 16_384,
    # Dotted path to ``validate(options: dict, owner: str) -> dict`` (the
    # cleaned options); it raises django.core.exceptions.ValidationError to
    # refuse them (400). None: any JSON object within MAX_OPTIONS_BYTES.
    "VALIDATE_OPTIONS": None,
    # What a start does while the session has a run in flight or queued:
    # "interrupt", "reject", "enqueue" or "rollback" (a request may say).
    "MULTITASK": "interrupt",
    # Seconds an agent's question (``ctx.ask``) waits for its answer by
    # default before InputTimeout is raised in the agent (None: no limit).
    "INPUT_TIMEOUT": 3600.0,
    # Bytes of the JSON of an answer's value, at most (400 past it).
    "MAX_INPUT_BYTES": 16_384,
    # Queued runs of one session at most (429 past it).
    "MAX_QUEUED_PER_SESSION": 10,
    # None: no limit.
    "MAX_ACTIVE_RUNS_PER_OWNER": 5,
    # Runs in flight of anonymous owners per client address (an IPv6 address
    # counts as its /64): a new anonymous owner per request escapes the
    # per-owner limit, not this one. Ten lets a household or an office behind
    # one NAT chat at once (a visitor has one run in flight, two of them at
    # the per-owner limit) and keeps one address from holding more than ten
    # agents busy. None: no limit.
    "MAX_ACTIVE_ANONYMOUS_RUNS_PER_ADDRESS": 10,
    "MAX_SUBSCRIBERS_PER_RUN": 100,
    # Let visitors who are not logged in own sessions through their Django session.
    "ALLOW_ANONYMOUS": False,
    # Dotted path to ``may_access(requester: str, run_owner: str, session_key: str) -> bool``.
    "PERMISSION": None,
    # How many earlier runs of the session the agent gets in ``ctx.history``.
    "HISTORY_LIMIT": 50,
    # Seconds an agent may run before it is ended as "error" (None: no limit).
    "RUN_TIMEOUT": None,
    # End runs gracefully on the server's SIGTERM/SIGINT (see detached_runs.lifecycle).
    "HANDLE_SIGNALS": True,
    # The bearer token a scraper sends for the metrics URL (detached_runs.metrics);
    # None: staff users only.
    "METRICS_TOKEN": None,
}

NUMBERS = ("EVICT_AFTER", "CHECKPOINT_EVERY", "KEEPALIVE", "SHUTDOWN_TIMEOUT")
#: Numbers that may also be None.
OPTIONAL_NUMBERS = ("RUN_TIMEOUT", "INPUT_TIMEOUT")
LIMITS = (
    "MAX_PROMPT_CHARS",
    "MAX_OPTIONS_BYTES",
    "MAX_INPUT_BYTES",
    "MAX_QUEUED_PER_SESSION",
    "MAX_ACTIVE_RUNS_PER_OWNER",
    "MAX_ACTIVE_ANONYMOUS_RUNS_PER_ADDRESS",
    "MAX_SUBSCRIBERS_PER_RUN",
    "HISTORY_LIMIT",
    "REDIS_STREAM_MAXLEN",
)
#: Limits that cannot be switched off with None.
REQUIRED_LIMITS = (
    "HISTORY_LIMIT",
    "REDIS_STREAM_MAXLEN",
    "MAX_OPTIONS_BYTES",
    "MAX_INPUT_BYTES",
    "MAX_QUEUED_PER_SESSION",
)
#: The values of ``SHUTDOWN_MODE``.
SHUTDOWN_MODES = ("interrupt", "drain")
#: The values of ``MULTITASK`` (and of a request's ``multitask``).
MULTITASK_POLICIES = ("interrupt", "reject", "enqueue", "rollback")


@cache
def get_config() -> dict[str, Any]:
    user = getattr(settings, "DETACHED_RUNS", None) or {}
    return {**DEFAULTS, **user}


@receiver(setting_changed)
def _reset(*, setting: str, **kwargs: Any) -> None:
    if setting == "DETACHED_RUNS":
        get_config.cache_clear()

"""System checks: a wrong ``DETACHED_RUNS`` shows up in ``manage.py check``,
not as a traceback at the first request."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.utils.module_loading import import_string

from .conf import (
    DEFAULTS,
    LIMITS,
    MULTITASK_POLICIES,
    NUMBERS,
    OPTIONAL_NUMBERS,
    REQUIRED_LIMITS,
    SHUTDOWN_MODES,
    get_config,
)

if TYPE_CHECKING:
    from .backends.base import BaseBackend

#: Keys read by the optional agents of `detached_runs.agents`, not by the app.
AGENT_KEYS = frozenset({"OPENAI"})


def _import(value: Any) -> tuple[Any, str | None]:
    if not isinstance(value, str):
        return value, None
    try:
        return import_string(value), None
    except ImportError as exc:
        return None, str(exc)


def _openai_agent_problem(agent: Any) -> str | None:
    """What is missing or wrong in the settings of the OpenAI agent, if AGENT is
    one. Its module is loaded by then, if it is one (importing AGENT loaded it);
    otherwise it is not imported here, as its package is optional."""
    module = sys.modules.get("detached_runs.agents.openai")
    if module is None or not isinstance(agent, module.OpenAIAgent):
        return None
    try:
        agent.config()
    except ImproperlyConfigured as exc:
        return str(exc)
    return None


def _redis_url_problem(backend: type[BaseBackend], config: dict[str, Any]) -> str | None:
    """What is wrong with the Redis URL of a backend that takes one (its
    ``redis_url`` option, else ``REDIS_URL``), if anything."""
    from .backends.redis_url import parse_redis_url

    if "redis_url" not in backend.option_names():
        return None
    options = config["BACKEND_OPTIONS"]
    url = config["REDIS_URL"]
    if isinstance(options, dict) and "redis_url" in options:
        url = options["redis_url"]
    try:
        parse_redis_url(url)
    except ValueError as exc:
        return str(exc)
    if isinstance(url, str) and "?" in url:
        # Its query is redis-py's options (``?socket_timeout=5``): one it does
        # not take, or a value it refuses, is the URL's fault, not
        # BACKEND_OPTIONS' (the backend is made with the URL alone to find
        # out, and without the query first: a refusal then is another key's).
        from .backends.redis_url import shown_url

        settings = backend.options_from_settings(config)
        try:
            backend(**{**settings, "redis_url": url.partition("?")[0]})
        except (TypeError, ValueError):
            return None
        try:
            backend(**{**settings, "redis_url": url})
        except (TypeError, ValueError) as exc:
            named = "BACKEND_OPTIONS['redis_url']" if url != config["REDIS_URL"] else "REDIS_URL"
            return f"{named} {shown_url(url)} has an option redis-py refuses: {exc}"
    return None


@register(Tags.compatibility)
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    from .backends.base import BaseBackend

    config = get_config()
    errors: list[CheckMessage] = []

    unknown = sorted(set(config) - set(DEFAULTS) - AGENT_KEYS)
    if unknown:
        errors.append(
            Warning(
                f"DETACHED_RUNS has unknown keys: {', '.join(unknown)}.",
                hint=f"Known keys: {', '.join(sorted({*DEFAULTS, *AGENT_KEYS}))}.",
                id="detached_runs.W002",
            )
        )

    backend, problem = _import(config["BACKEND"])
    if problem is not None or not (isinstance(backend, type) and issubclass(backend, BaseBackend)):
        errors.append(
            Error(
                f"DETACHED_RUNS['BACKEND'] = {config['BACKEND']!r} is not a backend class"
                + (f": {problem}" if problem else "."),
                hint="Use 'detached_runs.backends.memory.MemoryBackend' or "
                "'detached_runs.backends.redis.RedisBackend'.",
                id="detached_runs.E001",
            )
        )
    elif (url_problem := _redis_url_problem(backend, config)) is not None:
        # Not E007 as well: the backend, made with this URL to check its
        # options, would refuse the URL again.
        errors.append(
            Error(
                url_problem,
                hint="One server: redis://host:6379/0 (or rediss://, unix://). A cluster: "
                "redis+cluster://host:port,host:port/ (any of its nodes). Sentinel: "
                "redis+sentinel://host:26379,host:26379/<master name>/<db> (see docs/redis.md).",
                id="detached_runs.E014",
            )
        )
    else:
        from .backends import backend_options_problem

        problem = backend_options_problem(backend, config["BACKEND_OPTIONS"])
        if problem is not None:
            errors.append(
                Error(
                    problem,
                    hint="BACKEND_OPTIONS are the keyword arguments of the backend's class.",
                    id="detached_runs.E007",
                )
            )

    if config["AGENT"] is None:
        errors.append(
            Warning(
                "DETACHED_RUNS['AGENT'] is not set: starting a run will fail.",
                hint="Point it at an async generator function: "
                "agent(ctx) -> AsyncIterator[str | dict].",
                id="detached_runs.W001",
            )
        )
    else:
        agent, problem = _import(config["AGENT"])
        if problem is not None or not callable(agent):
            errors.append(
                Error(
                    f"DETACHED_RUNS['AGENT'] = {config['AGENT']!r} "
                    + (f"does not import: {problem}" if problem else "is not callable."),
                    hint="Point it at an async generator function: "
                    "agent(ctx) -> AsyncIterator[str | dict].",
                    id="detached_runs.E002",
                )
            )
        elif (problem := _openai_agent_problem(agent)) is not None:
            errors.append(
                Error(
                    problem,
                    hint="See docs/openai.md ('OpenAI-compatible agent') of detached_runs.",
                    id="detached_runs.E006",
                )
            )

    for key in NUMBERS + OPTIONAL_NUMBERS:
        value = config[key]
        if value is None and key in OPTIONAL_NUMBERS:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            errors.append(
                Error(
                    f"DETACHED_RUNS['{key}'] must be a number of seconds >= 0, not {value!r}.",
                    id="detached_runs.E003",
                )
            )
    for key in LIMITS:
        value = config[key]
        if value is None and key not in REQUIRED_LIMITS:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            errors.append(
                Error(
                    f"DETACHED_RUNS['{key}'] must be a positive integer"
                    + (" or None" if key not in REQUIRED_LIMITS else "")
                    + f", not {value!r}.",
                    id="detached_runs.E004",
                )
            )
    if config["CHECKPOINT_EVERY"] == 0:
        errors.append(
            Error(
                "DETACHED_RUNS['CHECKPOINT_EVERY'] must be more than 0.",
                id="detached_runs.E003",
            )
        )

    hooks = (
        ("PERMISSION", "A callable may_access(requester, run_owner, session_key) -> bool.", 5),
        (
            "VALIDATE_OPTIONS",
            "A callable validate(options: dict, owner: str) -> dict that raises "
            "django.core.exceptions.ValidationError to refuse them.",
            9,
        ),
    )
    for key, hint, number in hooks:
        if config[key] is None:
            continue
        check, problem = _import(config[key])
        if problem is not None or not callable(check):
            errors.append(
                Error(
                    f"DETACHED_RUNS['{key}'] = {config[key]!r} "
                    + (f"does not import: {problem}" if problem else "is not callable."),
                    hint=hint,
                    id=f"detached_runs.E{number:03d}",
                )
            )
    if config["MULTITASK"] not in MULTITASK_POLICIES:
        errors.append(
            Error(
                f"DETACHED_RUNS['MULTITASK'] = {config['MULTITASK']!r} is not a multitask policy.",
                hint=f"Use one of {', '.join(repr(p) for p in MULTITASK_POLICIES)}.",
                id="detached_runs.E008",
            )
        )
    if config["SHUTDOWN_MODE"] not in SHUTDOWN_MODES:
        errors.append(
            Error(
                f"DETACHED_RUNS['SHUTDOWN_MODE'] = {config['SHUTDOWN_MODE']!r} is not a "
                "shutdown mode.",
                hint=f"Use one of {', '.join(repr(m) for m in SHUTDOWN_MODES)}.",
                id="detached_runs.E011",
            )
        )
    threads = config["DATABASE_THREADS"]
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 64:
        errors.append(
            Error(
                f"DETACHED_RUNS['DATABASE_THREADS'] = {threads!r} is not a number of threads "
                "from 1 to 64.",
                hint="Each thread holds a database connection of its own; 4 suits most sites "
                "on PostgreSQL or MySQL (see docs/deploying.md).",
                id="detached_runs.E013",
            )
        )
    elif threads > 1 and any(connections[alias].vendor == "sqlite" for alias in connections):
        errors.append(
            Warning(
                f"DETACHED_RUNS['DATABASE_THREADS'] = {threads} has no effect: a database of "
                "the project is SQLite, and the app keeps one database thread then.",
                hint="SQLite takes one writer at a time: more threads would wait on its lock. "
                "Leave DATABASE_THREADS at 1, or move to PostgreSQL or MySQL.",
                id="detached_runs.W003",
            )
        )
    token = config["METRICS_TOKEN"]
    if token is not None and (not isinstance(token, str) or len(token) < 16):
        errors.append(
            Error(
                "DETACHED_RUNS['METRICS_TOKEN'] must be None or a string of at least 16 "
                "characters.",
                hint="A scraper sends it as 'Authorization: Bearer <token>'; "
                "python -c 'import secrets; print(secrets.token_urlsafe(32))' makes one.",
                id="detached_runs.E010",
            )
        )
    return errors

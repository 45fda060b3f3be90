"""``manage.py check`` reports a wrong DETACHED_RUNS before the first request."""

from __future__ import annotations

from typing import Any

import pytest

from detached_runs.checks import check_settings


@pytest.fixture
def configured(settings: Any) -> Any:
    def apply(**values: Any) -> set[str]:
        settings.DETACHED_RUNS = {"AGENT": "tests.agents.words", **values}
        return {str(message.id) for message in check_settings()}

    return apply


def test_the_test_settings_pass(configured):
    assert configured() == set()


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"BACKEND": "nowhere.Backend"}, "detached_runs.E001"),
        ({"BACKEND": "detached_runs.models.Run"}, "detached_runs.E001"),
        ({"AGENT": "tests.agents.missing"}, "detached_runs.E002"),
        ({"AGENT": "tests.agents.DELAY"}, "detached_runs.E002"),
        ({"AGENT": None}, "detached_runs.W001"),
        ({"EVICT_AFTER": -1}, "detached_runs.E003"),
        ({"CHECKPOINT_EVERY": 0}, "detached_runs.E003"),
        ({"KEEPALIVE": "15"}, "detached_runs.E003"),
        ({"MAX_PROMPT_CHARS": 0}, "detached_runs.E004"),
        ({"MAX_SUBSCRIBERS_PER_RUN": 2.5}, "detached_runs.E004"),
        ({"REDIS_STREAM_MAXLEN": 0}, "detached_runs.E004"),
        ({"REDIS_STREAM_MAXLEN": None}, "detached_runs.E004"),
        ({"PERMISSION": "tests.nothing.here"}, "detached_runs.E005"),
        ({"EVICT_AFTERR": 3}, "detached_runs.W002"),
        ({"BACKEND_OPTIONS": {"evict_afterr": 3}}, "detached_runs.E007"),
        ({"BACKEND_OPTIONS": {"redis_url": "redis://x"}}, "detached_runs.E007"),  # memory's
        ({"BACKEND_OPTIONS": [("evict_after", 3)]}, "detached_runs.E007"),
        ({"BACKEND_OPTIONS": {"evict_after": "soon"}}, "detached_runs.E007"),
        ({"BACKEND_OPTIONS": {"evict_after": -5}}, "detached_runs.E007"),
        ({"BACKEND_OPTIONS": {"evict_after": float("nan")}}, "detached_runs.E007"),
        ({"BACKEND_OPTIONS": {"evict_after": True}}, "detached_runs.E007"),
        ({"BACKEND_OPTIONS": {"max_subscribers": 0}}, "detached_runs.E007"),
        ({"BACKEND_OPTIONS": {"max_subscribers": "x"}}, "detached_runs.E007"),
        ({"MULTITASK": "queue"}, "detached_runs.E008"),
        ({"MULTITASK": None}, "detached_runs.E008"),
        ({"VALIDATE_OPTIONS": "tests.nothing.here"}, "detached_runs.E009"),
        ({"VALIDATE_OPTIONS": "tests.agents.DELAY"}, "detached_runs.E009"),
        ({"METRICS_TOKEN": "short"}, "detached_runs.E010"),
        ({"SHUTDOWN_MODE": "wait"}, "detached_runs.E011"),
        ({"SHUTDOWN_MODE": None}, "detached_runs.E011"),
        ({"METRICS_TOKEN": 1234567890123456789}, "detached_runs.E010"),
        ({"DATABASE_THREADS": 0}, "detached_runs.E013"),
        ({"DATABASE_THREADS": "4"}, "detached_runs.E013"),
        ({"DATABASE_THREADS": True}, "detached_runs.E013"),
        ({"MAX_OPTIONS_BYTES": None}, "detached_runs.E004"),
        ({"MAX_QUEUED_PER_SESSION": 0}, "detached_runs.E004"),
    ],
)
def test_a_wrong_setting_is_reported_with_its_id(configured, values, expected):
    assert expected in configured(**values)


def test_limits_may_be_switched_off_with_none(configured):
    assert configured(MAX_ACTIVE_RUNS_PER_OWNER=None, MAX_SUBSCRIBERS_PER_RUN=None) == set()


def test_manage_py_check_fails_on_an_error(settings):
    from django.core.management import call_command
    from django.core.management.base import SystemCheckError

    settings.DETACHED_RUNS = {"AGENT": "tests.agents.words", "EVICT_AFTER": -5}
    with pytest.raises(SystemCheckError, match="EVICT_AFTER"):
        call_command("check")


def test_the_options_of_the_redis_backend_pass(configured):
    pytest.importorskip("redis")
    backend = "detached_runs.backends.redis.RedisBackend"
    options = {"redis_prefix": "x", "connection_kwargs": {"client_name": "y"}, "evict_after": 1}
    assert configured(BACKEND=backend, BACKEND_OPTIONS=options) == set()
    assert "detached_runs.E007" in configured(BACKEND=backend, BACKEND_OPTIONS={"prefix": "x"})
    # A renewal less often than three times a lease: its runs would be taken for dead.
    short = {"lease_ms": 1000, "renew_every": 0.5}
    assert "detached_runs.E007" in configured(BACKEND=backend, BACKEND_OPTIONS=short)


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://h:7000,,h:7001/",
        "redis+cluster://h:7000/1",
        "redis+sentinel://s:26379",
        "redis+sentinel://s:26379/mymaster/zero",
        "http://h:6379/0",
        6379,
        "redis://127.0.0.1:notaport/0",
        "redis://127.0.0.1:6379/abc",
        # Options of redis-py's it does not take, or values it refuses: the
        # URL's fault, not BACKEND_OPTIONS' (it was E007, blaming them).
        "redis://127.0.0.1:6379/0?bogus=1",
        "redis://127.0.0.1:6379/0?socket_timeout=abc",
    ],
)
def test_a_malformed_redis_url_is_reported_once_as_e014(configured, url):
    pytest.importorskip("redis")
    backend = "detached_runs.backends.redis.RedisBackend"
    assert configured(BACKEND=backend, REDIS_URL=url) == {"detached_runs.E014"}
    # The backend's own option wins over REDIS_URL, and is checked the same way.
    options = {"redis_url": url}
    assert configured(BACKEND=backend, BACKEND_OPTIONS=options) == {"detached_runs.E014"}


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://h:7000,h:7001/",
        "redis+sentinel://s:26379,t/mymaster/1",
        "redis://127.0.0.1:6379/0?socket_timeout=5",
    ],
)
def test_redis_urls_of_other_forms_pass(configured, url):
    pytest.importorskip("redis")
    assert configured(BACKEND="detached_runs.backends.redis.RedisBackend", REDIS_URL=url) == set()


@pytest.mark.parametrize(
    "options",
    [
        {"lease_ms": float("inf")},
        {"lease_ms": "10000"},
        {"lease_ms": 999.9, "renew_every": 0.3333},
        {"renew_every": float("nan")},
        {"connection_kwargs": {"socket_timeoutt": 1}},  # a typo redis-py refuses
    ],
)
def test_redis_options_a_backend_would_refuse_at_its_first_use_are_reported(configured, options):
    pytest.importorskip("redis")
    backend = "detached_runs.backends.redis.RedisBackend"
    assert "detached_runs.E007" in configured(BACKEND=backend, BACKEND_OPTIONS=options)


def test_database_threads_on_sqlite_are_said_to_have_no_effect(configured):
    from django.db import connection

    on_sqlite = connection.vendor == "sqlite"  # the SQLite pass; not PostgreSQL's, MariaDB's
    assert configured(DATABASE_THREADS=4) == ({"detached_runs.W003"} if on_sqlite else set())
    assert configured(DATABASE_THREADS=1) == set()

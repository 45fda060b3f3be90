"""Settings for the test suite: SQLite by default; PostgreSQL or MariaDB/MySQL when
DATABASE_URL is set (postgres://... or mysql://...)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = "tests-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "detached_runs",
]
# Middleware that rewrites or caches responses, as real projects have it:
# every test runs with it, so none of it may buffer, compress or cache a
# stream or a run's status.
MIDDLEWARE = [
    "django.middleware.cache.UpdateCacheMiddleware",
    "django.middleware.gzip.GZipMiddleware",
    "django.middleware.http.ConditionalGetMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.cache.FetchFromCacheMiddleware",
]
ROOT_URLCONF = "tests.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
ASGI_APPLICATION = "tests.asgi.application"
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def _database() -> dict[str, object]:
    url = os.environ.get("DATABASE_URL")
    if not url:
        # A file, not :memory:, so a server process started by a test shares it.
        # One file per test run, so that runs side by side (two checkouts, or
        # a developer's run beside CI's) do not share, and delete, one database.
        name = os.environ.setdefault(
            "DETACHED_RUNS_TEST_DB", str(BASE_DIR / "tests" / f"test-{os.getpid()}.sqlite3")
        )
        options: dict[str, object] = {
            # Seconds a write waits for SQLite's lock (a server process of a
            # fault test waits less, to fail while the test holds the lock).
            "timeout": float(os.environ.get("TEST_SQLITE_TIMEOUT", "20")),
        }
        if "TEST_SQLITE_TRANSACTION_MODE" in os.environ:
            # Server processes, several on one file: as docs/deploying.md
            # advises, a transaction takes the write lock as it begins (a
            # deferred one that read first fails at once with "database is
            # locked" when another process wrote meanwhile: no wait helps).
            options["transaction_mode"] = os.environ["TEST_SQLITE_TRANSACTION_MODE"]
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": name,
            "TEST": {"NAME": name},
            "OPTIONS": options,
        }
    parts = urlparse(url)
    mysql = parts.scheme in ("mysql", "mariadb")
    database: dict[str, object] = {
        "ENGINE": f"django.db.backends.{'mysql' if mysql else 'postgresql'}",
        "NAME": parts.path.lstrip("/"),
        "USER": parts.username or ("root" if mysql else "postgres"),
        "PASSWORD": parts.password or "",
        "HOST": parts.hostname or "127.0.0.1",
        "PORT": str(parts.port or (3306 if mysql else 5432)),
    }
    if mysql:
        # Every character an answer can hold, emoji included (MySQL's "utf8"
        # stops at three bytes).
        database["OPTIONS"] = {"charset": "utf8mb4"}
        database["TEST"] = {"CHARSET": "utf8mb4", "COLLATION": "utf8mb4_unicode_ci"}
    return database


DATABASES = {"default": _database()}

DETACHED_RUNS = {
    "AGENT": os.environ.get("TEST_AGENT", "tests.agents.words"),
    "ALLOW_ANONYMOUS": True,
    "CHECKPOINT_EVERY": 0.2,
    # The end-to-end server process takes these from its environment.
    "KEEPALIVE": float(os.environ.get("TEST_KEEPALIVE", "15")),
    "EVICT_AFTER": float(os.environ.get("TEST_EVICT_AFTER", "180")),
    "SHUTDOWN_TIMEOUT": float(os.environ.get("TEST_SHUTDOWN_TIMEOUT", "10")),
    "SHUTDOWN_MODE": os.environ.get("TEST_SHUTDOWN_MODE", "interrupt"),
    "MAX_ACTIVE_RUNS_PER_OWNER": int(os.environ.get("TEST_MAX_ACTIVE_RUNS_PER_OWNER", "5")),
    "MAX_QUEUED_PER_SESSION": int(os.environ.get("TEST_MAX_QUEUED_PER_SESSION", "3")),
    "VALIDATE_OPTIONS": "tests.agents.validate_options",
    "METRICS_TOKEN": "metrics-token-for-the-tests",
}

if os.environ.get("TEST_BACKEND") == "redis":
    # The whole suite against the Redis backend (a fresh key prefix per process).
    DETACHED_RUNS["BACKEND"] = "detached_runs.backends.redis.RedisBackend"
    DETACHED_RUNS["REDIS_PREFIX"] = os.environ.setdefault(
        "TEST_REDIS_PREFIX", f"dr-suite-{os.getpid()}"
    )
    # An end-to-end test may give its servers a Redis of its own, or a bound.
    if "TEST_REDIS_URL" in os.environ:
        DETACHED_RUNS["REDIS_URL"] = os.environ["TEST_REDIS_URL"]
    if "TEST_REDIS_STREAM_MAXLEN" in os.environ:
        DETACHED_RUNS["REDIS_STREAM_MAXLEN"] = int(os.environ["TEST_REDIS_STREAM_MAXLEN"])
    # A short lease, for a test that waits for a dead worker's to lapse.
    if "TEST_REDIS_LEASE_MS" in os.environ:
        DETACHED_RUNS["BACKEND_OPTIONS"] = {
            "lease_ms": int(os.environ["TEST_REDIS_LEASE_MS"]),
            "renew_every": float(os.environ["TEST_REDIS_RENEW_EVERY"]),
        }

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "detached_runs": {"handlers": ["console"], "level": os.environ.get("LOG", "WARNING")}
    },
}

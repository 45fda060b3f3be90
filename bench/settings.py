"""Settings of the Django process the HTTP benchmarks start."""

from __future__ import annotations

import os
from urllib.parse import urlparse

SECRET_KEY = "bench-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "bench.site"
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "detached_runs",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]


def _database() -> dict[str, object]:
    url = os.environ.get("BENCH_DATABASE_URL")
    if url:  # e.g. postgres://postgres@127.0.0.1:5432/postgres
        parts = urlparse(url)
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": parts.path.lstrip("/"),
            "USER": parts.username or "",
            "PASSWORD": parts.password or "",
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
        }
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("BENCH_DB", "/tmp/detached_runs_bench.sqlite3"),
        # What a Django site on SQLite under load wants: WAL lets readers run
        # beside the writer, IMMEDIATE takes the write lock up front instead of
        # failing an upgrade, NORMAL syncs at checkpoints, not every commit.
        # Writers still wait for each other in SQLite's busy handler, which
        # sleeps in steps of up to 100 ms: that is SQLite's tail, not the app's.
        "OPTIONS": {
            "timeout": 30,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
        },
    }


DATABASES = {"default": _database()}
# BENCH_SESSIONS=cache keeps sessions in the process's memory (as a site would
# in Redis or memcached) instead of a database row read per request.
if os.environ.get("BENCH_SESSIONS") == "cache":
    SESSION_ENGINE = "django.contrib.sessions.backends.cache"
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DETACHED_RUNS = {
    "AGENT": "bench.site.agent",
    "ALLOW_ANONYMOUS": True,
    "MAX_SUBSCRIBERS_PER_RUN": None,
    "MAX_ACTIVE_RUNS_PER_OWNER": None,
    # The load client is one address starting hundreds of anonymous runs.
    "MAX_ACTIVE_ANONYMOUS_RUNS_PER_ADDRESS": None,
    "HANDLE_SIGNALS": False,
    "EVICT_AFTER": 600,
    "CHECKPOINT_EVERY": float(os.environ.get("BENCH_CHECKPOINT_EVERY", "1")),
    "DATABASE_THREADS": int(os.environ.get("BENCH_DATABASE_THREADS", "1")),
}

"""Settings of the Django process the HTTP benchmarks start."""

from __future__ import annotations

import os

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
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("BENCH_DB", "/tmp/detached_runs_bench.sqlite3"),
        # What a Django site on SQLite under load wants: WAL lets readers run
        # beside the writer, IMMEDIATE takes the write lock up front instead of
        # failing an upgrade, NORMAL syncs at checkpoints, not every commit.
        "OPTIONS": {
            "timeout": 30,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
        },
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DETACHED_RUNS = {
    "AGENT": "bench.site.agent",
    "ALLOW_ANONYMOUS": True,
    "MAX_SUBSCRIBERS_PER_RUN": None,
    "MAX_ACTIVE_RUNS_PER_OWNER": None,
    "HANDLE_SIGNALS": False,
    "EVICT_AFTER": 600,
    "CHECKPOINT_EVERY": float(os.environ.get("BENCH_CHECKPOINT_EVERY", "1")),
}

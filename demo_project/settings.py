"""Settings of the demo site: SQLite, anonymous visitors allowed, and the offline
agent, or a real model when an OpenAI-compatible endpoint is configured in the
environment (``OPENAI_MODEL`` plus ``OPENAI_BASE_URL`` and/or ``OPENAI_API_KEY``)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "demo-only-insecure-key-change-me")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = [
    "localhost",
    "127.0.0.1",
    "[::1]",
    *os.environ.get("DJANGO_ALLOWED_HOSTS", "").split(),
]

INSTALLED_APPS = [
    "daphne",  # first: its runserver serves ASGI, which streaming needs
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "detached_runs",
    "demo_project",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # As many projects have it: detached_runs keeps it off the event streams,
    # and the browser tests, which drive this site, run with it.
    "django.middleware.gzip.GZipMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "demo_project.urls"
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
ASGI_APPLICATION = "demo_project.asgi.application"


def _database() -> dict[str, object]:
    url = os.environ.get("DATABASE_URL")
    if not url:
        name = os.environ.get("DEMO_SQLITE", str(BASE_DIR / "demo.sqlite3"))
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": name}
    parts = urlparse(url)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": parts.path.lstrip("/"),
        "USER": parts.username or "postgres",
        "PASSWORD": parts.password or "",
        "HOST": parts.hostname or "127.0.0.1",
        "PORT": str(parts.port or 5432),
    }


DATABASES = {"default": _database()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "static/"


#: What the demo tells a real model (only used with an OpenAI-compatible endpoint).
DEMO_SYSTEM_PROMPT = (
    "You are the assistant in the demo of detached_runs, a Django app that keeps "
    "answers streaming on the server when the browser tab closes. Answer helpfully "
    "and concisely, in plain text."
)


def _model_configured() -> bool:
    """A real model only when one is named: a stray OPENAI_API_KEY in the shell
    leaves the demo offline."""
    endpoint = os.environ.get("OPENAI_BASE_URL") or os.environ.get("OPENAI_API_KEY")
    return bool(endpoint and os.environ.get("OPENAI_MODEL"))


DETACHED_RUNS: dict[str, object] = {
    "AGENT": "demo_project.agents.demo_agent",
    "ALLOW_ANONYMOUS": True,
}
if _model_configured():
    # The agent reads OPENAI_BASE_URL, OPENAI_API_KEY and OPENAI_MODEL itself.
    DETACHED_RUNS["AGENT"] = "detached_runs.agents.openai.agent"
    DETACHED_RUNS["OPENAI"] = {"SYSTEM_PROMPT": DEMO_SYSTEM_PROMPT}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"detached_runs": {"handlers": ["console"], "level": "INFO"}},
}

"""Run backends: ``base`` (the interface), ``memory`` (default), ``redis``."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from ..conf import get_config
from .base import BaseBackend


def load_backend(path: str | None = None, **overrides: Any) -> BaseBackend:
    """Instantiate the configured backend (``DETACHED_RUNS["BACKEND"]``)."""
    config = get_config()
    path = path or config["BACKEND"]
    try:
        cls = import_string(path)
    except ImportError as exc:
        raise ImproperlyConfigured(
            f"DETACHED_RUNS['BACKEND'] = {path!r} does not import: {exc}"
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, BaseBackend)):
        raise ImproperlyConfigured(f"DETACHED_RUNS['BACKEND'] = {path!r} is not a backend class.")
    options: dict[str, Any] = {
        "evict_after": float(config["EVICT_AFTER"]),
        "max_subscribers": config["MAX_SUBSCRIBERS_PER_RUN"],
        "redis_url": config["REDIS_URL"],
        "redis_prefix": config["REDIS_PREFIX"],
        "stream_maxlen": config["REDIS_STREAM_MAXLEN"],
    }
    options.update(overrides)
    return cls(**options)

"""Run backends: ``base`` (the interface), ``memory`` (default), ``redis``."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from ..conf import get_config
from .base import BaseBackend


def load_backend(path: str | None = None, **overrides: Any) -> BaseBackend:
    """Instantiate the configured backend (``DETACHED_RUNS["BACKEND"]``).

    Its options, as with Channels' ``CHANNEL_LAYERS[...]["CONFIG"]``: those it
    takes from ``DETACHED_RUNS``'s own keys (`BaseBackend.options_from_settings`),
    then ``DETACHED_RUNS["BACKEND_OPTIONS"]``, then ``overrides``. An option
    the backend does not take raises `ImproperlyConfigured` (``manage.py
    check`` reports it too, as ``detached_runs.E007``).
    """
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
    problem = _unknown_options(cls, config["BACKEND_OPTIONS"])
    if problem is not None:
        raise ImproperlyConfigured(problem)
    options = {**cls.options_from_settings(config), **config["BACKEND_OPTIONS"], **overrides}
    try:
        return cls(**options)
    except ValueError as exc:
        message = f"DETACHED_RUNS: {cls.__name__} refuses its options: {exc}"
        raise ImproperlyConfigured(message) from exc


def backend_options_problem(cls: type[BaseBackend], options: Any) -> str | None:
    """What is wrong with ``options`` (``BACKEND_OPTIONS``) for backend ``cls``:
    not a dict, an option ``cls`` does not take, or a value it refuses (it is
    made, with the settings' other options, to find out: nothing connects
    until a backend is used); None if nothing."""
    problem = _unknown_options(cls, options)
    if problem is not None:
        return problem
    try:
        cls(**{**cls.options_from_settings(get_config()), **options})
    except (TypeError, ValueError) as exc:
        return f"DETACHED_RUNS['BACKEND_OPTIONS'] are refused by {cls.__name__}: {exc}"
    return None


def _unknown_options(cls: type[BaseBackend], options: Any) -> str | None:
    if not isinstance(options, dict):
        return f"DETACHED_RUNS['BACKEND_OPTIONS'] must be a dict, not {type(options).__name__}."
    unknown = sorted(str(name) for name in set(options) - cls.option_names())
    if unknown:
        return (
            f"DETACHED_RUNS['BACKEND_OPTIONS'] has options {cls.__name__} does not take: "
            f"{', '.join(unknown)} (it takes: {', '.join(sorted(cls.option_names()))})."
        )
    return None

"""Loading the configured backend (`detached_runs.backends.load_backend`):
its options come from ``DETACHED_RUNS``'s keys, then ``BACKEND_OPTIONS``, and
an option it does not take is an error, not dropped."""

from __future__ import annotations

import importlib
import sys
import uuid

import pytest
from django.core.exceptions import ImproperlyConfigured

from detached_runs.backends import load_backend
from detached_runs.backends.memory import MemoryBackend

MEMORY = "detached_runs.backends.memory.MemoryBackend"
REDIS = "detached_runs.backends.redis.RedisBackend"


def test_backend_options_override_the_apps_own_keys(config):
    config(BACKEND=MEMORY, EVICT_AFTER=5, BACKEND_OPTIONS={"max_subscribers": 3})
    backend = load_backend()
    assert isinstance(backend, MemoryBackend)
    assert (backend.evict_after, backend.max_subscribers) == (5.0, 3)
    config(BACKEND=MEMORY, EVICT_AFTER=5, BACKEND_OPTIONS={"evict_after": 0.5})
    assert load_backend().evict_after == 0.5


@pytest.mark.parametrize(
    ("backend", "options", "named"),
    [
        (MEMORY, {"evict_afterr": 1}, "evict_afterr"),
        (MEMORY, {"redis_url": "redis://127.0.0.1:6379/0"}, "redis_url"),  # Redis's, not memory's
        (REDIS, {"prefix": "x"}, "prefix"),
    ],
)
def test_an_option_the_backend_does_not_take_is_an_error_that_names_it(
    config, backend, options, named
):
    if backend == REDIS:
        pytest.importorskip("redis")
    config(BACKEND=backend, BACKEND_OPTIONS=options)
    with pytest.raises(ImproperlyConfigured, match=named):
        load_backend()


async def test_connection_kwargs_reach_redis_py(config):
    pytest.importorskip("redis")
    name = f"dr-options-{uuid.uuid4().hex[:8]}"
    config(BACKEND=REDIS, BACKEND_OPTIONS={"connection_kwargs": {"client_name": name}})
    backend = load_backend()
    try:
        assert (await backend.redis.client_getname()) in (name, name.encode())  # type: ignore[attr-defined]
    finally:
        await backend.shutdown(1)


def test_without_redis_py_the_import_says_what_to_install(monkeypatch):
    # Undone within the test: the suite's own clean-up imports redis-py.
    with monkeypatch.context() as patch:
        for name in ("redis", "redis.asyncio", "redis.exceptions"):
            patch.setitem(sys.modules, name, None)  # "import redis..." now fails
        patch.delitem(sys.modules, "detached_runs.backends.redis", raising=False)
        with pytest.raises(ImportError, match=r"pip install 'redis\[hiredis\]'"):
            importlib.import_module("detached_runs.backends.redis")

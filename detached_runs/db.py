"""The thread detached_runs talks to the database on.

Every query of the app runs on asgiref's one shared sync thread (the thread
``sync_to_async`` uses outside a request), not on a request's own thread.

Why: Django's ASGI handler gives each request a thread of its own, so a query
made on it opens a database connection for that request alone and closes it
when the request ends. That connect is most of what a resume costs before its
first byte (about 2 ms of 5 on SQLite here, more on PostgreSQL over a network),
and the runs' saves and checkpoints already go through the shared thread,
which keeps its connection. So a view's owner lookup, the row a start inserts
and a status read share that one connection too.

That connection is never recycled by a request ending, so this module looks
after it before each call: with a non-zero ``CONN_MAX_AGE`` (or None) by
Django's own ``close_if_unusable_or_obsolete()``, as at a request's end; with
``CONN_MAX_AGE = 0`` ("close at the end of each request"), which has no
request to end here, only a connection that failed and no longer answers is
closed. After a call that failed with a database error it closes them all, so
the next call reconnects (a database restart fails one call, not every later
one).

Which thread: asgiref routes a thread-sensitive call to its one shared
thread when the caller's context has no ``SyncToAsync.thread_sensitive_context``
(Django's ASGI handler sets one per request); `run_sync` clears it in a copy
of the caller's context. asgiref publishes no other way to reach that thread
and keep its routing under ``async_to_sync`` (a call from the admin, whose
views may hold a transaction, must run on the thread that waits); the
dependency on asgiref is pinned to its 3.x series, and ``tests/test_db.py``
checks the routing.

More threads (``DATABASE_THREADS``, default 1): with ``n`` above 1, calls
made outside ``async_to_sync`` run on a pool of ``n`` threads of this module's
own (each with its own connection, kept as above), so that a slow query or
a long checkpoint batch holds one of them, not every request that touches
the database. Calls from under ``async_to_sync`` still run on the sync
thread that waits there, as above: it may hold a transaction whose rows the
call must see. Whether a call is made from under ``async_to_sync`` is what
asgiref itself looks at to route a thread-sensitive call
(``AsyncToSync.executors``, ``AsyncToSync.loop_thread_executors``: public
names of asgiref's 3.x series, checked by ``tests/test_db.py``). SQLite
takes one writer at a time: threads only wait on its lock there (and, unless
its ``transaction_mode`` is ``IMMEDIATE``, a transaction that reads before
it writes fails at once as another writes), so it keeps one.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from asgiref.sync import AsyncToSync, SyncToAsync, sync_to_async
from django.db import DatabaseError, DataError, IntegrityError, connections

from .conf import get_config

P = ParamSpec("P")
T = TypeVar("T")


@functools.cache
def database_errors() -> tuple[type[Exception], ...]:
    """Every exception that means "the database failed": Django's
    `DatabaseError` and the PEP 249 ``Error`` of each configured database's
    driver, which can escape Django's wrapping (mysqlclient raises its own from
    a cursor's clean-up after the server went away)."""
    return (DatabaseError, *{_driver(alias).Error for alias in connections})


@functools.cache
def data_errors() -> tuple[type[Exception], ...]:
    """The database errors about the data itself, not the database: Django's
    and each driver's ``DataError`` and ``IntegrityError``. Trying the same
    data again changes nothing; the connection is fine."""
    drivers = {_driver(alias) for alias in connections}
    return (
        DataError,
        IntegrityError,
        *{driver.DataError for driver in drivers},
        *{driver.IntegrityError for driver in drivers},
    )


def _driver(alias: str) -> Any:
    """The PEP 249 module of a database's backend (``psycopg``, ``MySQLdb``...)."""
    return getattr(connections[alias], "Database")  # noqa: B009 - untyped in django-stubs


async def run_sync(func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Call the sync ``func`` on the database thread (one of the pool's, with
    ``DATABASE_THREADS`` above 1) and return its result.

    On the one thread it runs in a copy of the caller's context without the request's
    ``ThreadSensitiveContext``, so that asgiref hands it to its shared thread
    rather than the request's own. Everything else asgiref routes as usual: a
    call from under ``async_to_sync`` runs on the sync thread waiting there
    (which may be the shared thread itself: sending it anywhere else would
    deadlock). Cancelling the caller cancels the wait, not the call.
    """
    loop = asyncio.get_running_loop()
    guarded = functools.partial(_guarded, func, *args, **kwargs)
    pool = _pool()
    if pool is not None and not _under_async_to_sync(loop):
        call = sync_to_async(guarded, thread_sensitive=False, executor=pool)
        return await loop.create_task(call())
    context = contextvars.copy_context()
    context.run(SyncToAsync.thread_sensitive_context.set, None)  # type: ignore[arg-type]
    return await loop.create_task(sync_to_async(guarded)(), context=context)


def _under_async_to_sync(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether a sync thread waits on this call (``async_to_sync``): the
    tests asgiref's ``SyncToAsync`` makes to send a thread-sensitive call to
    that thread."""
    return (
        getattr(AsyncToSync.executors, "current", None) is not None
        or loop in AsyncToSync.loop_thread_executors
    )


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor | None:
    """The pool of ``DATABASE_THREADS`` threads, or None for one thread
    (asgiref's shared one)."""
    threads = database_threads()
    if threads == 1:
        return None
    with _pools_lock:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="detached_runs-db")
        return _pools[threads]


def database_threads() -> int:
    """How many threads `run_sync` uses: ``DATABASE_THREADS``, but 1 if a
    database of the project is SQLite (see the module docstring)."""
    return 1 if _on_sqlite() else int(get_config()["DATABASE_THREADS"])


@functools.cache
def _on_sqlite() -> bool:
    return any(connections[alias].vendor == "sqlite" for alias in connections)


def close_pool_connections() -> None:
    """Close the database connections of the threads of ``DATABASE_THREADS``
    (each closes its own) and let the threads go; the next call starts them
    again. For tests and shutdowns: PostgreSQL drops no database a
    connection is open to."""
    with _pools_lock:
        pools = list(_pools.items())
        _pools.clear()
    for size, pool in pools:
        # One close per thread: each waits at the barrier until every thread
        # holds one, so that no thread takes two and leaves another open.
        barrier = threading.Barrier(size)

        def close(barrier: threading.Barrier = barrier) -> None:
            connections.close_all()
            barrier.wait(timeout=10)

        for future in [pool.submit(close) for _ in range(size)]:
            future.result()
        pool.shutdown()


def _guarded(func: Callable[..., T], /, *args: object, **kwargs: object) -> T:
    _check_connections()
    try:
        return func(*args, **kwargs)
    except data_errors():
        raise  # about the data: the connection is fine
    except database_errors():
        drop_connections()
        raise


def _check_connections() -> None:
    for conn in connections.all(initialized_only=True):
        if conn.connection is None:
            continue
        if conn.settings_dict.get("CONN_MAX_AGE") != 0:
            # Persistent, or recycled past an age: Django's own upkeep, as at
            # a request's end (a failed connection that no longer answers, a
            # transaction left open, an age past CONN_MAX_AGE).
            conn.close_if_unusable_or_obsolete()
        elif conn.errors_occurred:
            # CONN_MAX_AGE = 0 means "close at each request's end"; this
            # thread serves no request, and Django's upkeep would close it on
            # every call. Only a connection that failed and no longer answers
            # goes; one that answers is trusted again (checked once, as
            # Django does).
            if conn.is_usable():
                conn.errors_occurred = False
            else:
                conn.close()


def drop_connections() -> None:
    """Close this thread's database connections (after a failed call), so that
    the next call opens fresh ones."""
    for conn in connections.all(initialized_only=True):
        try:
            conn.close()
        except database_errors():
            pass  # broken already; the next query reconnects

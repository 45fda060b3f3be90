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
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from asgiref.sync import SyncToAsync, sync_to_async
from django.db import DatabaseError, DataError, IntegrityError, connections

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
    """Call the sync ``func`` on the database thread and return its result.

    It runs in a copy of the caller's context without the request's
    ``ThreadSensitiveContext``, so that asgiref hands it to its shared thread
    rather than the request's own. Everything else asgiref routes as usual: a
    call from under ``async_to_sync`` runs on the sync thread waiting there
    (which may be the shared thread itself: sending it anywhere else would
    deadlock). Cancelling the caller cancels the wait, not the call.
    """
    context = contextvars.copy_context()
    context.run(SyncToAsync.thread_sensitive_context.set, None)  # type: ignore[arg-type]
    call = sync_to_async(functools.partial(_guarded, func, *args, **kwargs))
    return await asyncio.get_running_loop().create_task(call(), context=context)


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

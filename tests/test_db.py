"""The app's database thread (`detached_runs.db`): which thread, and the upkeep
of the connection it keeps."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.db import connection, connections
from django.db.backends.signals import connection_created

from detached_runs.db import run_sync

pytestmark = pytest.mark.django_db(transaction=True)


def opened_here() -> None:
    connection.ensure_connection()


async def test_the_thread_keeps_its_connection_and_recycles_it_past_a_positive_max_age():
    await run_sync(opened_here)
    opened: list[str] = []

    def count(sender: Any, connection: Any, **kwargs: Any) -> None:
        opened.append(threading.current_thread().name)

    connection_created.connect(count)
    max_age = connection.settings_dict["CONN_MAX_AGE"]
    try:
        for _ in range(3):
            await run_sync(opened_here)
        assert opened == []  # CONN_MAX_AGE = 0 has no request to end here

        def expire() -> None:
            connection.settings_dict["CONN_MAX_AGE"] = 60
            connection.close_at = time.monotonic() - 1

        await run_sync(expire)
        await run_sync(opened_here)
        assert len(opened) == 1
    finally:
        connection_created.disconnect(count)

        def restore() -> None:
            connection.settings_dict["CONN_MAX_AGE"] = max_age
            connection.close_at = None

        await run_sync(restore)


async def test_a_connection_that_had_an_error_is_checked_once_then_trusted_again():
    await run_sync(opened_here)
    checks: list[bool] = []

    def had_an_error() -> None:
        connection.errors_occurred = True  # as after an error the caller handled
        usable = connection.is_usable

        def counted() -> bool:
            checks.append(usable())
            return checks[-1]

        connection.is_usable = counted  # type: ignore[method-assign]

    def state() -> tuple[bool, bool]:
        return connection.errors_occurred, connection.connection is not None

    await run_sync(had_an_error)
    try:
        assert await run_sync(state) == (False, True)  # checked, answered, kept
        await run_sync(opened_here)
        assert checks == [True]  # not again on the next call
    finally:

        def restore() -> None:
            del connection.is_usable

        await run_sync(restore)


async def test_a_call_from_sync_code_on_the_shared_thread_runs_there_without_deadlock():
    """Sync code that asgiref runs on its shared thread (a sync signal
    receiver, an admin action under the test client) may call the async API
    through async_to_sync: its query must run on that waiting thread, not
    queue behind it."""

    def outer() -> tuple[str, str]:
        return threading.current_thread().name, async_to_sync(run_sync)(
            lambda: threading.current_thread().name
        )

    waiting, ran = await sync_to_async(outer)()
    assert ran == waiting


# -- DATABASE_THREADS ------------------------------------------------------------


def on_sqlite() -> bool:
    return connection.vendor == "sqlite"


@pytest.mark.parametrize("threads", [1, 4])
async def test_a_query_that_holds_its_thread_stalls_other_requests_only_with_one_thread(
    config, threads
):
    """A slow query (here: one that holds its thread until the test lets it
    go) must not stall an unrelated request's read with ``DATABASE_THREADS``
    above 1; with one thread every query waits behind it. SQLite keeps one
    thread whatever the setting says (one writer at a time)."""
    from detached_runs import runs
    from detached_runs.db import database_threads

    config(DATABASE_THREADS=threads)
    if on_sqlite() and threads > 1:
        assert database_threads() == 1
        pytest.skip("SQLite keeps one database thread; the PostgreSQL and MariaDB passes run this")
    release = threading.Event()

    def slow() -> str:
        connection.ensure_connection()
        release.wait(30)
        return threading.current_thread().name

    held = asyncio.ensure_future(run_sync(slow))
    await asyncio.sleep(0.05)  # on its thread now
    read = asyncio.ensure_future(runs.status("nobody-here"))
    done, _ = await asyncio.wait({read}, timeout=1)
    # With one thread the read cannot have run: its thread is held. With four
    # it ran beside the held one.
    assert bool(done) == (threads > 1)
    release.set()
    assert await read is None
    assert (await held).startswith("detached_runs-db" if threads > 1 else "")


async def test_with_several_threads_a_call_under_async_to_sync_still_runs_on_the_waiting_thread(
    config,
):
    """A sync caller (the admin, a signal receiver) may hold a transaction
    whose rows the call must see: under ``async_to_sync`` the call runs on
    the waiting thread, never on the pool's."""
    config(DATABASE_THREADS=4)

    def outer() -> tuple[str, str]:
        return threading.current_thread().name, async_to_sync(run_sync)(
            lambda: threading.current_thread().name
        )

    waiting, ran = await sync_to_async(outer)()
    assert ran == waiting
    assert not ran.startswith("detached_runs-db")


async def test_the_pool_closes_every_thread_connection(config):
    """Each pool thread keeps a connection; `close_pool_connections` closes
    them all (PostgreSQL drops no database a connection is open to)."""
    from detached_runs.db import close_pool_connections

    config(DATABASE_THREADS=3)
    if on_sqlite():
        pytest.skip("SQLite keeps one database thread; the PostgreSQL and MariaDB passes run this")
    gate = threading.Barrier(3)

    def hold() -> Any:
        connection.ensure_connection()
        gate.wait(10)  # three calls at once: one on each thread
        return connections["default"]  # this thread's own, not the proxy

    held = await asyncio.gather(*(run_sync(hold) for _ in range(3)))
    assert len({id(c) for c in held}) == 3
    assert all(c.connection is not None for c in held)
    await sync_to_async(close_pool_connections)()
    assert all(c.connection is None for c in held)

"""The app's database thread (`detached_runs.db`): which thread, and the upkeep
of the connection it keeps."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.db import connection
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

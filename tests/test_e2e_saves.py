"""A real server whose database refuses across a run's end (#14, item 4): the
text a client saw as final is saved once the database is back, and until then
``done`` says ``"saved": false`` and the run is served from memory, whatever
``EVICT_AFTER`` says.

The database refuses for real: SQLite's file is locked by the test process,
PostgreSQL and MariaDB sit behind a proxy that cuts and refuses connections
(`tests.database_fault`)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from detached_runs.models import Run

from .conftest import LEASE_BOUND, SHORT_LEASE, ended_row, server_env, start_server, stop_server
from .database_fault import DatabaseFault
from .http import Browser, text

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def refusing_server(database_fault: DatabaseFault) -> Any:
    env = server_env(TEST_AGENT_DELAY="0.02", TEST_EVICT_AFTER="0.5", LOG="INFO")
    server = start_server(database_fault.env(env))
    yield server, database_fault
    stop_server(server)


def _saved(key: str, timeout: float = 45) -> Run:
    """The session's row once it is no longer running (the save retries back off
    up to 30 s)."""
    row: Run = ended_row(key, timeout, "the end was never saved")
    return row


def test_a_run_that_ends_while_the_database_refuses_is_saved_once_it_is_back(refusing_server):
    server, fault = refusing_server
    key = uuid.uuid4().hex[:10]
    client = Browser(server.port)
    assert client.request("POST", f"/runs/{key}/", {"prompt": "120"}).status == 202
    stream = client.stream(f"/runs/{key}/events/")
    seen = stream.take(40)
    fault.refuse()
    try:
        seen += stream.rest()
        # Past the service's quick retries: the client is told.
        assert seen[-1].data == {"status": "done", "saved": False}
        assert text(seen) == "".join(f"w{i} " for i in range(120))
        time.sleep(2)  # past EVICT_AFTER, and the first later attempts
    finally:
        fault.accept()
    # Kept in memory, or saved by now: never the stale checkpoint of the row.
    replay = client.stream(f"/runs/{key}/events/").rest()
    assert text(replay) == text(seen) and replay[-1].data["status"] == "done"
    row = _saved(key)
    assert (row.status, row.output) == ("done", text(seen))
    assert "saved after all" in server.output()


def test_a_run_stopped_while_the_database_refuses_is_saved_stopped_with_its_text(
    refusing_server,
):
    """The stop request itself needs the database (the visitor's session), so
    the agent takes 2 s to let go ("linger"): its save comes while the
    database refuses."""
    server, fault = refusing_server
    key = uuid.uuid4().hex[:10]
    client = Browser(server.port)
    assert client.request("POST", f"/runs/{key}/", {"prompt": "linger"}).status == 202
    stream = client.stream(f"/runs/{key}/events/")
    seen = stream.take(2)
    assert client.request("POST", f"/runs/{key}/stop/").json() == {"stopped": True}
    fault.refuse()
    try:
        seen += stream.rest()
        assert seen[-1].data == {"status": "stopped", "saved": False}
        time.sleep(2)  # the first later attempt fails too
    finally:
        fault.accept()
    row = _saved(key)
    assert (row.status, row.output) == ("stopped", "lingering ") and text(seen) == "lingering "


@pytest.mark.parametrize("read_first", [False, True], ids=["unasked", "row-read-first"])
def test_a_run_whose_worker_dies_before_its_save_is_saved_by_another_worker(
    read_first, database_fault, start_workers
):
    """Redis, two workers: A's run ends while the database refuses, and A is
    killed (-9) while it retries the save. Redis has the run's whole log and
    its end: B saves them once the database is back, unasked.

    ``row-read-first``: before B's sweep gets to it (A's hold on the run
    lapses first), a third worker resolves the row, whose process is gone, as
    the row sweep or a stored subscription does. It used to mark it
    ``interrupted`` at its last checkpoint, and the end Redis held was lost."""
    from asgiref.sync import async_to_sync

    from detached_runs.backends.redis import RedisBackend
    from detached_runs.runs import RunService

    fault = database_fault
    a, b = start_workers(fault, TEST_EVICT_AFTER="180", **SHORT_LEASE)
    key = uuid.uuid4().hex[:10]
    client = Browser(a.port)
    assert client.request("POST", f"/runs/{key}/", {"prompt": "120"}).status == 202
    stream = client.stream(f"/runs/{key}/events/")
    seen = stream.take(40)
    # B has served a request (its backend, and its sweeps, begin with the first).
    assert (
        Browser(b.port, cookies=dict(client.cookies))
        .request("GET", f"/runs/{key}/")
        .json()["run"]["status"]
        == "running"
    )
    fault.refuse()
    try:
        seen += stream.rest()
        assert seen[-1].data == {"status": "done", "saved": False}
        time.sleep(0.5)
        a.process.kill()
        a.process.wait(10)
    finally:
        fault.accept()
    if read_first:

        async def resolve(row: Run) -> Run:
            url = a.env.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
            backend = RedisBackend(redis_url=url, redis_prefix=a.env["TEST_REDIS_PREFIX"])
            try:
                return await RunService(backend).resolve(row)
            finally:
                await backend.shutdown(2)

        row = async_to_sync(resolve)(Run.objects.get(session_key=key))
        assert (row.status, row.output) == ("done", text(seen))
    bound = LEASE_BOUND + 2
    row = _saved(key, timeout=bound)
    deadline = time.monotonic() + bound
    while "its row was not saved" not in b.output() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "its row was not saved" in b.output()
    time.sleep(0.5)  # B's save of what it found, which must change nothing now
    row.refresh_from_db()
    assert (row.status, row.output) == ("done", text(seen))

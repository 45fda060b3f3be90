"""The service with a real database: rows, checkpoints, history, ownership, eviction."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import OperationalError, connection
from django.utils import timezone

from detached_runs import runs
from detached_runs.backends.base import READ_CHUNK
from detached_runs.exceptions import (
    BackendUnavailable,
    BadEventId,
    BadPrompt,
    BadSessionKey,
    RunNotFound,
    TooManyRuns,
)
from detached_runs.models import Run
from detached_runs.runs import get_service
from detached_runs.signals import run_started

from .conftest import collect, text_of

pytestmark = pytest.mark.django_db(transaction=True)


async def finished(session: str, owner: Any = None) -> Run:
    for _ in range(1000):
        run = await runs.status(session, owner=owner)
        if run is not None and run.status != "running":
            row = await Run.objects.aget(pk=run.pk)
            if row.status != "running":
                return row
        await asyncio.sleep(0.01)
    raise AssertionError("run did not finish")


async def slow(ctx: Any) -> AsyncIterator[str]:
    for i in range(1000):
        yield f"s{i} "
        await asyncio.sleep(0.01)


async def test_start_creates_the_row_and_the_end_saves_output_and_status():
    run = await runs.start("chat", prompt="5 words")
    assert (await Run.objects.aget(pk=run.pk)).status == "running"
    row = await finished("chat")
    assert row.output == "w0 w1 w2 w3 w4 "
    assert row.status == "done" and row.finished_at is not None
    assert row.last_event_id.startswith(run.id.hex + ":")


async def test_output_is_checkpointed_while_the_run_goes_on():
    run = await runs.start("chat", prompt="x", agent=slow)
    await asyncio.sleep(0.7)  # CHECKPOINT_EVERY is 0.2 in the test settings
    row = await Run.objects.aget(pk=run.pk)
    assert row.status == "running"
    assert row.output.startswith("s0 s1 ") and len(row.output) > 10
    await runs.stop("chat")
    row = await finished("chat")
    assert row.status == "stopped" and row.output.startswith(row.output)


async def test_the_agent_gets_the_sessions_earlier_turns_oldest_first():
    seen: list[Any] = []

    async def remembering(ctx: Any) -> AsyncIterator[str]:
        seen.append(ctx)
        yield f"answer to {ctx.prompt}"

    for prompt in ("one", "two", "three"):
        await runs.start("chat", prompt=prompt, agent=remembering)
        await finished("chat")
    await runs.start("other", prompt="elsewhere", agent=remembering)
    await finished("other")
    assert [t.prompt for t in seen[2].history] == ["one", "two"]
    assert [t.output for t in seen[2].history] == ["answer to one", "answer to two"]
    assert seen[3].history == ()


async def test_status_is_live_while_running_and_from_the_database_after_eviction(config):
    config(EVICT_AFTER=0.1)
    run = await runs.start("chat", prompt="x", agent=slow)
    await asyncio.sleep(0.1)
    live = await runs.status("chat")
    assert live is not None and live.status == "running" and live.id == run.id
    assert live.output.startswith("s0 ")
    await runs.stop("chat")
    row = await finished("chat")
    await asyncio.sleep(0.2)
    assert await get_service().backend.get("chat") is None
    stored = await runs.status("chat")
    assert stored is not None and stored.output == row.output and stored.status == "stopped"


async def test_after_eviction_a_subscriber_gets_start_the_whole_output_and_the_end(config):
    config(EVICT_AFTER=0.05)
    await runs.start("chat", prompt="30")
    live = [e async for e in runs.subscribe("chat")]
    await asyncio.sleep(0.15)
    assert await get_service().backend.get("chat") is None
    stored = [e async for e in runs.subscribe("chat")]
    assert [e.event for e in stored] == ["start", "delta", "done"]
    assert text_of(stored) == text_of(live)
    assert stored[-1].id == live[-1].id  # the terminal id survives eviction
    # A resume from any live id gets exactly the rest, from the database.
    seen = ""
    for event in live[:-1]:
        seen += event.data.get("text", "") if event.event == "delta" else ""
        rest = [e async for e in runs.subscribe("chat", after=event.id)]
        assert seen + text_of(rest) == text_of(live)
        assert rest[-1].event == "done"
    ended = await runs.subscribe("chat", after=live[-1].id)
    assert ended.ended


async def test_a_failed_save_is_retried_and_the_stream_still_ends():
    failures = {"left": 2}

    def flaky(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if sql.lstrip().upper().startswith("UPDATE") and "finished_at" in sql and failures["left"]:
            failures["left"] -= 1
            raise OperationalError("database is locked (injected)")
        return execute(sql, params, many, context)

    # The async ORM runs queries on one thread; install the wrapper on its connection.
    await sync_to_async(lambda: connection.execute_wrappers.append(flaky))()
    try:
        await runs.start("chat", prompt="3")
        events = [e async for e in runs.subscribe("chat")]
        assert events[-1].data == {"status": "done"}
        row = await finished("chat")
        assert row.output == "w0 w1 w2 " and failures["left"] == 0
    finally:
        await sync_to_async(lambda: connection.execute_wrappers.remove(flaky))()


async def test_an_orphaned_running_row_is_shown_interrupted_with_its_checkpoint():
    old = timezone.now() - timedelta(minutes=5)
    row = await Run.objects.acreate(
        session_key="dead", prompt="p", output="half an ans", started_at=old, updated_at=old
    )
    status = await runs.status("dead")
    assert status is not None and status.status == "interrupted" and status.output == "half an ans"
    events = [e async for e in runs.subscribe("dead")]
    assert [e.event for e in events] == ["start", "delta", "done"]
    assert events[-1].data == {"status": "interrupted"}
    assert (await Run.objects.aget(pk=row.pk)).status == "interrupted"


@pytest.mark.parametrize("seen", [0, 3, 9, 15, 600])
async def test_a_client_resumes_an_orphaned_run_wherever_it_was_against_its_checkpoint(seen):
    """A client may have seen less or more of the text than the last
    checkpoint (9 bytes) before the process died: it gets what it lacks of the
    saved text and the end, never a repeat, never a 204 without the end."""
    old = timezone.now() - timedelta(minutes=5)
    row = await Run.objects.acreate(
        session_key="dead", prompt="p", output="w0 w1 w2 ", started_at=old, updated_at=old
    )
    await Run.objects.filter(pk=row.pk).aupdate(last_event_id=f"{row.id.hex}:9-1")
    events = [e async for e in runs.subscribe("dead", after=f"{row.id.hex}:{seen}-1")]
    assert [e.event for e in events] == (["delta", "done"] if seen < 9 else ["done"])
    assert text_of(events) == "w0 w1 w2 "[seen:]
    assert events[-1].data == {"status": "interrupted"} and events[-1].id == f"{row.id.hex}:9-2"
    # From the end itself: nothing more (the events URL's 204).
    assert [e async for e in runs.subscribe("dead", after=events[-1].id)] == []


async def test_a_running_row_with_a_fresh_heartbeat_is_not_declared_dead():
    await Run.objects.acreate(session_key="elsewhere", prompt="p", output="so far")
    status = await runs.status("elsewhere")
    assert status is not None and status.status == "running"


async def test_a_shutdown_hangs_up_on_a_follower_of_a_row_another_process_runs():
    """A row running elsewhere (fresh heartbeat) is followed by polling it;
    this process's shutdown ends that stream without a terminal event (the
    client resumes elsewhere), while a follower of this process's own run
    gets its run's end as usual."""
    row = await Run.objects.acreate(session_key="elsewhere", prompt="p", output="so far")
    elsewhere = await runs.subscribe("elsewhere")
    await runs.start("here", prompt="x", agent=slow)
    here = await runs.subscribe("here")

    async def read(subscription: Any) -> list[Any]:
        return [event async for event in subscription]

    reading = [asyncio.ensure_future(read(s)) for s in (elsewhere, here)]
    await asyncio.sleep(0.3)
    await get_service().shutdown(5)
    far, near = await asyncio.wait_for(asyncio.gather(*reading), 5)
    assert [e.event for e in far] == ["start", "delta"] and text_of(far) == "so far"
    assert near[-1].event == "done" and near[-1].data == {"status": "interrupted"}
    assert (await Run.objects.aget(pk=row.pk)).status == "running"


async def test_another_owner_cannot_see_stop_follow_or_take_over_a_session():
    await runs.start("mine", prompt="x", owner="user:1", agent=slow)
    assert await runs.status("mine", owner="user:2") is None
    with pytest.raises(RunNotFound):
        await runs.subscribe("mine", owner="user:2")
    with pytest.raises(RunNotFound):
        await runs.stop("mine", owner="user:2")
    with pytest.raises(RunNotFound):
        await runs.start("mine", prompt="hijack", owner="user:2")
    live = await runs.status("mine", owner="user:1")
    assert live is not None and live.status == "running" and live.prompt == "x"
    assert await runs.stop("mine", owner="user:1") is True


async def test_a_session_that_was_never_started_is_not_found():
    assert await runs.status("nothing") is None
    with pytest.raises(RunNotFound):
        await runs.subscribe("nothing")
    with pytest.raises(RunNotFound):
        await runs.stop("nothing")


async def test_too_many_runs_in_flight_for_one_owner_is_refused(config):
    config(MAX_ACTIVE_RUNS_PER_OWNER=2)
    await runs.start("a", prompt="x", owner="user:1", agent=slow)
    await runs.start("b", prompt="x", owner="user:1", agent=slow)
    await runs.start("b", prompt="again", owner="user:1", agent=slow)  # replaces b: allowed
    with pytest.raises(TooManyRuns):
        await runs.start("c", prompt="x", owner="user:1", agent=slow)
    await runs.start("c", prompt="x", owner="user:2", agent=slow)
    assert await Run.objects.filter(session_key="c").acount() == 1


@pytest.mark.parametrize(
    ("key", "prompt", "error"),
    [
        ("bad key", "x", BadSessionKey),
        ("x" * 65, "x", BadSessionKey),
        ("", "x", BadSessionKey),
        ("ok", "", BadPrompt),
        ("ok", "   ", BadPrompt),
        ("ok", 42, BadPrompt),
        ("ok", "x" * 32_001, BadPrompt),
    ],
)
async def test_bad_input_is_refused_and_changes_nothing(key, prompt, error):
    with pytest.raises(error):
        await runs.start(key, prompt=prompt)
    assert await Run.objects.acount() == 0


async def test_bad_input_leaves_a_running_run_untouched():
    await runs.start("chat", prompt="x", agent=slow)
    with pytest.raises(BadPrompt):
        await runs.start("chat", prompt="x" * 40_000)
    with pytest.raises(BadEventId):
        await runs.subscribe("chat", after="garbage")
    status = await runs.status("chat")
    assert status is not None and status.status == "running"
    assert await Run.objects.acount() == 1


async def test_an_agent_that_is_not_an_async_generator_ends_as_error():
    def not_async(ctx: Any) -> list[str]:
        return ["a"]

    await runs.start("chat", prompt="x", agent=not_async)  # type: ignore[arg-type]
    events = [e async for e in runs.subscribe("chat")]
    assert events[-1].data["status"] == "error"
    assert "async iterator" in events[-1].data["error"]


async def test_custom_events_pass_through_and_invalid_ones_end_the_run():
    async def tools(ctx: Any) -> AsyncIterator[Any]:
        yield "Looking it up. "
        yield {"event": "tool_call", "data": {"name": "search", "query": "x"}}
        yield {"event": "delta", "data": {"text": "Found it."}}
        yield {"event": "done", "data": {}}  # reserved: not the agent's to send

    await runs.start("chat", prompt="x", agent=tools)
    events = await collect(await runs.subscribe("chat"))
    assert [e.event for e in events] == ["start", "delta", "tool_call", "delta", "done"]
    assert events[2].data == {"name": "search", "query": "x"}
    assert events[-1].data["status"] == "error"
    row = await finished("chat")
    assert row.output == "Looking it up. Found it." and row.status == "error"


async def test_a_permission_hook_can_let_a_team_share_sessions(config):
    config(PERMISSION="tests.agents.same_team")
    await runs.start("team", prompt="x", owner="user:1", agent=slow)
    shared = await runs.status("team", owner="user:2")
    assert shared is not None and shared.prompt == "x"
    assert await runs.status("team", owner="user:3") is None
    with pytest.raises(RunNotFound):
        await runs.stop("team", owner="user:3")
    assert await runs.stop("team", owner="user:2") is True


async def test_runs_started_by_requests_share_one_database_thread_after_the_requests_end():
    """Django's ASGI handler gives each request its own thread for sync code
    (asgiref's ThreadSensitiveContext). A run outlives its request; if it
    inherited that context, each run would hold a thread and a connection."""
    from asgiref.sync import ThreadSensitiveContext

    threads: set[int] = set()

    async def recording(ctx: Any) -> AsyncIterator[str]:
        threads.add(await sync_to_async(threading.get_ident)())
        yield "x"

    for index in range(5):
        async with ThreadSensitiveContext():  # one request each
            await runs.start(f"chat{index}", prompt="x", agent=recording)
    for index in range(5):
        await finished(f"chat{index}")
    assert len(threads) == 1


async def long_answer(ctx: Any) -> AsyncIterator[str]:
    for i in range(400):  # 400 x ~1 KiB of multibyte text: several READ_CHUNKs
        yield f"{i}: añ€😀 " * 60


@pytest.mark.parametrize("where", ["log", "database"])
async def test_a_long_replay_goes_out_in_pieces_each_a_valid_resume_point(config, where):
    """A subscriber reads at most READ_CHUNK bytes at a time, so one whose
    client does not read holds a piece of the answer, not a copy of it; and
    every piece ends where a reconnect can resume, mid-answer or not."""
    config(EVICT_AFTER=0.05 if where == "database" else 60)
    await runs.start("chat", prompt="x", agent=long_answer)
    row = await finished("chat")
    if where == "database":
        await asyncio.sleep(0.15)  # evicted: served from the row
    whole = row.output
    assert len(whole.encode()) > 4 * READ_CHUNK
    subscription = await runs.subscribe("chat")
    batches = [batch async for batch in subscription.batches()]
    deltas = [e for batch in batches for e in batch if e.event == "delta"]
    assert len(deltas) >= 5
    assert all(len(e.data["text"].encode()) <= READ_CHUNK for e in deltas)
    assert text_of(deltas) == whole
    seen = ""
    for event in deltas:
        seen += event.data["text"]
        rest = [e async for e in runs.subscribe("chat", after=event.id)]
        assert seen + text_of(rest) == whole
        assert rest[-1].event == "done"


async def test_session_keys_differing_only_in_case_are_two_sessions():
    """Keys are case-sensitive on every database (MariaDB's and MySQL's default
    collations are not: there "CaseX" and "casex" were one session)."""
    await runs.start("CaseX", prompt="3", owner="anon:a")
    await finished("CaseX", owner="anon:a")
    await runs.start("casex", prompt="2", owner="anon:b")  # nobody's yet: not a 404
    await finished("casex", owner="anon:b")
    assert await runs.status("casex", owner="anon:a") is None
    mine = await runs.status("CaseX", owner="anon:a")
    assert mine is not None and mine.output == "w0 w1 w2 "
    theirs = await runs.status("casex", owner="anon:b")
    assert theirs is not None and theirs.output == "w0 w1 "
    assert await Run.objects.filter(session_key="casex").acount() == 1


async def test_a_start_refused_after_its_row_was_written_leaves_no_row():
    """One more of the kind "a refused start changes nothing": the shutdown
    begins after the row was written (here while a run_started receiver
    runs; a SIGTERM can land there too), the backend refuses, the row goes."""

    async def shutting_down(sender: Any, run: Run, **kwargs: Any) -> None:
        await get_service().backend.shutdown(0)

    run_started.connect(shutting_down, sender=Run)
    try:
        with pytest.raises(BackendUnavailable):
            await runs.start("chat", prompt="3", owner="anon:a")
    finally:
        run_started.disconnect(shutting_down, sender=Run)
    assert not await Run.objects.filter(session_key="chat").aexists()


async def test_a_sweep_ends_rows_left_running_by_a_dead_process_that_the_backend_lost(config):
    """A process died and the backend lost its run as well (Redis restarted
    empty): only the row is left, running, its heartbeat stale. The sweep
    ends it ``interrupted`` with its checkpoint, without waiting for a read;
    it leaves alone a row whose heartbeat is fresh and a run the backend
    holds."""
    service = get_service()
    long_ago = timezone.now() - timedelta(minutes=10)
    dead = await Run.objects.acreate(
        session_key="dead", prompt="p", output="so far ", worker="elsewhere:1:x"
    )
    await Run.objects.filter(pk=dead.pk).aupdate(updated_at=long_ago)
    fresh = await Run.objects.acreate(session_key="fresh", prompt="p", worker="elsewhere:1:x")
    held = await runs.start("held", prompt="3", agent=_hang)
    await Run.objects.filter(pk=held.pk).aupdate(updated_at=long_ago)
    assert await service.sweep() == 1
    dead_row = await Run.objects.aget(pk=dead.pk)
    assert (dead_row.status, dead_row.output) == ("interrupted", "so far ")
    assert (await Run.objects.aget(pk=fresh.pk)).status == "running"
    assert (await Run.objects.aget(pk=held.pk)).status == "running"
    await runs.stop("held")


async def _hang(ctx: Any) -> AsyncIterator[str]:
    yield "thinking "
    await asyncio.sleep(3600)


@pytest.mark.parametrize("queued", [False, True])
async def test_a_start_goes_to_the_database_once_unless_it_has_a_queue_to_cancel(
    monkeypatch, queued
):
    """A start is the moment a user waits for, and each trip to the database
    thread waits for a turn of a loaded event loop: an ``interrupt`` start
    makes one (its row), and a second only when it has queued runs to cancel,
    which it then does."""
    from detached_runs import db
    from detached_runs import runs as runs_module

    await runs.start("trips", prompt="x", agent=slow)
    if queued:
        waiting = await runs.start("trips", prompt="y", multitask="enqueue")
    trips: list[str] = []
    real = db.run_sync

    async def counted(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        trips.append(func.__name__)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(runs_module, "run_sync", counted)
    await runs.start("trips", prompt="z", agent=slow)
    # (A shared backend may add its own: the start time it ordered the start
    # by, the history once the run it replaces is saved.)
    assert trips.count("open_row") == 1
    assert trips.count("replace_pending") == int(queued)
    if get_service().backend.process_local:
        assert trips == (["open_row", "replace_pending"] if queued else ["open_row"])
    statuses = {row.prompt: row.status async for row in Run.objects.filter(session_key="trips")}
    assert statuses["x"] in ("stopped", "running")  # its end is saved in the background
    if queued:
        assert (await Run.objects.aget(pk=waiting.pk)).status == "stopped"
    await runs.stop("trips")
    assert (await finished("trips")).prompt == "z"


def test_a_new_sessions_row_is_opened_with_one_select_and_its_insert():
    """A start of a new session reads the session's rows once (the owner
    check and the history); that they hold no queue follows from them."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from detached_runs import rows

    with CaptureQueriesContext(connection) as queries:
        opened = rows.open_row("fresh", "p", "anon:x", None, check_owner=True, history=50)
    statements = [q["sql"].split()[0] for q in queries.captured_queries]
    assert statements.count("SELECT") == 1 and statements.count("INSERT") == 1
    assert opened.queued is False and opened.history == ()


@pytest.mark.parametrize(("check_owner", "history"), [(True, None), (True, 50), (False, 1)])
def test_a_queue_is_seen_whether_or_not_the_rows_read_hold_all_of_the_session(check_owner, history):
    """Where the rows read are the whole session, its queue is counted from
    them; where they are not (a longer session than the history asked
    for), a count finds a queued run behind the newest rows."""
    from detached_runs import rows

    now = timezone.now()
    Run.objects.create(session_key="q", prompt="a", status="queued", started_at=now)
    Run.objects.create(
        session_key="q", prompt="b", status="done", started_at=now + timedelta(seconds=1)
    )
    opened = rows.open_row("q", "c", None, None, check_owner=check_owner, history=history)
    assert opened.queued is True


async def test_a_runs_end_looks_for_a_queue_in_the_database_only_where_one_may_be(monkeypatch):
    """With a process-local backend (memory) this process writes every queued
    run of its sessions, so the end of a run of a session it saw no queue of
    makes no trip to look for one; a queued run still starts when the run
    before it ends. A shared backend's ends always look (another process may
    have queued one)."""
    from detached_runs import db
    from detached_runs import runs as runs_module

    trips: list[str] = []
    real = db.run_sync

    async def counted(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        trips.append(func.__name__)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(runs_module, "run_sync", counted)
    service = get_service()
    shared = not service.backend.process_local
    await runs.start("alone", prompt="3 words")
    for _ in range(500):  # not runs.status(): it looks for a stranded queue itself
        state = await service.backend.get("alone")
        if state is not None and state.status == "done":
            break
        await asyncio.sleep(0.01)
    # The end's look, if any, is a task the end started before its terminal event.
    await asyncio.gather(*service._announcing)
    assert ("has_queued" in trips) == shared
    first = await runs.start("queue", prompt="x", agent=slow)
    queued = await runs.start("queue", prompt="2 words", multitask="enqueue")
    await runs.stop("queue")
    for _ in range(500):
        row = await Run.objects.aget(pk=queued.pk)
        if row.status == "done":
            break
        await asyncio.sleep(0.01)
    assert row.status == "done" and row.output == "w0 w1 "
    assert (await Run.objects.aget(pk=first.pk)).status == "stopped"

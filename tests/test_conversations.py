"""The conversations API in-process, with a real database and the suite's
backend (memory, or Redis under TEST_BACKEND=redis): the service's
`sessions`, `session_runs` and `delete`, and their views through Django's
AsyncClient (owners, CSRF, the error table)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.test import AsyncClient
from django.utils import timezone

from detached_runs import listing, rows, runs
from detached_runs.exceptions import BadCursor, BadLimit, RunNotFound
from detached_runs.models import Run
from detached_runs.runs import get_service
from detached_runs.signals import run_finished

from .agents import forever
from .conftest import ended

pytestmark = pytest.mark.django_db(transaction=True)

ALICE, BOB = "user:1", "user:2"


async def ask(session: str, prompt: str = "3", owner: str = ALICE) -> Run:
    """Start a run of ``session`` (``prompt`` words of `tests.agents.words`)
    and wait for its end."""
    await runs.start(session, prompt=prompt, owner=owner, agent="tests.agents.words")
    return await ended(session)


async def slow(ctx: Any) -> AsyncIterator[str]:
    for i in range(3000):
        yield f"s{i} "
        await asyncio.sleep(0.01)


async def until_output(session: str) -> Run:
    for _ in range(500):
        run = await runs.status(session)
        if run is not None and run.output:
            return run
        await asyncio.sleep(0.01)
    raise AssertionError("no output")


def tasks_of(run_id: uuid.UUID) -> list[str]:
    """The names of the tasks in this loop that work for the run."""
    return [
        task.get_name()
        for task in asyncio.all_tasks()
        if run_id.hex in task.get_name() and not task.done()
    ]


# -- the sessions ----------------------------------------------------------------


async def test_sessions_lists_the_owners_sessions_most_recently_active_first():
    first = await ask("trip", "Plan a trip to Lisbon in May, with a day in Sintra " * 3)
    await ask("soup", "A soup recipe")
    second = await ask("trip", "And in June?")
    await ask("bobs", "Not Alice's", owner=BOB)
    page = await runs.sessions(owner=ALICE)
    assert page.next is None
    assert [s.session for s in page.sessions] == ["trip", "soup"]
    trip = page.sessions[0]
    assert (
        trip.title
        == "Plan a trip to Lisbon in May, with a day in Sintra Plan a trip to Lisbon in May,"
    )
    assert (trip.status, trip.runs) == ("done", 2)
    assert trip.started_at == first.started_at and trip.updated_at == second.started_at
    assert trip.as_json() == {
        "session": "trip",
        "title": trip.title,
        "status": "done",
        "runs": 2,
        "started_at": first.started_at.isoformat(),
        "updated_at": second.started_at.isoformat(),
    }
    assert [s.session for s in (await runs.sessions(owner=BOB)).sessions] == ["bobs"]
    every = await runs.sessions()  # a trusted caller: every session
    assert [s.session for s in every.sessions] == ["bobs", "trip", "soup"]


async def test_a_visitor_without_an_owner_id_has_no_sessions():
    await ask("chat")
    assert (await runs.sessions(owner="anon:")).sessions == []
    assert (await runs.sessions(owner="anon:" + "0" * 32)).sessions == []


async def test_sessions_pages_through_a_cursor_until_next_is_none():
    for index in range(5):
        await ask(f"s{index}")
    seen, cursor = [], None
    while True:
        page = await runs.sessions(owner=ALICE, limit="2", cursor=cursor)
        seen.append([s.session for s in page.sessions])
        if page.next is None:
            break
        cursor = page.next
    assert seen == [["s4", "s3"], ["s2", "s1"], ["s0"]]


async def test_a_running_session_shows_running_and_the_status_of_its_latest_run(config):
    config(AGENT=forever)
    await runs.start("live", prompt="x", owner=ALICE)
    (live,) = (await runs.sessions(owner=ALICE)).sessions
    assert live.status == "running"
    await runs.stop("live")
    await ended("live")
    assert (await runs.sessions(owner=ALICE)).sessions[0].status == "stopped"


async def test_a_session_left_running_by_a_dead_process_is_listed_interrupted():
    old = timezone.now() - timedelta(minutes=5)
    await Run.objects.acreate(
        session_key="orphan", owner=ALICE, prompt="x", worker="elsewhere:1:dead", updated_at=old
    )
    (orphan,) = (await runs.sessions(owner=ALICE)).sessions
    assert orphan.status == "interrupted"
    assert (await Run.objects.aget(session_key="orphan")).status == "interrupted"


async def test_once_evicted_the_current_run_is_not_the_queued_run_a_stop_cancelled(config):
    """`GET <key>/` shows "the current or latest run (not a queued one), nor a
    queued run cancelled before it started": also from the row, once the
    backend let go of the session."""
    config(EVICT_AFTER=0.05)
    first = await runs.start("cancelled", prompt="first", owner=ALICE, agent=forever)
    await runs.start("cancelled", prompt="queued", owner=ALICE, multitask="enqueue")
    await runs.stop("cancelled", owner=ALICE, queued=True)
    for _ in range(200):
        if await get_service().backend.get("cancelled") is None:
            break
        await asyncio.sleep(0.05)
    assert await get_service().backend.get("cancelled") is None
    current = await runs.status("cancelled", owner=ALICE)
    assert current is not None and (current.id, current.prompt) == (first.id, "first")


# -- the runs of a session --------------------------------------------------------


async def test_session_runs_pages_from_the_newest_backwards_each_page_oldest_first():
    made = [await ask("chat", f"{i} words") for i in range(5)]
    ids = [run.id for run in made]
    first = await runs.session_runs("chat", owner=ALICE, limit=2)
    assert first.session == "chat" and [r.id for r in first.runs] == ids[3:]
    second = await runs.session_runs("chat", owner=ALICE, limit=2, cursor=first.next)
    assert [r.id for r in second.runs] == ids[1:3]
    last = await runs.session_runs("chat", owner=ALICE, limit=2, cursor=second.next)
    assert [r.id for r in last.runs] == ids[:1] and last.next is None
    whole = await runs.session_runs("chat", owner=ALICE)
    assert [r.id for r in whole.runs] == ids and whole.next is None
    assert whole.as_json()["runs"][0] == made[0].as_json()


async def test_session_runs_shows_the_run_in_flight_live_not_its_last_checkpoint(config):
    config(CHECKPOINT_EVERY=60)  # the row's output stays empty meanwhile
    await ask("chat", "2")
    await runs.start("chat", prompt="x", owner=ALICE, agent=slow)
    live = await until_output("chat")
    page = await runs.session_runs("chat", owner=ALICE)
    assert [r.status for r in page.runs] == ["done", "running"]
    assert page.runs[-1].output.startswith(live.output) and page.runs[-1].output
    row = await Run.objects.aget(pk=page.runs[-1].pk)
    assert row.output == ""  # what the database has: the live state came from the backend
    await runs.stop("chat")
    await ended("chat")


async def test_session_runs_of_an_unknown_or_foreign_session_is_not_found():
    await ask("mine")
    with pytest.raises(RunNotFound, match="No such session"):
        await runs.session_runs("nobody", owner=ALICE)
    with pytest.raises(RunNotFound, match="No such session"):
        await runs.session_runs("mine", owner=BOB)
    with pytest.raises(RunNotFound):
        await runs.session_runs("mine", owner="anon:")


async def test_a_bad_limit_or_cursor_is_refused_before_anything_is_read():
    await ask("chat")
    cursor = (await runs.sessions(owner=ALICE, limit=1)).next
    for bad in ("0", "101", "x", -3, 1000):
        with pytest.raises(BadLimit):
            await runs.sessions(owner=ALICE, limit=bad)
        with pytest.raises(BadLimit):
            await runs.session_runs("nobody", owner=ALICE, limit=bad)
    for garbage in ("garbage", "a:b", "x" * 5000, "\udc80"):
        with pytest.raises(BadCursor):
            await runs.sessions(owner=ALICE, cursor=garbage)
    other = listing.encode_cursor(listing.Point(timezone.now(), uuid.uuid4()), "sessions")
    with pytest.raises(BadCursor):
        await runs.session_runs("chat", owner=ALICE, cursor=other)  # a sessions cursor
    assert cursor is None  # one session: no next page
    assert await Run.objects.acount() == 1


# -- deleting a session ------------------------------------------------------------


async def test_delete_during_a_run_stops_it_saves_it_then_leaves_nothing_behind():
    saved_before_deleted: list[bool] = []

    async def receiver(sender: Any, run: Run, status: str, **kwargs: Any) -> None:
        saved_before_deleted.append(
            status == "stopped" and await Run.objects.filter(pk=run.pk, status=status).aexists()
        )

    await ask("chat", "2")
    run = await runs.start("chat", prompt="x", owner=ALICE, agent=slow)
    subscription = await runs.subscribe("chat", owner=ALICE)
    await until_output("chat")
    run_finished.connect(receiver)
    try:
        assert await runs.delete("chat", owner=ALICE) == 2
    finally:
        run_finished.disconnect(receiver)
    events = [event async for event in subscription]
    assert events[-1].event == "done" and events[-1].data == {"status": "stopped"}
    assert saved_before_deleted == [True]  # the delete waited for the save
    assert await Run.objects.filter(session_key="chat").acount() == 0
    backend = get_service().backend
    assert await backend.get("chat") is None
    assert tasks_of(run.id) == []
    with pytest.raises(RunNotFound):
        await runs.subscribe("chat", owner=ALICE)
    assert await runs.status("chat", owner=ALICE) is None
    assert (await runs.sessions(owner=ALICE)).sessions == []
    await asyncio.sleep(0.5)  # checkpoints (every 0.2 s) and the final save are over
    assert await Run.objects.acount() == 0


async def test_delete_by_another_owner_changes_nothing(config):
    config(AGENT=forever)
    await ask("chat", "2")
    await runs.start("chat", prompt="x", owner=ALICE)
    for stranger in (BOB, "anon:", "anon:" + "1" * 32):
        with pytest.raises(RunNotFound, match="No such session"):
            await runs.delete("chat", owner=stranger)
    with pytest.raises(RunNotFound):
        await runs.delete("nobody", owner=ALICE)
    assert (await runs.status("chat", owner=ALICE)).status == "running"  # type: ignore[union-attr]
    assert await Run.objects.filter(session_key="chat").acount() == 2
    await runs.stop("chat")
    await ended("chat")


async def test_delete_of_a_session_that_ended_long_ago_deletes_its_rows():
    await ask("old", "2")
    await ask("old", "3")
    await ask("kept", "1")
    assert await runs.delete("old", owner=ALICE) == 2
    assert [s.session for s in (await runs.sessions(owner=ALICE)).sessions] == ["kept"]
    with pytest.raises(RunNotFound):
        await runs.delete("old", owner=ALICE)


async def test_a_deleted_session_is_free_again_and_its_next_run_has_no_history():
    seen: list[Any] = []

    async def remembering(ctx: Any) -> AsyncIterator[str]:
        seen.append(ctx.history)
        yield "ok"

    await runs.start("chat", prompt="before", owner=ALICE, agent=remembering)
    await ended("chat")
    await runs.delete("chat", owner=ALICE)
    await runs.start("chat", prompt="after", owner=BOB, agent=remembering)
    await ended("chat")
    assert seen == [(), ()]
    assert [s.session for s in (await runs.sessions(owner=BOB)).sessions] == ["chat"]


async def test_a_start_waits_for_a_delete_of_its_session_in_this_process(config):
    config(AGENT="tests.agents.words")
    await runs.start("chat", prompt="linger", owner=ALICE)  # ends 2 s after its stop
    await until_output("chat")
    deleting = asyncio.create_task(runs.delete("chat", owner=ALICE))
    await asyncio.sleep(0.1)
    starting = asyncio.create_task(runs.start("chat", prompt="2", owner=ALICE))
    await asyncio.sleep(0.1)
    assert not deleting.done() and not starting.done()
    assert await deleting == 1
    new = await starting
    assert [r.id for r in (await runs.session_runs("chat", owner=ALICE)).runs] == [new.id]
    await ended("chat")


async def test_writes_that_come_after_a_delete_bring_no_row_back():
    """A checkpoint, a final save, a reaped end, an orphan's mark or a start
    time written after the delete are updates of a row that is gone."""
    row = await ask("chat")
    await runs.delete("chat", owner=ALICE)
    now = timezone.now()
    await sync_to_async(rows.write_checkpoints)([rows.Checkpoint(row.pk, "late", "x", {}, None)])
    saved = await sync_to_async(rows.save_end)(row.pk, {"status": "done", "output": "late"})
    assert saved == (0, True)  # the row is gone
    assert await sync_to_async(rows.save_reaped)(str(row.pk), "late", "x") == (None, False)
    row.status = "running"
    marked, updated = await sync_to_async(rows.mark_orphaned)(row)
    assert marked is row and not updated
    await sync_to_async(rows.set_started_at)(row.pk, now)
    assert await Run.objects.acount() == 0


# -- over HTTP, in-process -------------------------------------------------------------


@pytest.fixture
def client() -> AsyncClient:
    return AsyncClient(enforce_csrf_checks=True)


def csrf(client: AsyncClient) -> dict[str, str]:
    client.cookies["csrftoken"] = "a" * 32
    return {"X-CSRFToken": "a" * 32}


async def post(client: AsyncClient, path: str, prompt: str) -> Any:
    return await client.post(
        path, json.dumps({"prompt": prompt}), content_type="application/json", headers=csrf(client)
    )


async def test_the_views_list_page_and_delete_a_visitors_sessions(client):
    for key in ("one", "two", "three"):
        assert (await post(client, f"/runs/{key}/", "2")).status_code == 202
        await ended(key)
    first = await client.get("/runs/?limit=2")
    assert first.status_code == 200 and "no-store" in first["Cache-Control"]
    body = first.json()
    assert [s["session"] for s in body["sessions"]] == ["three", "two"]
    assert set(body["sessions"][0]) == {
        "session",
        "title",
        "status",
        "runs",
        "started_at",
        "updated_at",
    }
    rest = (await client.get("/runs/", {"limit": "2", "cursor": body["next"]})).json()
    assert [s["session"] for s in rest["sessions"]] == ["one"] and rest["next"] is None
    runs_page = (await client.get("/runs/two/runs/")).json()
    assert runs_page["session"] == "two" and runs_page["next"] is None
    assert [r["output"] for r in runs_page["runs"]] == ["w0 w1 "]
    assert set(runs_page["runs"][0]) >= {"id", "status", "prompt", "output", "options", "usage"}
    deleted = await client.delete("/runs/two/", headers=csrf(client))
    assert deleted.status_code == 204 and deleted.content == b""
    listed = (await client.get("/runs/")).json()["sessions"]
    assert [s["session"] for s in listed] == ["three", "one"]
    assert (await client.get("/runs/two/")).status_code == 404
    assert (await client.get("/runs/two/runs/")).status_code == 404
    assert (await client.delete("/runs/two/", headers=csrf(client))).status_code == 404


async def test_bad_queries_are_400_with_a_message_and_change_nothing(client):
    await post(client, "/runs/chat/", "2")
    await ended("chat")
    for path, words in [
        ("/runs/?limit=0", "limit must be a whole number from 1 to 100"),
        ("/runs/?limit=abc", "limit must be"),
        ("/runs/?limit=1.5", "limit must be"),
        ("/runs/chat/runs/?limit=101", "limit must be"),
        ("/runs/?cursor=garbage", "ask for the first page"),
        ("/runs/chat/runs/?cursor=eyJ9:forged", "ask for the first page"),
        ("/runs/bad%20key/runs/", "session key"),
    ]:
        reply = await client.get(path)
        assert reply.status_code == 400, path
        assert words in reply.json()["error"], (path, reply.json())
    sessions_cursor = listing.encode_cursor(listing.Point(timezone.now(), uuid.uuid4()), "sessions")
    reply = await client.get("/runs/chat/runs/", {"cursor": sessions_cursor})
    assert reply.status_code == 400
    assert (await client.delete("/runs/bad%20key/", headers=csrf(client))).status_code == 400
    assert await Run.objects.acount() == 1


async def test_wrong_methods_are_405_and_a_delete_needs_the_csrf_token(client):
    await post(client, "/runs/chat/", "2")
    await ended("chat")
    reply = await client.post("/runs/", {}, headers=csrf(client))
    assert reply.status_code == 405 and reply["Allow"] == "GET"
    assert (await client.delete("/runs/chat/runs/", headers=csrf(client))).status_code == 405
    refused = await client.delete("/runs/chat/")
    assert refused.status_code == 403 and refused.json()["error"].startswith("CSRF check failed")
    assert await Run.objects.acount() == 1


async def test_users_see_and_delete_only_their_own_sessions(config):
    config(AGENT=forever)
    alice = await get_user_model().objects.acreate(username="alice")
    bob = await get_user_model().objects.acreate(username="bob")
    mine, theirs = AsyncClient(enforce_csrf_checks=True), AsyncClient(enforce_csrf_checks=True)
    await mine.aforce_login(alice)
    await theirs.aforce_login(bob)
    assert (await post(mine, "/runs/chat/", "x")).status_code == 202
    assert [s["session"] for s in (await mine.get("/runs/")).json()["sessions"]] == ["chat"]
    assert (await theirs.get("/runs/")).json() == {"sessions": [], "next": None}
    assert (await theirs.get("/runs/chat/runs/")).status_code == 404
    assert (await theirs.delete("/runs/chat/", headers=csrf(theirs))).status_code == 404
    assert (await mine.get("/runs/chat/")).json()["run"]["status"] == "running"
    assert (await mine.delete("/runs/chat/", headers=csrf(mine))).status_code == 204
    assert await Run.objects.acount() == 0


async def test_anonymous_visitors_list_their_own_and_without_allow_anonymous_get_403(
    client, config
):
    assert (await client.get("/runs/")).json() == {"sessions": [], "next": None}  # no owner yet
    await post(client, "/runs/chat/", "2")
    await ended("chat")
    assert [s["session"] for s in (await client.get("/runs/")).json()["sessions"]] == ["chat"]
    assert (await AsyncClient().get("/runs/")).json()["sessions"] == []
    config(ALLOW_ANONYMOUS=False)
    reply = await client.get("/runs/")
    assert reply.status_code == 403 and reply.json() == {"error": "Log in first."}
    assert (await client.delete("/runs/chat/", headers=csrf(client))).status_code == 403
    assert await Run.objects.acount() == 1

"""Step 10 (options, multitask, conversations, usage) under a hostile or unlucky
client: each test here is a problem found by trying to break it (its
docstring says what was found), and failed before its fix."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from detached_runs import rows, runs
from detached_runs.models import Run
from detached_runs.runs import get_service

from .agents import forever

pytestmark = pytest.mark.django_db(transaction=True)

OWNER = "user:1"


async def statuses(session: str) -> list[tuple[str, str]]:
    """(prompt, status) of the session's rows, oldest first."""
    return [
        (row.prompt, row.status)
        async for row in Run.objects.filter(session_key=session).order_by("started_at")
    ]


async def settles(session: str, prompt: str, timeout: float = 3.0) -> str:
    """The status of the session's run of ``prompt`` once it left ``queued``
    (or ``queued`` if it did not within ``timeout`` s)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        row = await Run.objects.filter(session_key=session, prompt=prompt).afirst()
        assert row is not None
        if row.status not in ("queued", "running") or asyncio.get_running_loop().time() > deadline:
            return row.status
        await asyncio.sleep(0.05)


# -- a queue that never drains ----------------------------------------------------


async def restarted_with_a_queue(session: str) -> None:
    """A memory-backend process with a run in flight and one queued behind it
    shuts down (the run in flight is interrupted, the queued one stays queued,
    as docs/multitask.md says), and the process starts again (a new backend)."""
    await runs.start(session, prompt="first", owner=OWNER, agent=forever)
    queued = await runs.start(session, prompt="3", owner=OWNER, multitask="enqueue")
    assert queued.status == "queued"
    await get_service().shutdown(2)
    assert await statuses(session) == [("first", "interrupted"), ("3", "queued")]
    get_service().reset()  # the restarted process


async def test_after_a_restart_a_status_read_starts_the_queued_run():
    """docs/multitask.md: "with the memory backend they stay queued in the
    database and start at the session's next request after the restart", and
    "the next start, status read or reconnect of the session starts it".

    Found: `GET <key>/` (`RunService.status`), `GET <key>/runs/`, `GET /runs/`
    and `POST <key>/stop/` start nothing: only `open` (`_next_of_queue`, a
    reconnect with the id of the last ``done``) and an ``enqueue`` start call
    `_queue_next`. The queued run stays ``queued`` for good."""
    await restarted_with_a_queue("rs-status")
    latest = await runs.status("rs-status", owner=OWNER)
    assert latest is not None
    await runs.session_runs("rs-status", owner=OWNER)
    await runs.sessions(owner=OWNER)
    assert await settles("rs-status", "3") == "done"


async def test_after_a_restart_a_reject_start_is_not_refused_forever():
    """After the restart nothing is in flight; the session has a queued run
    that nothing starts. Found: every ``reject`` start is `SessionBusy` (409
    "The session has runs queued") and starts nothing, so a client whose
    policy is ``reject`` (or a project whose ``MULTITASK`` is) can never send
    in that session again until someone else reconnects or enqueues. The
    start should start the queue ("the next start ... of the session starts
    it"), so that the session drains."""
    from detached_runs.exceptions import SessionBusy

    await restarted_with_a_queue("rs-reject")
    with pytest.raises(SessionBusy):
        await runs.start("rs-reject", prompt="again", owner=OWNER, multitask="reject")
    assert await settles("rs-reject", "3") == "done"


# -- an enqueue that races the final save ----------------------------------------


async def test_an_enqueue_during_the_final_save_of_the_run_in_flight_is_started(monkeypatch):
    """An ``enqueue`` start reads the session's run as in flight (the backend
    keeps it ``running`` until its finalize returns), so it queues its row;
    if the run's end counted the queue before that row was written, it found
    "nothing queued" and started nothing, and the start did not either (it
    saw a run in flight). Found: the queued run stays ``queued`` for good with
    the memory backend (no sweep), whether or not anybody follows the
    session, although nothing is in flight. The window is the final save's
    duration (a slow database, a save retried); the test holds the save
    until the start has read the run in flight, so that the start always
    lands in the window (a fixed pause did not, once, on a loaded machine)."""
    real_save_end = rows.save_end
    backend = get_service().backend
    real_get = backend.get
    saving = asyncio.Event()
    read = threading.Event()  # the enqueue start has read the run in flight
    loop = asyncio.get_running_loop()

    def slow_save_end(pk: Any, fields: dict[str, Any]) -> Any:
        result = real_save_end(pk, fields)
        if Run.objects.filter(pk=pk, session_key="race").exists():
            loop.call_soon_threadsafe(saving.set)
            read.wait(10)  # the database answers slowly
        return result

    async def get(session_key: str) -> Any:
        state = await real_get(session_key)
        if session_key == "race" and saving.is_set():
            read.set()
        return state

    monkeypatch.setattr(rows, "save_end", slow_save_end)
    monkeypatch.setattr(backend, "get", get)
    await runs.start("race", prompt="2", owner=OWNER)
    await asyncio.wait_for(saving.wait(), 5)
    queued = await runs.start("race", prompt="3", owner=OWNER, multitask="enqueue")
    assert read.is_set()
    assert queued.status == "queued"
    assert await settles("race", "3", timeout=4) == "done"


# -- a refused start that changed things -------------------------------------------


@pytest.mark.parametrize("multitask", ["rollback", "interrupt"])
async def test_a_rollback_or_interrupt_start_the_backend_refuses_changes_nothing(
    monkeypatch, multitask
):
    """ "A refused start changes nothing" (`RunService._launch`: its own row is
    deleted again). Found: `rows.open_row` has already, in its committed
    transaction, deleted (``rollback``) or cancelled (``interrupt``) the
    session's queued runs and, for ``rollback``, deleted the row of the run
    in flight, before the backend refuses the start (Redis unreachable, a
    shutdown that began meanwhile). The run in flight is not stopped (the
    start never reached the backend): it goes on streaming with no row, its
    final save updates nothing, and the history has lost it and the queue."""
    from detached_runs.exceptions import BackendUnavailable

    service = get_service()
    first = await runs.start("refused", prompt="first", owner=OWNER, agent=forever)
    await runs.start("refused", prompt="3", owner=OWNER, multitask="enqueue")

    async def unreachable(*args: Any, **kwargs: Any) -> None:
        raise BackendUnavailable("Redis is unreachable.")

    monkeypatch.setattr(service.backend, "start", unreachable)
    with pytest.raises(BackendUnavailable):
        await runs.start("refused", prompt="new", owner=OWNER, multitask=multitask)
    latest = await runs.status("refused", owner=OWNER)
    assert latest is not None and latest.pk == first.pk  # still in flight
    assert await statuses("refused") == [("first", "running"), ("3", "queued")]
    monkeypatch.undo()
    await runs.stop("refused", owner=OWNER, queued=True)


# -- a WebSocket that enqueues while it follows nothing -----------------------------


async def test_a_socket_that_enqueues_while_idle_gets_its_queued_run():
    """A socket whose run ended (it follows nothing: its pump stopped after
    the ``done``) sends ``{"type": "start", "multitask": "enqueue"}`` while
    another tab's run is in flight. Found: `RunConsumer._start` returns at
    once for a queued run ("the socket follows it when it starts"), but
    nothing follows: no pump runs, so the socket gets neither the run in
    flight nor, ever, its own queued run, although a start frame that is
    not queued is followed. It should follow the run in flight and then its
    queued run, as a socket that was following does (docs/multitask.md)."""
    from .test_consumers import OWNER as WS_OWNER
    from .test_consumers import connect, cookie_for, frames_until_done

    cookie = await cookie_for(WS_OWNER)
    await runs.start("wsidle", prompt="2", owner=WS_OWNER)
    socket = await connect("wsidle", cookie)
    await frames_until_done(socket)  # the first run, replayed or live, to its done
    await asyncio.sleep(0.3)  # its pump is over
    # Another tab (or an HTTP client) starts a run; then this socket queues one.
    # 100 words, 1 s: still in flight when the frame is read, on a loaded machine too.
    other = await runs.start("wsidle", prompt="100", owner=WS_OWNER)
    await socket.send_json_to({"type": "start", "prompt": "context", "multitask": "enqueue"})
    for _ in range(200):
        queued = await Run.objects.filter(session_key="wsidle", prompt="context").afirst()
        if queued is not None:
            break
        await asyncio.sleep(0.01)
    assert queued is not None and queued.status == "queued"
    frames: list[dict[str, Any]] = []
    try:
        while True:
            frame = await socket.receive_json_from(timeout=5)
            frames.append(frame)
            if frame["event"] == "done" and frame["id"].startswith(queued.pk.hex):
                break
    except (TimeoutError, asyncio.CancelledError):
        pass  # nothing came for 5 s (the communicator cancels the app then)
    starts = [f["data"]["run"] for f in frames if f["event"] == "start"]
    assert str(queued.pk) in starts, f"the socket got {len(frames)} frames, starts {starts}"
    assert other.status == "running"


# -- the history of a run after a queue was cancelled -------------------------------


async def history_teller(ctx: Any) -> Any:
    """Says the prompts of its history, then waits (a run in flight) unless
    its prompt says "quick"."""
    yield "|".join(f"{turn.prompt}:{turn.status}" for turn in ctx.history) or "-"
    if ctx.prompt != "quick":
        await asyncio.sleep(30)


async def test_queued_runs_cancelled_by_an_interrupt_are_not_in_the_next_runs_history(config):
    """`rows._open_row`: "The history is of runs that ran (a queued run just
    cancelled did not)". Found: with a run in flight the new run reads its
    history later (`rows.earlier_turns`), from the database, where the
    cancelled queued runs are ``stopped`` rows like any other: the agent is
    handed prompts that never ran, each with an empty answer, as if the user
    had sent them and stopped them. (The filter in `_open_row` only applies
    when nothing is in flight.)"""
    config(AGENT=history_teller)
    await runs.start("hist", prompt="first", owner=OWNER)
    await runs.start("hist", prompt="never ran", owner=OWNER, multitask="enqueue")
    await runs.start("hist", prompt="quick", owner=OWNER, multitask="interrupt")
    for _ in range(300):
        row = await Run.objects.filter(session_key="hist", prompt="quick").afirst()
        if row is not None and row.status == "done":
            break
        await asyncio.sleep(0.02)
    assert await statuses("hist") == [
        ("first", "stopped"),
        ("never ran", "stopped"),
        ("quick", "done"),
    ]
    assert row is not None and row.output == "first:stopped"


# -- usage: what the admin makes of it ---------------------------------------------


def test_the_admin_sums_token_counts_the_rules_allow_without_a_500(admin_client):
    """docs/usage.md: token counts are "whole numbers, 0 to 2**53 - 1". Found:
    on SQLite the admin's sums (`RunAdmin.changelist_view`: ``Sum`` of the
    count cast to ``BigIntegerField``) are SQLite's integer ``sum()``, which
    raises "integer overflow" past 2**63 - 1: 1,025 runs at the largest count
    a report may have (or fewer, larger-than-realistic counts from a buggy
    endpoint) make the list of runs a 500 for good. (PostgreSQL's ``sum`` of
    bigint is numeric; ``total()`` or a float cast would not overflow.)"""
    from django.db import connection

    if connection.vendor != "sqlite":
        pytest.skip("SQLite's integer sum() is the one that overflows")
    biggest = 2**53 - 1
    Run.objects.bulk_create(
        Run(session_key=f"big{i}", prompt="p", status="done", usage={"input_tokens": biggest})
        for i in range(1025)
    )
    response = admin_client.get("/admin/detached_runs/run/")
    assert response.status_code == 200


async def test_time_to_first_token_of_a_queued_run_does_not_count_its_wait_in_the_queue():
    """docs/usage.md: "time to first token is ``first_token_at - started_at``",
    and the admin filters and averages it as the model's latency. Found: a
    queued run's ``started_at`` is when it was queued ("A queued run keeps the
    time it was sent: the queue's order", `RunService._launch`), so its time to
    first token is its wait behind the run before it plus the model's: here
    its wait (seconds) for an agent that answers in 10 ms, and a chat whose users
    queue follow-ups reads as a slow model in the admin (the "5 to 30 s"
    filter, the mean)."""
    # 200 words, 2 s or more: far above what a loaded machine adds to a first token.
    await runs.start("ttft", prompt="200", owner=OWNER)
    queued = await runs.start("ttft", prompt="3", owner=OWNER, multitask="enqueue")
    assert await settles("ttft", "3", timeout=20) == "done"
    row = await Run.objects.aget(pk=queued.pk)
    assert row.first_token_at is not None
    waited = (row.first_token_at - row.started_at).total_seconds()
    assert waited < 1.0, f"time to first token {waited:.2f} s for an agent that answers at once"


# -- limits that a queue escapes ---------------------------------------------------


async def test_a_queued_run_counts_against_its_anonymous_owners_address_once_it_starts(config):
    """docs/http.md: a client without cookies is a new anonymous owner at
    every request, so anonymous runs are limited per client address
    (``MAX_ACTIVE_ANONYMOUS_RUNS_PER_ADDRESS``); docs/multitask.md: "a queued
    run counts from when it starts". Found: a run started from the queue
    (`RunService._promote` -> `_launch(..., network=None)`) carries no
    address in its backend meta, so it never counts against the address: an
    anonymous visitor queues a long run behind a short one, and once the
    short one ends its address is free again while the queued one runs. Each
    new cookie-less owner can do the same, so one address gets any number of
    runs in flight. Here: three runs in flight from one address whose limit
    is two."""
    from detached_runs.exceptions import TooManyRuns

    config(MAX_ACTIVE_ANONYMOUS_RUNS_PER_ADDRESS=2)
    home = "198.51.100.7"
    # 100 words, 1 s: still in flight when the next is sent, on a loaded machine too.
    await runs.start("addr-a", prompt="100", owner="anon:a", address=home)
    queued = await runs.start(
        "addr-a", prompt="long", owner="anon:a", address=home, agent=forever, multitask="enqueue"
    )
    assert queued.status == "queued"
    for _ in range(300):
        if (await Run.objects.aget(pk=queued.pk)).status == "running":
            break
        await asyncio.sleep(0.02)
    assert (await Run.objects.aget(pk=queued.pk)).status == "running"
    await runs.start("addr-b", prompt="x", owner="anon:b", address=home, agent=forever)
    try:
        with pytest.raises(TooManyRuns):
            await runs.start("addr-c", prompt="x", owner="anon:c", address=home, agent=forever)
    finally:
        for key in ("addr-a", "addr-b"):
            await runs.stop(key)


async def test_an_enqueue_at_the_per_owner_limit_is_queued_not_refused(config):
    """docs/multitask.md: "The per-owner limit (``MAX_ACTIVE_RUNS_PER_OWNER``)
    counts runs in flight: a queued run counts from when it starts, and is not
    refused then." Found: `RunService.start` checks the limit for an
    ``enqueue`` start as for a new run beside the others (only ``interrupt``
    and ``rollback`` discount the run they replace), so an owner at the limit
    gets 429 for a run that would add nothing in flight. With
    ``MAX_ACTIVE_RUNS_PER_OWNER = 1`` ("one answer at a time per user", the
    natural setting for a queue) ``enqueue`` is never accepted while the
    user's own run is in flight; the same holds of the per-address limit for
    anonymous visitors."""
    config(MAX_ACTIVE_RUNS_PER_OWNER=1)
    await runs.start("limit-q", prompt="x", owner=OWNER, agent=forever)
    try:
        queued = await runs.start("limit-q", prompt="3", owner=OWNER, multitask="enqueue")
        assert queued.status == "queued"
    finally:
        await runs.stop("limit-q", queued=True)


# -- the sessions list -------------------------------------------------------------


async def test_a_first_prompt_that_starts_with_much_whitespace_still_has_a_title():
    """docs/http.md: the title is "its first prompt, whitespace collapsed, cut
    to 80 characters at a word". Found: `listing.sessions_query` reads only
    the first 400 characters of the first prompt (``Left("prompt", 400)``)
    before `title_of` collapses whitespace, so a prompt pasted after 400 line
    breaks or spaces (a valid prompt: it is not empty once stripped) lists
    with the title ``""``."""
    await runs.start("ws-title", prompt="\n" * 450 + "Plan a trip to Lisbon", owner=OWNER)
    page = await runs.sessions(owner=OWNER)
    assert [s.title for s in page.sessions if s.session == "ws-title"] == ["Plan a trip to Lisbon"]


async def test_the_sessions_list_shows_a_session_with_a_run_in_flight_as_running():
    """docs/http.md: the list's ``status`` is "its latest run's: running,
    done..." and `GET <key>/` is "the current or latest run (not a queued
    one)". Found: the list takes the session's latest row by ``started_at``,
    queued ones included, so a session whose run is streaming, with a
    follow-up queued, lists as ``"queued"`` (and its ``updated_at`` is the
    queued prompt's), while `GET <key>/` says ``running``: a sidebar shows
    the conversation as waiting while its answer streams."""
    await runs.start("list-q", prompt="first", owner=OWNER, agent=forever)
    await runs.start("list-q", prompt="3", owner=OWNER, multitask="enqueue")
    try:
        current = await runs.status("list-q", owner=OWNER)
        listed = [s for s in (await runs.sessions(owner=OWNER)).sessions if s.session == "list-q"]
        assert current is not None and current.status == "running"
        assert [s.status for s in listed] == ["running"]
    finally:
        await runs.stop("list-q", queued=True)


# -- the WebSocket start frame and options --------------------------------------------


async def test_a_websocket_start_takes_the_options_a_json_body_takes(config):
    """docs/multitask.md: "the WebSocket ``start`` frame takes the same
    ``options`` (and ``multitask``) keys as the JSON body", bounded by
    ``MAX_OPTIONS_BYTES`` (16384). Found: the consumer refuses a frame longer
    than 12 x ``MAX_PROMPT_CHARS`` + 1024 characters before it reads it
    (`consumers._frame_limit`, sized for the prompt alone), so with
    ``MAX_PROMPT_CHARS = 500`` a short prompt with 10 KB of options (accepted
    over HTTP) is an error frame over the socket, whose message blames the
    prompt: "a prompt may have at most 500 characters"."""
    from .test_consumers import OWNER as WS_OWNER
    from .test_consumers import connect, cookie_for

    config(MAX_PROMPT_CHARS=500)
    options = {"attachments": list(range(2500))}  # about 10 KB of JSON
    cookie = await cookie_for(WS_OWNER)
    socket = await connect("wsopts", cookie)
    await socket.send_json_to({"type": "start", "prompt": "3", "options": options})
    frame = await socket.receive_json_from(timeout=5)
    await socket.disconnect()
    assert frame["event"] != "error", frame["data"]


# -- two workers over Redis whose clocks differ ---------------------------------------


def test_a_run_queued_on_a_worker_whose_clock_is_behind_still_follows_the_run_before_it():
    """Runs started at once take their start time from Redis's clock
    (`RedisBackend.start`, "Runs of a session start in the order of this
    lock"), but a queued run keeps the time its row was written, by the clock
    of the worker that queued it ("A queued run keeps the time it was sent",
    `RunService._launch`). Found: with workers on hosts whose clocks differ
    (here B is 2 s behind; NTP keeps hosts within milliseconds, which a quick
    double send is as close as), a run queued through B sorts *before* the
    run it was queued behind: its agent's history (`rows.earlier_turns`:
    ``started_at <= its own``) lacks the answer it follows up, the runs list
    puts it first, and once the session is evicted `GET <key>/` (`latest_row`)
    shows the older run as the session's latest."""
    import redis as redis_client

    from .conftest import server_env, start_server, stop_server
    from .http import Browser

    try:
        redis_client.Redis(host="127.0.0.1", port=6379, socket_timeout=1).ping()
    except redis_client.RedisError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    prefix = f"dr-break-{time.time_ns()}"
    env = server_env(
        TEST_BACKEND="redis",
        TEST_REDIS_PREFIX=prefix,
        TEST_AGENT="tests.skewed_clock_asgi.history",
        TEST_AGENT_DELAY="0.02",
        TEST_EVICT_AFTER="1",
    )
    a = start_server(env)
    b = start_server(env, app="tests.skewed_clock_asgi:application")
    try:
        on_a = Browser(a.port)
        # 150 words, 3 s: still in flight when B queues, however slow the machine.
        assert on_a.request("POST", "/runs/skew/", {"prompt": "150"}).status == 202
        on_b = Browser(b.port)  # the same browser, through the other worker
        on_b.cookies, on_b.csrf = dict(on_a.cookies), on_a.csrf
        queued = on_b.request("POST", "/runs/skew/", {"prompt": "history", "multitask": "enqueue"})
        assert queued.json()["status"] == "queued"
        deadline = time.monotonic() + 20
        while set(Run.objects.filter(session_key="skew").values_list("status", flat=True)) != {
            "done"
        }:
            assert time.monotonic() < deadline, "the runs did not end"
            time.sleep(0.1)
        time.sleep(2)  # evicted
        follow_up = Run.objects.get(session_key="skew", prompt="history")
        listed = [r["prompt"] for r in on_a.request("GET", "/runs/skew/runs/").json()["runs"]]
        latest = on_a.request("GET", "/runs/skew/").json()["run"]["prompt"]
        assert (follow_up.output, listed, latest) == ("history=150", ["150", "history"], "history")
    finally:
        stop_server(a)
        stop_server(b)
        client = redis_client.Redis(host="127.0.0.1", port=6379)
        keys = list(client.scan_iter(match=f"*{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


# -- a DELETE that fails after it changed things ----------------------------------------


async def clingy(ctx: Any) -> Any:
    """Says a word, then takes 1.5 s to let go when stopped."""
    yield "holding "
    try:
        await asyncio.sleep(30)
    finally:
        await asyncio.sleep(1.5)


async def test_a_delete_whose_run_does_not_stop_in_time_deletes_nothing(monkeypatch):
    """docs/http.md: "A run that does not stop within 30 s makes the delete a
    ``503`` with nothing deleted." Found: `RunService.delete` deletes the
    session's queued runs (`rows.cancel_queued(..., delete=True)`) before it
    asks the backend to stop the run in flight and wait for it; when that
    wait times out (`BackendUnavailable`, the 503) the queued runs are gone
    already. (The wait is cut to 0.3 s here, with an agent that takes longer
    to let go; in production that is a run whose save or whose worker takes
    over 30 s.)"""
    from detached_runs.exceptions import BackendUnavailable

    service = get_service()
    await runs.start("del503", prompt="x", owner=OWNER, agent=clingy)
    await runs.start("del503", prompt="3", owner=OWNER, multitask="enqueue")
    await asyncio.sleep(0.2)  # the agent said its word and holds on
    backend = service.backend
    real_delete = backend.delete

    async def impatient(session_key: str, run_ids: Any, **kwargs: Any) -> None:
        await real_delete(session_key, run_ids, timeout=0.3)

    monkeypatch.setattr(backend, "delete", impatient)
    with pytest.raises(BackendUnavailable):
        await runs.delete("del503", owner=OWNER)
    try:
        assert ("3", "queued") in await statuses("del503")
    finally:
        await runs.stop("del503", queued=True)


# -- signals ---------------------------------------------------------------------------


async def test_a_rolled_back_run_gets_its_run_finished():
    """docs/signals.md: ``run_finished`` is sent "once per run", after
    ``run_started`` (whose receivers count starts, and whose example
    ``record_usage`` receiver books each run's usage in ``run_finished``).
    Found: ``rollback`` deletes the row of the run in flight in `rows.open_row`
    before that run is stopped; its final save (`rows.save_end`) then
    matches no row, so `Recorder.finalize` announces nothing. The run had its
    ``run_started`` (and the model billed its tokens), but no receiver ever
    hears of its end: a count of runs in flight never comes down, and what it
    used is recorded nowhere (its row, with `Run.usage`, is gone too). A
    DELETE, by contrast, stops the run and waits for its save before the rows
    go, "so `run_finished` is sent"."""
    from detached_runs.signals import run_finished, run_started

    started: list[str] = []
    finished: list[str] = []

    async def on_start(sender: Any, run: Run, **kwargs: Any) -> None:
        started.append(run.prompt)

    async def on_finish(sender: Any, run: Run, **kwargs: Any) -> None:
        finished.append(run.prompt)

    run_started.connect(on_start, sender=Run)
    run_finished.connect(on_finish, sender=Run)
    try:
        await runs.start("rb-signal", prompt="first", owner=OWNER, agent=forever)
        await asyncio.sleep(0.1)
        await runs.start("rb-signal", prompt="2", owner=OWNER, multitask="rollback")
        for _ in range(200):
            if "2" in finished:
                break
            await asyncio.sleep(0.02)
        assert started == ["first", "2"]
        assert sorted(finished) == ["2", "first"]
    finally:
        run_started.disconnect(on_start, sender=Run)
        run_finished.disconnect(on_finish, sender=Run)


# -- the sweep of waiting queues ----------------------------------------------------------


async def test_the_sweep_reaches_a_stranded_queue_behind_more_queues_that_wait_rightly():
    """`RunService.sweep` starts "queues that nothing starts" (docs: the
    periodic sweep of the Redis backend, about every 30 s, "for queues
    waiting longer than the stale-heartbeat bound"). Found:
    `rows.waiting_queues` takes ``.values_list("session_key").distinct()[:limit]``
    of a model ordered by ``-started_at``, so the SQL is ``SELECT DISTINCT
    session_key, started_at ... ORDER BY started_at DESC LIMIT 100``: one
    entry per queued *row*, newest first. Queues that wait rightly behind a
    long answer still streaming fill the limit (a session with ten queued
    follow-ups takes ten entries), the same ones at every sweep, and an older
    stranded queue (its run ended and nothing started the next) is never
    reached. Shown with ``limit=3``: one busy session with three follow-ups
    queued hides a stranded queue for good."""
    from datetime import timedelta

    from django.utils import timezone

    now = timezone.now()
    # A queue that nothing starts: its run ended (here: before a restart).
    await Run.objects.abulk_create(
        [
            Run(
                session_key="stranded",
                prompt="done",
                owner=OWNER,
                status="done",
                started_at=now - timedelta(minutes=10),
            ),
            Run(
                session_key="stranded",
                prompt="3",
                owner=OWNER,
                status="queued",
                started_at=now - timedelta(minutes=9),
            ),
        ]
    )
    # A long answer streaming, with three follow-ups queued rightly behind it.
    await runs.start("busy", prompt="x", owner=OWNER, agent=forever)
    for i in range(3):
        await runs.start("busy", prompt=f"follow-up {i}", owner=OWNER, multitask="enqueue")
    await Run.objects.filter(status="queued").aupdate(updated_at=now - timedelta(minutes=5))
    try:
        for _ in range(3):  # three sweeps
            await get_service().sweep(limit=3)
        assert await settles("stranded", "3") == "done"
    finally:
        await runs.stop("busy", queued=True)


# -- a stop whose body is not declared JSON ---------------------------------------------


async def test_a_stop_all_sent_without_the_json_content_type_is_refused_not_half_done(config):
    """``fetch(url, {method: "POST", body: JSON.stringify({all: true})})``
    sends ``Content-Type: text/plain;charset=UTF-8`` (fetch's default for a
    string body), as does ``navigator.sendBeacon`` with a string. Found:
    `views._stop_all` reads the body only when it is declared JSON and takes
    anything else as no body: the stop answers 200, stops the run in flight,
    and the queued runs the user asked to cancel start one after the other,
    the opposite of the request. A body that is there but neither JSON nor a
    form should be a 400 that changes nothing (as a start's is: "Send a
    prompt"), or be read as the JSON it is."""
    from django.test import AsyncClient

    config(AGENT=forever)
    client = AsyncClient(enforce_csrf_checks=True)
    client.cookies["csrftoken"] = "a" * 32
    headers = {"X-CSRFToken": "a" * 32}
    for prompt, multitask in (("first", "interrupt"), ("second", "enqueue")):
        body = {"prompt": prompt, "multitask": multitask}
        started = await client.post(
            "/runs/stopall/", body, content_type="application/json", headers=headers
        )
        assert started.status_code == 202
    reply = await client.post(
        "/runs/stopall/stop/",
        b'{"all": true}',
        content_type="text/plain;charset=UTF-8",
        headers=headers,
    )
    await asyncio.sleep(0.5)
    try:
        if reply.status_code == 200:  # then it must have done what was asked
            assert await statuses("stopall") == [("first", "stopped"), ("second", "stopped")]
        else:
            assert reply.status_code == 400
            assert await statuses("stopall") == [("first", "running"), ("second", "queued")]
    finally:
        await runs.stop("stopall", queued=True)


# -- what the service keeps of queued runs ----------------------------------------------


async def test_the_agent_of_a_queued_run_cancelled_from_the_admin_is_not_kept_forever():
    """`RunService._queued_agents` keeps the agent given to ``runs.start`` for
    each run this process queued, until the run starts here or the session's
    queue is cancelled through the service. Found: a queued run cancelled by
    the admin's action (`rows.cancel_runs`), or started by another worker
    (Redis), leaves its entry (and the agent object, with whatever it holds)
    in the dict for the life of the process: a slow leak per such run."""
    service = get_service()

    async def shouting(ctx: Any) -> Any:
        yield ctx.prompt.upper()

    await runs.start("leak", prompt="1", owner=OWNER, agent=forever)
    queued = await runs.start(
        "leak", prompt="hello", owner=OWNER, multitask="enqueue", agent=shouting
    )
    await asyncio.to_thread(rows.cancel_runs, [queued.pk])  # the admin's action
    await runs.stop("leak")
    for _ in range(100):
        if (await Run.objects.filter(session_key="leak", status="running").acount()) == 0:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)  # the end's search for a next queued run is over
    assert "leak" not in service._queued_agents


async def test_a_queue_a_draining_worker_does_not_start_is_logged_without_a_traceback(caplog):
    """Found (Step 13): a draining worker's own sweep tried to start a queue
    it must leave to others, and logged the refusal as a fault, with a
    traceback, every 30 s of the drain. The refusal is expected: one line."""
    caplog.set_level("WARNING", logger="detached_runs")
    service = get_service()
    await runs.start("drainq", prompt="first", owner=OWNER, agent=forever)
    await runs.start("drainq", prompt="3", owner=OWNER, multitask="enqueue")
    backend: Any = service.backend  # either backend has a driver
    backend.driver.refuse_new_runs()  # what a drain does first
    await runs.stop("drainq", owner=OWNER)
    assert await settles("drainq", "first") == "stopped"
    assert await service._promote("drainq") is None
    assert await statuses("drainq") == [("first", "stopped"), ("3", "queued")]
    refusals = [r for r in caplog.records if "queued run of drainq" in r.getMessage()]
    assert refusals and all(r.exc_info is None for r in refusals)

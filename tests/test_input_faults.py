"""Hostile and unlucky cases of runs that wait for the user (``ctx.ask``),
found by a tester trying to break Step 11: each test failed on the code it
was written against, and says the defect and why it mattered (the fixed
ones say "Fixed" where the contract they check changed). The Redis ones
run a redis-server of their own (``own_redis``), whatever ``TEST_BACKEND``
says; the browser one needs Playwright and Chromium, as ``test_browser.py``
does."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import AsyncClient

from detached_runs import runs
from detached_runs.exceptions import InputTimeout
from detached_runs.models import Run
from detached_runs.runs import get_service

from .conftest import Saves, collect, ended, eventually
from .test_input import QUESTION, new_key, waiting

#: The tests that use the database (not the browser one: its page has its own).
db = pytest.mark.django_db(transaction=True)

MEMORY = "detached_runs.backends.memory.MemoryBackend"
REDIS = "detached_runs.backends.redis.RedisBackend"


@pytest.fixture
def memory_service(config: Any) -> None:
    """The service on the memory backend, whatever ``TEST_BACKEND`` says."""
    config(BACKEND=MEMORY)


@pytest.fixture
def redis_service(config: Any, own_redis: Any) -> None:
    """The service on the Redis backend, on a redis-server of the test's own."""
    pytest.importorskip("redis")
    config(BACKEND=REDIS, REDIS_URL=own_redis.url, REDIS_PREFIX=f"dr-f-{uuid.uuid4().hex[:8]}")


async def first_request(subscription: Any) -> tuple[str, list[Any]]:
    """The request id of the first ``input_required`` a subscription reads,
    and the events read until then."""
    events: list[Any] = []
    while not any(e.event == "input_required" for e in events):
        events += await subscription.next_batch()
    return next(e for e in events if e.event == "input_required").data["request"], events


# -- a stop and an answer ------------------------------------------------------------


@db
async def test_an_answer_racing_a_stop_is_never_accepted_and_then_lost(redis_service):
    """Redis: a stop and an answer sent at the same moment (two tabs: one
    clicks Stop, the other clicks Yes). The answer gets ``200 {"accepted":
    true}`` every time, yet the agent never gets it: it is cancelled, and the
    run ends ``stopped``. docs/input.md promises "an answer is either taken
    by the agent or refused, never accepted and then lost", and the memory
    backend keeps it (it answers 409 here).

    Why: a stop made on the run's own worker (`RunDriver.request_stop`) only
    sets the run's flag in memory; the question stays in the run's Redis hash
    until the stopped ask's ``finally`` spawns `_Questions.abandoned` (a
    round trip later). `redis_scripts.ANSWER` takes the answer meanwhile, and
    `RedisBackend.answer` returns True even though `RunDriver.deliver`
    refused it (``if self.driver.deliver(...)`` ... ``return True``)."""
    seen: list[Any] = []

    async def agent(ctx: Any) -> AsyncIterator[str]:
        yield "asking "
        try:
            seen.append(await ctx.ask(QUESTION, timeout=30))
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        yield "end"

    outcomes = []
    for _ in range(5):
        seen.clear()
        key = new_key()
        await runs.start(key, prompt="go", agent=agent)
        request = (await waiting(key))["request"]
        _, answered = await asyncio.gather(
            runs.stop(key),
            runs.answer(key, {"request": request, "value": "yes"}),
            return_exceptions=True,
        )
        await ended(key)
        outcomes.append((answered is None, list(seen)))
    assert all(seen == (["yes"] if accepted else ["cancelled"]) for accepted, seen in outcomes), (
        "(accepted, what the agent got):",
        outcomes,
    )


@db
async def test_a_stop_in_the_same_turn_as_the_answer_still_cancels_the_agent(memory_service):
    """The answer and a stop land in the same turn of the event loop (two
    requests, or a stop and the answer found by the Redis worker's look):
    the stop says ``stopped: true`` and the run ends ``stopped``, but the
    agent is never cancelled: it goes on with the answer and runs the
    approved tool to its end (here a 1 s "tool"; it would be abandoned only
    STOP_GRACE later). With a tool approval that is the one thing a user
    who clicks Stop wants not to happen.

    Why: `RunDriver.ask` waits with ``asyncio.wait_for(asyncio.shield(future),
    timeout)``; on Python 3.11 (``requires-python >= 3.11``, the venv's
    version) ``wait_for`` returns the result instead of raising when it is
    cancelled after the inner future completed, so the stop's one
    ``task.cancel()`` is swallowed (the driver never cancels twice). The
    driver's own sync calls put both in one turn deterministically."""
    seen: list[str] = []

    async def agent(ctx: Any) -> AsyncIterator[str]:
        yield "asking "
        answer = await ctx.ask(QUESTION, timeout=30)
        seen.append(f"answer {answer}")
        try:
            await asyncio.sleep(1.0)  # the approved tool's work
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        seen.append("tool ran")
        yield "end"

    key = new_key()
    await runs.start(key, prompt="go", agent=agent)
    request = (await waiting(key))["request"]
    driver = get_service().backend.driver  # type: ignore[attr-defined]
    assert driver.answer(key, request, "yes") is True
    assert driver.stop(key) is True
    row = await ended(key)
    assert row.status == "stopped"
    # The stop wins, and the accepted answer is not lost: the agent takes it
    # (it was cancelled at its wait and got nothing, while the answer said
    # accepted: a Redis CI run), then is cancelled at its next await, and the
    # approved tool never runs to its end.
    assert seen == ["answer yes", "cancelled"]


# -- Redis faults -------------------------------------------------------------------


def _backend(url: str, prefix: str, **options: Any) -> Any:
    from detached_runs.backends.redis import RedisBackend

    return RedisBackend(
        redis_url=url,
        redis_prefix=prefix,
        evict_after=3.0,
        renew_every=0.5,
        connection_kwargs={"socket_timeout": 1},
        **options,
    )


async def test_a_question_pending_when_redis_restarts_empty_can_still_be_answered(
    own_redis: Any, saves: Saves
) -> None:
    """Redis (no persistence) restarts while a run waits. The run's worker
    writes the run back (`RedisBackend._resync`) and every worker shows it
    ``waiting`` with its question again, but every answer is refused
    (409, "not pending") until the question times out: an hour by default.
    The user sees the question and cannot answer it.

    Why: `_resync` rewrites the run's hash without its ``input`` field, and
    `_Questions.watch` records the question again (`redis_scripts.ASK`) only
    after a failed call (``recorded``), never after Redis lost it; the ASK
    script's 0 ("not recorded") is ignored in `_Questions.opened` too."""
    prefix = f"dr-test-{uuid.uuid4().hex[:8]}"
    a = _backend(own_redis.url, prefix, lease_ms=3000)
    b = _backend(own_redis.url, prefix, lease_ms=3000)
    run_id = uuid.uuid4().hex
    got: list[Any] = []

    async def asking() -> AsyncIterator[str]:
        yield "asking "
        got.append(await a.ask("s", run_id, {"q": "?"}, 30))
        yield "answered"

    try:
        await a.start(
            "s", run_id, asking(), start_data={"run": run_id}, meta={"owner": "o"}, finalize=saves
        )
        subscription = await a.subscribe("s")
        request, _ = await first_request(subscription)
        own_redis.restart_empty()

        async def shown_waiting_again() -> bool:
            try:
                state = await b.get("s")
            except Exception:  # noqa: BLE001 - reconnecting
                return False
            return state is not None and state.status == "waiting"

        await eventually(shown_waiting_again, "the run never came back to Redis", timeout=10)
        await asyncio.sleep(1.5)  # three more renewals and looks of its worker
        assert (await b.get("s")).input_request["request"] == request
        assert await b.answer("s", request, "yes") is True, "the pending question is refused"
        rest = await asyncio.wait_for(collect(subscription), 5)
        assert rest[-1].data == {"status": "done"} and got == ["yes"]
    finally:
        await a.shutdown(2)
        await b.shutdown(2)


async def test_a_question_that_timed_out_while_redis_was_unreachable_refuses_answers(
    own_redis: Any, saves: Saves
) -> None:
    """(Fixed: the question's timeout is settled in Redis, once it is
    reachable again.) The question times out while the run's worker cannot
    reach Redis (a network blip): the agent got `InputTimeout` and went on. Once Redis
    is reachable again, an answer to that question (from a tab that missed
    the ``input_timeout``, or another worker) gets ``200 {"accepted":
    true}``, and is lost: the agent never gets it. docs/input.md: "an answer
    is either taken by the agent or refused, never accepted and then lost".

    Why: `RunDriver.ask` logs ``input_timeout`` and raises when
    `_Questions.withdraw` could not reach Redis (it returns None), leaving
    the question in the run's hash (``input``); nothing withdraws it later,
    so `redis_scripts.ANSWER` still takes answers to it."""
    from .proxy import Proxy

    proxy = Proxy(upstream=own_redis.port)
    prefix = f"dr-test-{uuid.uuid4().hex[:8]}"
    a = _backend(f"redis://127.0.0.1:{proxy.port}/0", prefix, lease_ms=30000)  # through the proxy
    b = _backend(own_redis.url, prefix, lease_ms=30000)
    run_id = uuid.uuid4().hex
    got: list[Any] = []

    async def asking() -> AsyncIterator[str]:
        yield "asking "
        try:
            got.append(await a.ask("s", run_id, {"q": "?"}, 1.5))
        except InputTimeout:
            got.append("timed out")
        await asyncio.sleep(3)  # the agent goes on without the answer
        yield "end"

    try:
        await a.start(
            "s", run_id, asking(), start_data={"run": run_id}, meta={"owner": "o"}, finalize=saves
        )
        subscription = await a.subscribe("s")
        request, events = await first_request(subscription)
        await asyncio.sleep(1.0)
        proxy.drop()  # worker A loses Redis just before the question times out
        proxy.cut()
        await asyncio.sleep(1.5)  # past the timeout: only Redis can say what came first
        assert not any(e.event == "input_timeout" for e in events) and got == []
        proxy.forward()  # and has it back
        accepted = await b.answer("s", request, "late")
        await asyncio.wait_for(collect(subscription), 10)
        # Taken by the agent, or refused: never accepted and lost.
        assert got == (["late"] if accepted else ["timed out"]), (accepted, got)
    finally:
        await a.shutdown(2)
        await b.shutdown(2)
        proxy.close()


# -- an agent that asks twice at once, or from another task --------------------------


async def _two_at_once(ctx: Any, outcomes: list[Any]) -> AsyncIterator[str]:
    yield "asking "
    outcomes.extend(
        await asyncio.gather(
            ctx.ask({"q": 1}, timeout=3), ctx.ask({"q": 2}, timeout=3), return_exceptions=True
        )
    )
    yield "end"


@db
async def test_two_questions_asked_at_once_on_redis_are_both_refused(redis_service):
    """(Fixed.) Two concurrent ``ctx.ask`` (``asyncio.gather`` runs each in a
    task of its own): on Redis both were logged as pending ``input_required``
    and the first could never be answered, since the run's hash held only
    the second's id. A question is now asked from the run's own task only,
    one at a time: both are refused (RuntimeError) and nothing is logged."""
    outcomes: list[Any] = []

    async def agent(ctx: Any) -> AsyncIterator[str]:
        async for item in _two_at_once(ctx, outcomes):
            yield item

    key = new_key()
    await runs.start(key, prompt="go", agent=agent)
    row = await ended(key)
    assert (row.status, row.output) == ("done", "asking end")
    assert [type(outcome) for outcome in outcomes] == [RuntimeError, RuntimeError]
    events = await collect(await runs.subscribe(key))
    assert not any(e.event == "input_required" for e in events)


@db
async def test_a_refused_question_leaves_the_row_as_it_was(memory_service):
    """(Fixed.) A question refused without being asked (here: a second one,
    from a task the agent started, while the first waits) marked the row
    ``running`` again in `Recorder._ask`'s ``finally``, so a run waiting for
    its own question showed ``running`` in its row, the sessions list and
    the admin. Now a refusal leaves the row alone."""

    async def agent(ctx: Any) -> AsyncIterator[str]:
        yield "asking "
        refused: list[bool] = []

        async def meanwhile() -> None:  # a second question while the first waits
            await asyncio.sleep(0.2)
            try:
                await ctx.ask({"q": 0}, timeout=5)
            except RuntimeError:
                refused.append(True)

        other = asyncio.ensure_future(meanwhile())
        answer = await ctx.ask({"q": 1}, timeout=5)
        await other
        yield "refused " if refused else "asked twice "
        yield f"answer:{json.dumps(answer)} "

    key = new_key()
    await runs.start(key, prompt="go", agent=agent, owner="user:1")
    request = (await waiting(key))["request"]
    await asyncio.sleep(0.5)  # the row's marks are written on the database thread
    status = await runs.status(key)
    assert status is not None and status.status == "waiting"
    row = await Run.objects.aget(session_key=key)
    page = await runs.sessions(owner="user:1")
    try:
        assert (row.status, page.sessions[0].status) == ("waiting", "waiting")
    finally:
        await runs.answer(key, {"request": request, "value": "yes"})
    assert (await ended(key)).output == 'asking refused answer:"yes" '


@db
async def test_a_question_asked_from_a_task_of_the_agent_does_not_outlive_the_run():
    """An agent that asks from a task of its own (a tool run concurrently)
    and ends without waiting for it: the run ends ``done``, but the question
    lives on in a task nobody owns until its timeout (an hour by default),
    and then an ``input_timeout`` is logged after the run's ``done``: a
    client replaying the log gets an event past the terminal one. (While
    such a question waits, ``RUN_TIMEOUT`` is paused too, for an agent that
    goes on working.)

    Why: `RunDriver.ask` checks the run's phase but not that it is called
    from the run's task (its error message says "from its task"), and the
    run's end neither cancels nor resolves ``run.pending``."""
    outcome: list[str] = []
    tools: list[asyncio.Future[None]] = []

    async def agent(ctx: Any) -> AsyncIterator[str]:
        async def tool() -> None:
            try:
                await ctx.ask(QUESTION, timeout=0.6)
            except BaseException as exc:  # noqa: BLE001 - recorded, not raised
                outcome.append(type(exc).__name__)

        yield "asking "
        tools.append(asyncio.ensure_future(tool()))
        await asyncio.sleep(0.2)
        yield "done without waiting"

    key = new_key()
    await runs.start(key, prompt="go", agent=agent)
    assert (await ended(key)).status == "done"
    await asyncio.sleep(1.0)
    kinds = [e.event for e in await collect(await runs.subscribe(key)) if e.event != "delta"]
    assert kinds[-1] == "done", kinds
    assert outcome != ["InputTimeout"], "the question outlived its run"


# -- the HTTP view --------------------------------------------------------------------


async def _asks(ctx: Any) -> AsyncIterator[str]:
    yield "asking "
    yield f"answer:{await ctx.ask(QUESTION, timeout=10)}"


@db
async def test_an_answer_sent_as_multipart_is_a_400_not_a_500():
    """``POST <key>/input/`` with the JSON body but a ``multipart/form-data``
    content type (a form, a misconfigured client) answers ``500 Internal
    error`` and logs a traceback; docs/input.md says a malformed body is a
    400, and the views promise JSON with a status that says whose fault it
    is. (``text/plain`` and form-urlencoded are parsed as JSON, as the
    view's docstring says.)

    Why: the view's CSRF check (`_CsrfCheck.process_view`, Django's) reads
    ``request.POST`` on a POST, which consumes a multipart stream; then
    `views.answer` reads ``request.body``: `RawPostDataException`, which
    `error_status` maps to 500."""
    alice = await get_user_model().objects.acreate(username=f"alice-{uuid.uuid4().hex[:6]}")
    client = AsyncClient(enforce_csrf_checks=True)
    await client.aforce_login(alice)
    key = new_key()
    await runs.start(key, prompt="go", agent=_asks, owner=alice)
    request = (await waiting(key))["request"]
    client.cookies["csrftoken"] = "a" * 32
    reply = await client.post(
        f"/runs/{key}/input/",
        json.dumps({"request": request, "value": "yes"}),
        content_type="multipart/form-data; boundary=xyz",
        headers={"X-CSRFToken": "a" * 32},
    )
    await runs.stop(key)
    assert reply.status_code in (200, 400), (reply.status_code, reply.content)


# -- the demo page in Chromium --------------------------------------------------------

try:
    from .test_browser import (  # noqa: F401 - fixtures
        PROMPT,
        Chat,
        canned,
        chromium,
        context,
        demo,
        expect,
        playwright,
        question,
        transport,
    )

    BROWSER = True
except pytest.skip.Exception:  # no Playwright or Chromium: test_browser.py skips itself
    BROWSER = False


@pytest.mark.e2e
@pytest.mark.skipif(not BROWSER, reason="needs Playwright and Chromium (see test_browser.py)")
def test_sending_a_new_prompt_while_the_question_waits_removes_the_question(context: Any) -> None:
    """The demo chat: the agent asks ("approve" in the prompt), and the user
    sends another prompt instead of answering. The first run is stopped
    (``interrupt``) and its turn marked ``stopped``, but its question stays
    on the page, its buttons live, until a reload; clicking one posts an
    answer that gets 409, which the page ignores: the buttons just go grey.

    Why: `send()` in demo_project/templates/demo_project/chat.html lets go
    of the old run (`detach`, no more callbacks, so no ``onInputDone``) and
    `refreshTurn` shows its saved end without removing ``entry.question``."""
    chat = Chat.open(context)
    chat.send(PROMPT)
    expect(question(chat)).to_have_count(1)
    chat.send("Second")
    chat.wait_answer(canned("Second", turns=1))
    expect(chat.page.locator(".turn").first.locator(".badge.stopped")).to_have_text("stopped")
    expect(question(chat)).to_have_count(0)


def test_a_timeout_too_large_for_a_float_is_a_value_error_not_an_overflow():
    """One more of the kind "bad input gets a clear error": an int timeout
    past a float's range made `is_seconds` raise OverflowError."""
    from detached_runs.backends.base import is_seconds

    assert is_seconds(2**1100) is False
    assert is_seconds(1) and not is_seconds(float("nan")) and not is_seconds(True)

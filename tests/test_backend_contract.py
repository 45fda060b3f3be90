"""The contract every backend keeps (DESIGN.md, "Behaviour every backend must
keep"), held to each backend in turn: the ``backend`` fixture is the memory
backend, then the Redis backend on the machine's Redis. No Django models, no
HTTP."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import pytest

from detached_runs.backends.base import BaseBackend
from detached_runs.backends.log import WAKE_AT_ONCE_UP_TO
from detached_runs.events import Position, parse_id
from detached_runs.exceptions import (
    BackendUnavailable,
    BadEventId,
    RunNotFound,
    TooManySubscribers,
)

from .conftest import Saves, collect, new_id, paced, terminals, text_of

WORDS = [f"w{i} " for i in range(50)]
FULL = "".join(WORDS)


async def start(
    backend: BaseBackend, source: AsyncIterator[Any], saves: Saves, session: str = "s"
) -> str:
    run_id = new_id()
    await backend.start(
        session, run_id, source, start_data={"run": run_id}, meta={"owner": "o"}, finalize=saves
    )
    return run_id


async def wait_finished(backend: BaseBackend, session: str = "s") -> None:
    for _ in range(2000):
        state = await backend.get(session)
        if state is not None and state.status != "running":
            return
        await asyncio.sleep(0.005)
    raise AssertionError("run did not finish")


class Gate:
    """An agent that yields a word, then waits on an event, and records its clean-up."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.closed = False
        self.cancelled = False

    async def agent(self, words: list[str] = ["first "]) -> AsyncIterator[Any]:  # noqa: B006
        try:
            for word in words:
                yield word
            await self.go.wait()
            yield "after "
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        finally:
            self.closed = True


@pytest.fixture
async def released() -> AsyncIterator[asyncio.Event]:
    """Lets the agents below go at the test's end, on the test's loop: the
    loop's own teardown waits for every task, an abandoned one too."""
    event = asyncio.Event()
    yield event
    event.set()
    await asyncio.sleep(0.05)


def swallowing(words: list[str], released: asyncio.Event) -> AsyncIterator[str]:
    """An agent that yields ``words``, then swallows every cancellation and
    never yields again (until the test lets it go)."""

    async def agent() -> AsyncIterator[str]:
        for word in words:
            yield word
        while not released.is_set():
            try:
                await released.wait()
            except asyncio.CancelledError:
                pass

    return agent()


async def lingering(released: asyncio.Event) -> AsyncIterator[str]:
    """An agent whose clean-up, once stopped, lasts until the test lets it go."""
    try:
        yield "first "
        await asyncio.sleep(3600)
    finally:
        await released.wait()


async def test_run_goes_on_when_its_only_subscriber_leaves(backend, saves):
    await start(backend, paced(WORDS, 0.002), saves)
    subscription = await backend.subscribe("s")
    await subscription.next_batch()
    await subscription.aclose()
    await wait_finished(backend)
    assert saves.ends[0].status == "done"
    assert saves.ends[0].output == FULL


@pytest.mark.parametrize("join_after", [0, 0.005, 0.02, 0.05, 0.2])
async def test_subscriber_joining_at_any_time_gets_every_event_once_in_order(
    backend, saves, join_after
):
    await start(backend, paced(WORDS, 0.001), saves)
    await asyncio.sleep(join_after)
    events = await collect(await backend.subscribe("s"))
    assert events[0].event == "start"
    assert text_of(events) == FULL
    assert len(terminals(events)) == 1 and events[-1].event == "done"
    positions = [parse_id(e.id)[1] for e in events]
    assert positions == sorted(set(positions))


async def test_many_subscribers_resuming_from_every_id_each_get_exactly_the_rest(backend, saves):
    await start(backend, paced([*WORDS, ("tool", {"n": 1}), *WORDS], 0.0005), saves)
    # Held open while the others come and go: the ended run stays (its grace
    # period, 0.2 s from its end, may pass on a loaded machine meanwhile).
    keeper = await backend.subscribe("s")
    first = await collect(await backend.subscribe("s"))
    whole = text_of(first)
    assert whole == FULL + FULL
    seen = ""
    for index, event in enumerate(first[:-1]):
        if event.event == "delta":
            seen += event.data["text"]
        rest = await collect(await backend.subscribe("s", parse_id(event.id)))
        assert seen + text_of(rest) == whole, index
        assert rest[-1].event == "done" and len(terminals(rest)) == 1
        assert all(parse_id(e.id)[1] > parse_id(event.id)[1] for e in rest)
    keeper.close()


async def test_resume_point_after_terminal_event_means_ended(backend, saves):
    await start(backend, paced(WORDS), saves)
    events = await collect(await backend.subscribe("s"))
    subscription = await backend.subscribe("s", parse_id(events[-1].id))
    assert subscription.ended
    assert await collect(subscription) == []


async def test_id_of_an_older_run_replays_the_current_run_from_its_start(backend, saves):
    await start(backend, paced(WORDS), saves)
    old = await collect(await backend.subscribe("s"))
    await start(backend, paced(["new "]), saves)
    events = await collect(await backend.subscribe("s", parse_id(old[-1].id)))
    assert events[0].event == "start"
    assert text_of(events) == "new "


async def test_malformed_or_future_ids_are_rejected(backend, saves):
    run_id = await start(backend, paced(WORDS), saves)
    await wait_finished(backend)
    with pytest.raises(BadEventId):
        parse_id("not-an-id")
    with pytest.raises(BadEventId):
        await backend.subscribe("s", (run_id, Position(10_000, 1)))
    with pytest.raises(BadEventId):  # inside a multi-byte character
        await start(backend, paced(["é" * 4]), saves)
        await wait_finished(backend)
        state = await backend.get("s")
        assert state is not None
        await backend.subscribe("s", (state.run_id, Position(1, 1)))


async def test_replay_of_a_finished_4000_token_run_is_a_handful_of_events(backend, saves):
    words = [f"t{i} " for i in range(4000)]
    await start(backend, paced(words, 0), saves)
    await wait_finished(backend)
    events = await collect(await backend.subscribe("s"))
    assert [e.event for e in events] == ["start", "delta", "done"]
    assert text_of(events) == "".join(words)


async def test_a_lagging_subscriber_gets_what_piled_up_as_one_batch(backend, saves):
    gate = Gate()
    await start(backend, gate.agent([f"x{i} " for i in range(100)]), saves)
    subscription = await backend.subscribe("s")
    await asyncio.sleep(0.01)  # 100 words arrive while the subscriber is busy elsewhere
    batch = await subscription.next_batch()
    assert [e.event for e in batch] == ["start", "delta"]
    assert batch[1].data["text"] == "".join(f"x{i} " for i in range(100))
    gate.go.set()
    rest = await collect(subscription)
    assert text_of(rest) == "after "


async def test_a_cancelled_waiting_subscriber_does_not_disturb_the_others(backend, saves):
    gate = Gate()
    await start(backend, gate.agent(), saves)
    await asyncio.sleep(0.01)
    one, two = await backend.subscribe("s"), await backend.subscribe("s")
    await one.next_batch(), await two.next_batch()
    waiting = asyncio.create_task(one.next_batch())
    other = asyncio.create_task(two.next_batch())
    await asyncio.sleep(0.01)
    waiting.cancel()
    gate.go.set()
    assert text_of(await other) == "after "
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_next_batch_returns_empty_after_the_keepalive_timeout(backend, saves):
    gate = Gate()
    await start(backend, gate.agent(), saves)
    await asyncio.sleep(0.01)
    subscription = await backend.subscribe("s")
    await subscription.next_batch()
    assert await subscription.next_batch(timeout=0.02) == []
    gate.go.set()
    assert text_of(await subscription.next_batch(timeout=1)) == "after "


async def test_keepalive_counts_from_the_last_batch_not_from_each_wait(backend, saves):
    """Tokens more often than the keep-alive interval: no keep-alive at all;
    then silence: one keep-alive, an interval after the last token."""

    async def then_silence() -> AsyncIterator[str]:
        async for word in paced([f"w{i} " for i in range(20)], 0.01):
            yield word
        await asyncio.sleep(3600)

    await start(backend, then_silence(), saves)
    subscription = await backend.subscribe("s")
    loop = asyncio.get_running_loop()
    batches, last_text = [], loop.time()
    while True:
        batch = await subscription.next_batch(timeout=0.15)
        if batch == []:
            break
        batches.append(batch)
        last_text = loop.time()
    assert text_of([e for b in batches for e in b]) == "".join(f"w{i} " for i in range(20))
    assert loop.time() - last_text >= 0.15
    await backend.stop("s")


async def test_subscribe_without_a_run_raises_at_once(backend):
    with pytest.raises(RunNotFound):
        await backend.subscribe("nobody")


async def test_subscribe_binds_to_the_run_current_when_called(backend, saves):
    gate = Gate()
    first = await start(backend, gate.agent(), saves)
    subscription = await backend.subscribe("s")
    second = await start(backend, paced(["second "]), saves)
    events = await collect(subscription)
    assert {parse_id(e.id)[0] for e in events} == {first}
    assert events[-1].data == {"status": "stopped"}
    assert text_of(await collect(await backend.subscribe("s"))) == "second "
    assert second != first


async def test_subscribers_over_the_limit_get_a_named_error(backend):
    backend.evict_after = 1
    backend.max_subscribers = 2
    await start(backend, Gate().agent(), Saves())
    await backend.subscribe("s"), await backend.subscribe("s")
    with pytest.raises(TooManySubscribers):
        await backend.subscribe("s")


async def test_stop_cancels_the_agent_runs_its_cleanup_and_saves_the_partial_text(backend, saves):
    gate = Gate()
    await start(backend, gate.agent(), saves)
    await asyncio.sleep(0.01)
    subscription = await backend.subscribe("s")
    await subscription.next_batch()
    assert await backend.stop("s") is True
    events = await collect(subscription)
    assert gate.cancelled and gate.closed
    assert saves.ends[0].status == "stopped" and saves.ends[0].output == "first "
    assert [e.data for e in terminals(events)] == [{"status": "stopped"}]


async def test_three_quick_starts_save_one_after_another_in_order(backend):
    backend.evict_after = 1
    slow = Saves(delay=0.05)
    ids = []
    for _ in range(3):
        ids.append(await start(backend, paced(WORDS, 0.002), slow))
    await wait_finished(backend)
    assert slow.overlaps == 0
    assert slow.log == [f"{step} {run}" for run in ids for step in ("begin", "end")]
    assert [slow.status_of(run) for run in ids] == ["stopped", "stopped", "done"]


async def test_a_second_stop_does_not_interrupt_the_first_stops_save(backend):
    backend.evict_after = 1
    slow = Saves(delay=0.1)
    gate = Gate()
    run_id = await start(backend, gate.agent(), slow)
    await asyncio.sleep(0.01)
    assert await backend.stop("s") is True
    await asyncio.sleep(0.02)  # the save is under way
    assert await backend.stop("s") is False
    await wait_finished(backend)
    assert slow.log == [f"begin {run_id}", f"end {run_id}"]
    assert slow.ends[0].output == "first " and slow.ends[0].status == "stopped"


async def test_stop_then_send_waits_for_the_stopped_runs_save(backend):
    backend.evict_after = 1
    slow = Saves(delay=0.1)
    first = await start(backend, Gate().agent(), slow)
    await asyncio.sleep(0.01)
    await backend.stop("s")
    await asyncio.sleep(0.02)
    second = await start(backend, paced(["again "]), slow)
    await wait_finished(backend)
    assert slow.log == [f"begin {first}", f"end {first}", f"begin {second}", f"end {second}"]
    assert slow.status_of(first) == "stopped" and slow.status_of(second) == "done"


async def test_stop_after_the_run_finished_does_nothing(backend, saves):
    await start(backend, paced(["a "]), saves)
    await wait_finished(backend)
    assert await backend.stop("s") is False
    assert await backend.stop("unknown") is False
    assert [e.status for e in saves.ends] == ["done"]


async def test_stopped_run_ends_stopped_once_even_if_the_agent_raises_after_its_last_token(
    backend, saves
):
    async def agent() -> AsyncIterator[str]:
        yield "last "
        try:
            await asyncio.sleep(10)
        finally:
            raise RuntimeError("boom in clean-up")

    await start(backend, agent(), saves)
    await asyncio.sleep(0.01)
    subscription = await backend.subscribe("s")
    await subscription.next_batch()
    await backend.stop("s")
    events = await collect(subscription)
    assert [e.data for e in terminals(events)] == [{"status": "stopped"}]
    assert saves.ends[0].status == "stopped" and saves.ends[0].output == "last "


async def test_agent_that_swallows_the_cancellation_still_ends_stopped(backend, saves):
    async def stubborn() -> AsyncIterator[str]:
        yield "a "
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            pass  # rude, but it happens
        yield "b "
        yield "c "

    await start(backend, stubborn(), saves)
    await asyncio.sleep(0.01)
    await backend.stop("s")
    events = await collect(await backend.subscribe("s"))
    assert events[-1].data == {"status": "stopped"}
    assert saves.ends[0].status == "stopped"
    assert not saves.ends[0].output.endswith("c ")


@pytest.mark.parametrize(
    "exc", [KeyboardInterrupt, SystemExit, GeneratorExit, type("Custom", (BaseException,), {})]
)
async def test_agent_raising_a_base_exception_ends_as_error(backend, saves, exc):
    async def agent() -> AsyncIterator[str]:
        yield "x "
        raise exc()

    await start(backend, agent(), saves)
    events = await collect(await backend.subscribe("s"))
    assert events[-1].data == {"status": "error", "error": "The agent failed."}
    assert saves.ends[0].status == "error" and saves.ends[0].output == "x "


async def test_agent_error_message_is_safe_and_never_a_traceback(backend, saves):
    async def agent() -> AsyncIterator[str]:
        yield "x "
        raise ValueError("secret internal detail")

    await start(backend, agent(), saves)
    events = await collect(await backend.subscribe("s"))
    assert events[-1].data == {"status": "error", "error": "The agent failed."}


async def test_unserialisable_event_data_ends_the_run_as_error(backend, saves):
    await start(backend, paced(["a ", ("tool", {"x": object()})]), saves)
    events = await collect(await backend.subscribe("s"))
    assert events[-1].data["status"] == "error"
    assert text_of(events) == "a "


async def test_count_running_counts_only_runs_in_flight_of_that_owner(backend, saves):
    await start(backend, Gate().agent(), saves, session="a")
    await start(backend, Gate().agent(), saves, session="b")
    await start(backend, paced([]), saves, session="c")
    await collect(await backend.subscribe("c"))
    # The end takes it out of the count soon after its terminal event (a
    # loaded machine takes a while); the two in flight stay counted.
    deadline = asyncio.get_running_loop().time() + 5
    while (counted := await backend.count_running("o")) != 2:
        assert counted == 3 and asyncio.get_running_loop().time() < deadline, counted
        await asyncio.sleep(0.01)
    assert await backend.count_running("someone else") == 0
    await backend.shutdown(1)
    assert await backend.count_running("o") == 0


async def test_a_burst_reaches_many_waiting_subscribers_in_a_few_batches_not_one_per_turn(
    backend, saves
):
    gate = asyncio.Event()

    async def burst() -> AsyncIterator[str]:
        await gate.wait()
        for index in range(2000):
            if index % 20 == 0:
                await asyncio.sleep(0)  # a turn of the loop, as an agent reading a socket
            yield f"t{index} "

    await start(backend, burst(), saves)
    many = WAKE_AT_ONCE_UP_TO + 2
    subscriptions = [await backend.subscribe("s") for _ in range(many)]
    for subscription in subscriptions:
        assert [e.event for e in await subscription.next_batch()] == ["start"]

    async def read(subscription: Any) -> list[list[Any]]:
        batches = []
        while not subscription.ended:
            batches.append(await subscription.next_batch())
        return batches

    readers = [asyncio.ensure_future(read(s)) for s in subscriptions]
    await asyncio.sleep(0)  # every reader waits
    gate.set()
    for batches in await asyncio.gather(*readers):
        text = "".join(e.data["text"] for batch in batches for e in batch if e.event == "delta")
        assert text == "".join(f"t{i} " for i in range(2000))
        # One per turn would be 100; a few, or a few more on a loaded machine
        # (whose turns outlast COALESCE_FOR), is not.
        assert len(batches) <= 20


async def test_a_few_subscribers_get_a_paced_token_on_the_very_next_turn(backend, saves):
    """A chat's one or two subscribers are woken at the append itself, not a
    turn later (on a busy loop, every turn adds to the token's latency)."""
    go = asyncio.Event()
    woken_after_one_turn: list[bool] = []
    waiting: list[asyncio.Future[Any]] = []

    async def agent() -> AsyncIterator[str]:
        yield "first "
        await go.wait()
        yield "after "
        await asyncio.sleep(0)  # one turn of the loop
        woken_after_one_turn.append(all(w.done() for w in waiting))

    await start(backend, agent(), saves)
    subscriptions = [await backend.subscribe("s") for _ in range(2)]
    for subscription in subscriptions:
        while not any(e.event == "delta" for e in await subscription.next_batch()):
            pass  # start, then "first "
    waiting.extend(asyncio.ensure_future(s.next_batch()) for s in subscriptions)
    await asyncio.sleep(0)  # both wait
    go.set()
    await wait_finished(backend)
    assert woken_after_one_turn == [True]
    for future in waiting:
        assert next(e.data.get("text") for e in await future) == "after "


async def test_a_paced_token_wakes_its_subscriber_on_the_next_turn(backend, saves):
    gate = Gate()
    await start(backend, gate.agent(), saves)
    subscription = await backend.subscribe("s")
    while not any(e.event == "delta" for e in await subscription.next_batch()):
        pass  # start, then "first "
    waiting = asyncio.ensure_future(subscription.next_batch())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    gate.go.set()
    for _ in range(5):  # a few turns of the loop, no lingering for a pause
        await asyncio.sleep(0)
    assert waiting.done()
    assert next(e.data.get("text") for e in await waiting) == "after "
    await wait_finished(backend)


@pytest.mark.parametrize("agent", [swallowing, lingering], ids=["swallows", "lingers"])
async def test_a_stop_ends_the_run_within_the_grace_whatever_the_agent_does(
    backend, saves, monkeypatch, agent, released
):
    """The run ends (terminal event, save) STOP_GRACE after its stop, and the
    session's next run begins: an agent that will not let go is abandoned,
    not awaited forever. It used to leave the session stuck."""
    monkeypatch.setattr("detached_runs.backends.driver.STOP_GRACE", 0.2)
    source = swallowing(["first "], released) if agent is swallowing else lingering(released)
    first = await start(backend, source, saves)
    subscription = await backend.subscribe("s")
    while "first " not in text_of(seen := await subscription.next_batch()):
        pass
    assert await backend.stop("s")
    events = await asyncio.wait_for(collect(subscription), 2)
    assert text_of(seen + events) == "first " and events[-1].data == {"status": "stopped"}
    assert saves.status_of(first) == "stopped"
    second = await start(backend, paced(["next "]), saves)
    assert text_of(await asyncio.wait_for(collect(await backend.subscribe("s")), 2)) == "next "
    assert saves.status_of(second) == "done"
    await asyncio.wait_for(backend.shutdown(5), 1)  # the abandoned task is not awaited


async def test_a_run_timeout_ends_an_agent_that_will_not_let_go(
    backend, saves, monkeypatch, released
):
    monkeypatch.setattr("detached_runs.backends.driver.STOP_GRACE", 0.2)
    run_id = new_id()
    await backend.start(
        "s",
        run_id,
        swallowing(["first "], released),
        start_data={},
        meta={},
        finalize=saves,
        timeout=0.2,
    )
    events = await asyncio.wait_for(collect(await backend.subscribe("s")), 2)
    assert events[-1].data == {"status": "error", "error": "The run took too long."}
    await backend.shutdown(1)


async def test_a_second_stop_during_the_agents_clean_up_lets_it_finish(backend, saves, released):
    """A double click on Stop while the agent cleans up (its finally): the
    second stop does nothing and says so; it used to cancel the clean-up."""
    cleaned: list[str] = []

    async def tidy() -> AsyncIterator[str]:
        try:
            yield "first "
            await asyncio.sleep(3600)
        finally:
            await released.wait()
            cleaned.append("done")

    await start(backend, tidy(), saves)
    await asyncio.sleep(0.05)  # in the agent, after its first word
    subscription = await backend.subscribe("s")
    assert text_of(await subscription.next_batch()) == "first "
    assert await backend.stop("s") is True
    await asyncio.sleep(0.05)  # in its clean-up now
    assert await backend.stop("s") is False
    released.set()
    events = await collect(subscription)
    assert events[-1].data == {"status": "stopped"} and cleaned == ["done"]


async def test_the_next_run_waits_for_the_previous_runs_end_to_be_saved_after_all(
    backend, monkeypatch
):
    """The first run's end was refused (``"saved": false``) and is retried
    with back-off (here a minute); the session's next run asks for another
    attempt at once and its agent begins only once that end is saved, so
    the saves keep their order and the agent's history has that answer."""
    monkeypatch.setattr("detached_runs.backends.driver.SAVE_AGAIN_DELAYS", (60.0,))
    order: list[str] = []
    refusing = True

    async def finalize(end: Any) -> bool:
        if refusing:
            return False
        order.append(f"saved {end.output.strip()}")
        return True

    async def agent(name: str) -> AsyncIterator[str]:
        order.append(f"{name} begins")
        yield f"{name} "

    await backend.start("s", new_id(), agent("one"), start_data={}, meta={}, finalize=finalize)
    events = await collect(await backend.subscribe("s"))
    assert events[-1].data == {"status": "done", "saved": False}
    refusing = False  # the database is back; the next attempt is a minute away
    await backend.start("s", new_id(), agent("two"), start_data={}, meta={}, finalize=finalize)
    await asyncio.wait_for(collect(await backend.subscribe("s")), 5)
    assert order == ["one begins", "saved one", "two begins", "saved two"]


async def test_a_position_that_is_not_on_this_log_is_an_unknown_id(backend, saves):
    """``(2, 2)`` claims two events before the third byte, where this log had
    one: a position of another log of the run (a worker cut off from Redis and
    the worker that reaped its run each ended it). It used to be read as a
    point in this log, and the whole text was sent again."""
    run_id = await start(backend, paced(["abc", "def"]), saves)
    await collect(await backend.subscribe("s"))
    for bad in (Position(2, 2), Position(3, 3), Position(0, 2)):
        with pytest.raises(BadEventId):
            await backend.subscribe("s", (run_id, bad))
    for good in (Position(0, 0), Position(0, 1), Position(2, 1), Position(6, 1), Position(6, 2)):
        await backend.subscribe("s", (run_id, good))


async def test_a_shutdown_refuses_new_runs_from_its_first_step(backend, saves):
    """Once ``shutdown()`` has begun, ``check_accepting`` refuses at once. The
    Redis backend's shutdown began its driver's a loop turn later, so a start
    in that turn wrote its row and its keys before it was refused."""
    await start(backend, paced(["a "]), saves)
    assert len(backend) == 1  # both count the runs they drive
    shutting = asyncio.ensure_future(backend.shutdown(1))
    await asyncio.sleep(0)  # shutdown() has begun
    try:
        with pytest.raises(BackendUnavailable):
            backend.check_accepting()
    finally:
        await shutting


# -- deleting a session's runs ----------------------------------------------------------


async def held(backend: BaseBackend, session: str = "s") -> list[str]:
    """What the backend holds of the session: the memory backend's registry
    entry; every Redis key of the session, and its entries in the shared sets
    of runs in flight and of unsaved ends."""
    found = [] if await backend.get(session) is None else [f"current run of {session}"]
    redis = getattr(backend, "redis", None)
    if redis is None:
        return found + ([f"registry entry of {session}"] if session in backend.driver.runs else [])  # type: ignore[attr-defined]
    prefix = backend.prefix  # type: ignore[attr-defined]
    found += [key.decode() async for key in redis.scan_iter(match=f"{{{prefix}:{session}}}*")]
    for shared in (f"{prefix}:in-flight", f"{prefix}:unsaved"):
        members = await redis.zrange(shared, 0, -1)
        found += [f"{shared} {m.decode()}" for m in members if m.startswith(f"{session} ".encode())]
    return found


async def test_delete_stops_the_run_in_flight_waits_for_its_save_and_leaves_nothing(backend):
    saves = Saves(delay=0.2)  # a slow save: delete returns after it, not before
    run_id = await start(backend, paced(WORDS * 100, 0.01), saves)
    subscription = await backend.subscribe("s")
    await subscription.next_batch()
    await backend.delete("s", {run_id})
    assert [end.status for end in saves.ends] == ["stopped"]
    events = await asyncio.wait_for(collect(subscription), 5)
    assert terminals(events)[-1].data == {"status": "stopped"}
    assert await held(backend) == []
    with pytest.raises(RunNotFound):
        await backend.subscribe("s")
    assert [t for t in asyncio.all_tasks() if run_id in t.get_name()] == []
    await asyncio.sleep(0.3)  # nothing of it is written again (a writer, a lease)
    assert await held(backend) == []


async def test_delete_of_ended_runs_forgets_them_and_their_logs(backend, saves):
    first = await start(backend, paced(["a "]), saves)
    await collect(await backend.subscribe("s"))
    second = await start(backend, paced(["b "]), saves)
    await collect(await backend.subscribe("s"))
    assert await held(backend) != []
    await backend.delete("s", {first, second, new_id()})  # an id it never held is no matter
    assert await held(backend) == []
    assert [end.status for end in saves.ends] == ["done", "done"]


async def test_delete_leaves_a_run_it_was_not_given_alone(backend, saves):
    """A run of the session that is not among the runs to delete (another
    worker started it meanwhile) goes on."""
    old = await start(backend, paced(["a "]), saves)
    await collect(await backend.subscribe("s"))
    new = await start(backend, paced(WORDS, 0.01), saves)
    await backend.delete("s", {old})
    state = await backend.get("s")
    assert state is not None and state.run_id == new and state.status == "running"
    events = await collect(await backend.subscribe("s"))
    assert text_of(events) == FULL and events[-1].data == {"status": "done"}
    assert [end.run_id for end in saves.ends] == [old, new]


async def test_delete_of_another_sessions_runs_changes_nothing_here(backend, saves):
    run_id = await start(backend, paced(WORDS, 0.01), saves, session="other")
    await backend.delete("s", {run_id})
    events = await collect(await backend.subscribe("other"))
    assert text_of(events) == FULL and events[-1].data == {"status": "done"}


async def test_delete_gives_up_on_a_run_that_does_not_end_in_time_and_deletes_nothing(
    backend, saves, released
):
    run_id = await start(backend, swallowing(["first "], released), saves)
    subscription = await backend.subscribe("s")
    while "first " not in text_of(await subscription.next_batch()):
        pass
    with pytest.raises(BackendUnavailable, match="did not stop in time"):
        await backend.delete("s", {run_id}, timeout=0.3)
    state = await backend.get("s")
    assert state is not None and state.run_id == run_id
    await subscription.aclose()


# -- usage ---------------------------------------------------------------------------


class Reporting:
    """A source with ``remaining()``: what it holds back until it is closed
    (as the service's source holds an agent's usage reported while stopped)."""

    def __init__(self, items: list[Any]) -> None:
        self.items = paced(items, 0.002)
        self.closed = False

    def __aiter__(self) -> Reporting:
        return self

    async def __anext__(self) -> Any:
        item = await anext(self.items)
        if item == "wait":
            await asyncio.sleep(3600)
        return item

    async def aclose(self) -> None:
        self.closed = True
        await self.items.aclose()  # type: ignore[attr-defined]

    def remaining(self) -> list[Any]:
        assert self.closed, "remaining() before the source was closed"
        return [("usage", {"output_tokens": 2, "estimated": True})]


async def test_the_state_and_the_end_carry_the_merge_of_the_usage_events(backend, saves):
    items = [
        ("usage", {"input_tokens": 4, "model": "a"}),
        "w ",
        ("usage", {"output_tokens": 1, "model": "b"}),
    ]
    run_id = await start(backend, paced(items), saves)
    events = await collect(await backend.subscribe("s"))
    assert [e.data for e in events if e.event == "usage"] == [item[1] for item in items[::2]]
    state = await backend.get("s")
    assert state is not None and state.run_id == run_id
    assert state.usage == {"input_tokens": 4, "output_tokens": 1, "model": "b"}
    (end,) = saves.ends
    assert end.usage == state.usage


async def test_what_a_stopped_source_has_left_is_logged_before_the_terminal_event(backend, saves):
    source = Reporting([("usage", {"input_tokens": 3}), "w ", "wait"])
    await start(backend, source, saves)
    subscription = await backend.subscribe("s")
    seen: list[Any] = []
    while not text_of(seen):
        seen += await subscription.next_batch()
    assert await backend.stop("s") is True
    events = seen + await collect(subscription)
    assert [e.event for e in events][-2:] == ["usage", "done"]
    assert events[-2].data == {"output_tokens": 2, "estimated": True}
    assert events[-1].data == {"status": "stopped"}
    (end,) = saves.ends
    assert end.usage == {"input_tokens": 3, "output_tokens": 2, "estimated": True}


#: A long answer's piece: one to four UTF-8 bytes a character (49,152 bytes).
PIECE = "añ€😀 " * 4096


async def long_answer(mib: int) -> AsyncIterator[str]:
    for _ in range(mib * 1024 * 1024 // len(PIECE.encode())):
        await asyncio.sleep(0)
        yield PIECE


async def traced_peak(work: Any) -> tuple[Any, int]:
    """``await work()``'s result, and how many bytes Python allocated at the
    most while it ran, beyond what was allocated before (`tracemalloc`)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = await work()
        return result, tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("ask", ["get", "find"])
async def test_states_of_a_long_answer_asked_at_once_do_not_each_copy_its_text(backend, saves, ask):
    """Each subscriber that opens a run asks for its state (status, owner)
    first; ten at once each held the answer decoded (UCS-4: up to 4 bytes a
    character), 10 x 8 MB for a 4 MiB answer. The text is made for a caller
    that reads it, not for the others."""
    backend.evict_after = 30.0  # the ended run stays in this process's memory
    run_id = await start(backend, long_answer(4), saves)
    await wait_finished(backend)

    async def ask_at_once() -> list[Any]:
        if ask == "get":
            return await asyncio.gather(*(backend.get("s") for _ in range(10)))
        return await asyncio.gather(*(backend.find("s", run_id) for _ in range(10)))

    states, peak = await traced_peak(ask_at_once)
    assert peak < 2**20, f"{peak / 2**20:.1f} MiB"
    assert {state.status for state in states} == {"done"}
    size = len(saves.ends[0].output.encode())
    text, made = await traced_peak(lambda: asyncio.sleep(0, states[0].output))
    assert text == saves.ends[0].output and size >= 4 * 2**20 - len(PIECE.encode())
    assert made >= size  # made when it was read, not before

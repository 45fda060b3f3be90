"""The Redis Streams backend against a real Redis (127.0.0.1:6379): two backend
instances in one process stand for two worker processes sharing Redis."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from detached_runs.events import Event, parse_id
from detached_runs.exceptions import BackendUnavailable, BadEventId, InputTimeout, RunNotFound
from detached_runs.workers import worker_id

from .conftest import (
    Saves,
    collect,
    delete_keys,
    eventually,
    new_id,
    paced,
    positions_follow,
    require_redis,
    terminals,
    text_of,
    two_workers,
)
from .test_backend_contract import long_answer, traced_peak

REDIS = ("127.0.0.1", 6379)


require_redis(module=True)

from detached_runs.backends.redis import RENEW_EVERY, RedisBackend  # noqa: E402

WORDS = [f"w{i} " for i in range(40)]
FULL = "".join(WORDS)


def worker_tasks(backend: RedisBackend) -> list[asyncio.Task[Any]]:
    """Every task of a worker's backend: cancelled, as when it dies (-9)."""
    return [*backend._tasks, *backend.driver._tasks, *backend._writers.values()]


@pytest.fixture
async def workers() -> AsyncIterator[tuple[RedisBackend, RedisBackend]]:
    async with two_workers() as pair:
        yield pair


async def start(
    backend: RedisBackend, source: Any, saves: Saves, session: str = "s", run_id: str = ""
) -> str:
    run_id = run_id or new_id()
    await backend.start(
        session, run_id, source, start_data={"run": run_id}, meta={"owner": "o"}, finalize=saves
    )
    return run_id


async def test_a_run_started_on_one_worker_streams_to_a_subscriber_on_another(workers, saves):
    a, b = workers
    await start(a, paced(WORDS, 0.002), saves)
    on_b = await collect(await b.subscribe("s"))
    on_a = await collect(await a.subscribe("s"))
    assert text_of(on_b) == FULL and on_b[-1].data == {"status": "done"}
    assert [e.id for e in terminals(on_b)] == [e.id for e in terminals(on_a)]
    positions = [parse_id(e.id)[1] for e in on_b]
    assert positions == sorted(set(positions))


async def test_a_subscriber_resumes_on_another_worker_with_the_first_workers_ids(workers, saves):
    a, b = workers
    await start(a, paced([*WORDS, ("tool", {"n": 1}), *WORDS], 0.001), saves)
    first = await collect(await a.subscribe("s"))
    seen = ""
    for event in first[:-1]:
        if event.event == "delta":
            seen += event.data["text"]
        rest = await collect(await b.subscribe("s", parse_id(event.id)))
        assert seen + text_of(rest) == FULL + FULL
        assert len(terminals(rest)) == 1


async def test_a_finished_run_replays_compactly_on_another_worker(workers, saves):
    a, b = workers
    words = [f"t{i} " for i in range(4000)]
    await start(a, paced(words, 0), saves)
    await collect(await a.subscribe("s"))
    events = await collect(await b.subscribe("s"))
    assert len(events) <= 10 and text_of(events) == "".join(words)


@pytest.mark.parametrize("ask", ["get", "find"])
async def test_another_workers_long_answer_asked_for_at_once_is_read_from_redis_once(
    workers, saves, ask
):
    """Ten subscribers that open another worker's run at once each ask for its
    state first; with no mirror of the run here, each read it whole from
    Redis: ten copies of a long answer at once. One read serves them all."""
    a, b = workers
    run_id = await start(a, long_answer(4), saves)
    await collect(await a.subscribe("s"))
    size = len(saves.ends[0].output.encode())

    async def copied() -> bool:  # its worker's writer has copied its end to Redis
        state = await b.find("s", run_id)
        return state is not None and state.status == "done"

    await eventually(copied, "the run's end in Redis")

    async def ask_at_once() -> list[Any]:
        if ask == "get":
            return await asyncio.gather(*(b.get("s") for _ in range(10)))
        return await asyncio.gather(*(b.find("s", run_id) for _ in range(10)))

    states, peak = await traced_peak(ask_at_once)
    # One read: the reply, the bytes parsed from it and the mirror (3.6 here);
    # it was 29 times the answer.
    assert peak < 6 * size, f"{peak / size:.1f} times the answer"
    assert {state.status for state in states} == {"done"}
    assert states[-1].output == saves.ends[0].output


async def test_stop_from_another_worker_stops_the_run_where_it_runs(workers, saves):
    a, b = workers

    async def forever() -> AsyncIterator[str]:
        yield "thinking "
        await asyncio.sleep(30)

    run_id = await start(a, forever(), saves)
    await asyncio.sleep(0.05)
    assert await b.stop("s") is True
    events = await collect(await b.subscribe("s"))
    assert events[-1].data == {"status": "stopped"}
    assert saves.status_of(run_id) == "stopped" and saves.ends[0].output == "thinking "


async def test_double_send_across_workers_saves_the_first_before_the_second_starts(workers):
    a, b = workers
    slow = Saves(delay=0.2)
    first = await start(a, paced(WORDS, 0.05), slow)
    await asyncio.sleep(0.1)
    second = await start(b, paced(["second "]), slow)
    events = await collect(await b.subscribe("s"))
    assert events[-1].data == {"status": "done"} and text_of(events) == "second "
    assert slow.log == [f"begin {first}", f"end {first}", f"begin {second}", f"end {second}"]
    assert slow.status_of(first) == "stopped"


async def test_a_finished_runs_keys_expire_after_the_grace_period(workers, saves):
    a, b = workers
    await start(a, paced(["a "]), saves)
    await collect(await a.subscribe("s"))
    # A's writer copies the end to Redis just after A's own subscribers get it.
    deadline = asyncio.get_running_loop().time() + 5
    while (state := await b.get("s")) is not None and state.status == "running":
        assert asyncio.get_running_loop().time() < deadline, "the end never reached Redis"
        await asyncio.sleep(0.01)
    assert state is not None and state.status == "done" and state.output == "a "
    # The grace is 3 s; poll rather than sleep a fixed time, so a loaded CI
    # machine does not fail it, but a key that never expires still does.
    deadline = asyncio.get_running_loop().time() + 10
    while await b.get("s") is not None:
        assert asyncio.get_running_loop().time() < deadline, "the keys never expired"
        await asyncio.sleep(0.05)
    with pytest.raises(RunNotFound):
        await b.subscribe("s")


async def test_runs_in_flight_are_counted_across_workers(workers, saves):
    a, b = workers
    gate = asyncio.Event()

    async def waiting() -> AsyncIterator[str]:
        await gate.wait()
        yield "x"

    await start(a, waiting(), saves, session="one")
    await start(b, waiting(), saves, session="two")
    assert await a.count_running("o") == 2
    # Subscribed first: the runs' keys expire 3 s after their end.
    followers = [await a.subscribe("one"), await a.subscribe("two")]
    gate.set()
    for subscription in followers:
        await collect(subscription)
    await asyncio.sleep(0.05)
    assert await b.count_running("o") == 0


async def test_an_unreachable_redis_is_a_named_error():
    dead = RedisBackend(redis_url="redis://127.0.0.1:1/0", connection_kwargs={"socket_timeout": 1})
    with pytest.raises(BackendUnavailable):
        await dead.subscribe("s")
    with pytest.raises(BackendUnavailable):
        await dead.start("s", new_id(), paced([]), start_data={}, meta={}, finalize=Saves())
    await dead.redis.aclose()


async def test_a_run_whose_worker_died_is_interrupted_with_everything_its_stream_holds(
    workers, saves
):
    a, b = workers
    gate = asyncio.Event()

    async def agent() -> AsyncIterator[str]:
        for word in WORDS[:10]:
            yield word
        await gate.wait()

    run_id = await start(a, agent(), saves)
    await eventually(lambda: _has_text(b, "".join(WORDS[:10])), "the words did not reach Redis")
    # Worker A dies: its tasks stop and its lease is gone (as when it lapses).
    for task in worker_tasks(a):
        task.cancel()
    await a.redis.delete(a._key("s", "lease", run_id))
    state = await b.get("s")
    assert state is not None and state.status == "interrupted"
    assert state.output == "".join(WORDS[:10])
    events = await collect(await b.subscribe("s"))
    assert events[-1].data == {"status": "interrupted"} and text_of(events) == state.output
    assert await b.count_running("o") == 0


async def test_a_dead_workers_run_is_reaped_with_the_usage_its_log_holds(workers, saves):
    """Worker A dies mid-run: B rebuilds the run's usage from the usage events
    in Redis, and hands it to the service's save (`on_reaped`)."""
    a, b = workers
    gate = asyncio.Event()
    reaped: list[Any] = []

    async def on_reaped(state: Any) -> bool:
        reaped.append(state)
        return True

    b.on_reaped = on_reaped

    async def agent() -> AsyncIterator[Any]:
        yield ("usage", {"input_tokens": 8, "model": "m"})
        yield "w "
        yield ("usage", {"output_tokens": 1})
        await gate.wait()

    run_id = await start(a, agent(), saves)

    async def reached() -> bool:  # everything reaches the stream
        state = await b.get("s")
        return state is not None and state.output == "w " and "output_tokens" in state.usage

    await eventually(reached, "the events did not reach Redis")
    for task in worker_tasks(a):
        task.cancel()
    await a.redis.delete(a._key("s", "lease", run_id))
    state = await b.get("s")
    assert state is not None and state.status == "interrupted"
    assert state.usage == {"input_tokens": 8, "model": "m", "output_tokens": 1}
    assert [s.usage for s in reaped] == [state.usage] and reaped[0].output == "w "
    # When A logged its first token, as A wrote it in Redis (B's mirror cannot know).
    local = a.driver.runs["s"].first_text_at
    assert local is not None and reaped[0].first_token_at == state.first_token_at == local


async def test_a_run_whose_worker_died_before_its_first_event_reached_redis_starts_its_log(
    workers, saves
):
    """A worker wrote the run (its hash, the session's pointer) and died
    before the run's first event reached the stream (fault injection, seed
    295: kill -9 during a start). The reap ends it ``interrupted`` with a
    log that begins with ``start``, as every replay does (it was a lone
    ``done``: invariant "one terminal event", a replay that begins with it)."""
    a, b = workers
    gate = asyncio.Event()

    async def agent() -> AsyncIterator[str]:
        await gate.wait()
        yield "never"

    run_id = await start(a, agent(), saves)
    await asyncio.sleep(0.05)
    for task in worker_tasks(a):
        task.cancel()
    await a.redis.delete(
        a._key("s", "log", run_id), a._key("s", "head", run_id), a._key("s", "lease", run_id)
    )
    state = await b.get("s")
    assert state is not None and state.status == "interrupted"
    events = await collect(await b.subscribe("s"))
    assert [e.event for e in events] == ["start", "done"]
    assert events[0].data == {"run": str(uuid.UUID(run_id)), "prompt": ""}  # no prompt here
    assert events[-1].id == state.last_id


async def test_a_reaped_runs_end_outlives_a_database_outage_longer_than_the_grace(saves):
    """B reaps A's run while the database refuses (its save raises), for
    longer than the grace period after which an ended run's keys expire: the
    keys are kept, and a later sweep saves the row with the run's own end
    and text. (They expired with the grace: the end was lost, and the row
    sweep marked the row ``interrupted`` at its last checkpoint, with other
    text than its followers saw: fault injection, seed 295.)"""
    async with two_workers(evict_after=0.2) as (a, b):
        saved: list[Any] = []
        refusing = True

        async def on_reaped(state: Any) -> bool:
            if refusing:
                raise RuntimeError("the database refuses")
            saved.append(state)
            return True

        b.on_reaped = on_reaped
        gate = asyncio.Event()

        async def agent() -> AsyncIterator[str]:
            yield "w "
            await gate.wait()

        run_id = await start(a, agent(), saves)
        await eventually(lambda: _has_text(b, "w "), "the text did not reach Redis")
        for task in worker_tasks(a):
            task.cancel()
        await a.redis.delete(a._key("s", "lease", run_id))
        state = await b.get("s")
        assert state is not None and state.status == "interrupted"
        await asyncio.sleep(0.5)  # past the grace
        assert await b.redis.exists(b._key("s", "log", run_id), b._key("s", "run", run_id)) == 2
        refusing = False
        await b._save_orphaned_ends()
        assert [(s.status, s.output) for s in saved] == [("interrupted", "w ")]


async def test_a_lease_of_a_dead_process_on_this_host_counts_as_lapsed(workers, saves):
    a, b = workers
    gate = asyncio.Event()

    async def agent() -> AsyncIterator[str]:
        yield "x "
        await gate.wait()

    run_id = await start(a, agent(), saves)
    await asyncio.sleep(0.05)
    for task in worker_tasks(a):
        task.cancel()
    dead = await asyncio.create_subprocess_exec("true")
    await dead.wait()  # a pid that existed and is gone
    host = socket.gethostname()
    await a.redis.set(a._key("s", "lease", run_id), f"{host}:{dead.pid}:x", px=60_000)
    state = await b.get("s")
    assert state is not None and state.status == "interrupted"


async def test_the_end_of_an_older_run_does_not_expire_the_sessions_newer_run():
    async with two_workers(evict_after=0.5) as workers:
        await _older_run_ends(*workers)


async def _older_run_ends(a: RedisBackend, b: RedisBackend) -> None:
    slow = Saves(delay=0.1)
    gate = asyncio.Event()

    async def waiting() -> AsyncIterator[str]:
        yield "second "
        await gate.wait()

    await start(a, paced(WORDS, 0.05), slow)
    await asyncio.sleep(0.05)
    second = await start(b, waiting(), slow)  # the first ends, stopped, after this
    await asyncio.sleep(1.0)  # past the first run's grace (0.5 s)
    state = await a.get("s")
    assert state is not None and state.run_id == second and state.status == "running"
    gate.set()


async def test_while_redis_is_down_the_run_goes_on_and_afterwards_every_worker_has_it(
    own_redis, saves
):
    url = f"redis://127.0.0.1:{own_redis.port}/0"
    a = RedisBackend(redis_url=url, evict_after=30, connection_kwargs={"socket_timeout": 1})
    b = RedisBackend(redis_url=url, evict_after=30, connection_kwargs={"socket_timeout": 1})
    words = [f"w{i} " for i in range(60)]
    await start(a, paced(words, 0.02), saves)
    local = await a.subscribe("s")
    remote = asyncio.ensure_future(collect(await b.subscribe("s")))  # B follows through Redis
    await asyncio.sleep(0.3)
    own_redis.kill()
    with pytest.raises(BackendUnavailable):
        await b.get("s")  # requests elsewhere get 503
    on_a = await collect(local)  # the local subscriber never notices
    assert text_of(on_a) == "".join(words) and on_a[-1].data == {"status": "done"}
    assert saves.ends[0].output == "".join(words)  # the save happened all the same
    own_redis.start()  # back, and empty: it keeps nothing on disk
    for _ in range(100):
        try:
            state = await b.get("s")
        except BackendUnavailable:
            state = None
        if state is not None and state.status == "done":
            break
        await asyncio.sleep(0.05)
    on_b = await collect(await b.subscribe("s"))
    assert text_of(on_b) == "".join(words)
    assert on_b[-1].id == on_a[-1].id  # the same ids on every worker
    # The subscriber that was following on B when Redis died resumes: no gap.
    followed = await asyncio.wait_for(remote, 10)
    assert text_of(followed) == "".join(words) and len(terminals(followed)) == 1
    await a.shutdown(2)
    await b.shutdown(2)


async def test_a_worker_that_lost_its_run_cannot_write_past_its_end_and_its_save_wins(
    workers, saves
):
    """A is cut off from Redis past its lease and B reaps the run. A cannot
    append past the end B wrote; it stops its copy and saves it, with what
    its own clients saw (its save has the last word in the row); then Redis
    drops the reaped copy, so that every worker serves that one end."""
    a, b = workers
    step = asyncio.Event()

    async def agent() -> AsyncIterator[str]:
        yield "before "
        await step.wait()
        yield "after the reaping "  # the cut-off worker carries on
        await asyncio.sleep(30)

    run_id = await start(a, agent(), saves)
    await asyncio.sleep(0.1)
    # A is cut off long enough for its lease to lapse; B ends the run.
    await a.redis.delete(a._key("s", "lease", run_id))
    state = await b.get("s")
    assert state is not None and state.status == "interrupted"
    step.set()  # A wakes up and tries to go on
    local = await collect(await a.subscribe("s"))
    assert local[-1].data == {"status": "interrupted"}  # A stopped its copy too
    entries = await b.redis.xrange(b._key("s", "log", run_id))
    assert b"after the reaping" not in b"".join(f[b"d"] for _, f in entries)
    assert saves.ends[-1].output == text_of(local) == "before after the reaping "

    async def dropped() -> bool:
        gone = not await b.redis.exists(b._key("s", "log", run_id))
        return gone and await b.get("s") is None

    await eventually(dropped, "Redis kept the reaped copy")


async def test_a_workers_reader_stops_when_its_last_local_subscriber_leaves(workers, saves):
    a, b = workers
    gate = asyncio.Event()

    async def waiting() -> AsyncIterator[str]:
        yield "x "
        await gate.wait()

    run_id = await start(a, waiting(), saves)
    one, two = await b.subscribe("s"), await b.subscribe("s")
    assert list(b._followed) == [run_id]  # followed once for both subscribers
    await one.aclose()
    assert run_id in b._followed
    await two.aclose()
    await asyncio.sleep(0)
    assert b._followed == {} and b._mirrors == {}
    gate.set()


async def test_adoption_on_one_worker_reaches_the_worker_that_drives_the_run(workers, saves):
    """A visitor who logs in (`detached_runs.owners.adopt_anonymous_runs`) may
    land on a worker that does not drive their run."""
    a, b = workers
    prefix = a.prefix
    gate = asyncio.Event()

    async def waiting() -> AsyncIterator[str]:
        yield "thinking "
        await gate.wait()

    meta = {"owner": "anon:a", "address": "203.0.113.7"}
    await a.start("s", new_id(), waiting(), start_data={}, meta=meta, finalize=saves)
    assert await b.count_running(address="203.0.113.7") == 1
    assert await b.count_running(owner="anon:a") == 1

    async def a_listens() -> bool:
        subscribed = await b.redis.pubsub_numsub(f"{prefix}:adopt")
        return bool(subscribed and subscribed[0][1])

    await eventually(a_listens, "worker A never listened")
    assert await b.adopt("anon:a", "user:1", ["s", "never-started"]) == 1
    state_b = await b.get("s")  # what Redis holds
    assert state_b is not None and state_b.meta["owner"] == "user:1"

    async def a_adopted() -> bool:
        state = await a.get("s")  # A's own copy of its run
        return (
            state is not None
            and state.meta.get("owner") == "user:1"
            and await b.count_running(owner="user:1") == 1
        )

    await eventually(a_adopted, "worker A kept the old owner")
    assert await b.count_running(owner="anon:a") == 0
    assert await b.count_running(address="203.0.113.7") == 0
    gate.set()
    await collect(await a.subscribe("s"))

    async def nothing_running() -> bool:
        return await b.count_running(owner="user:1") == 0

    await eventually(nothing_running, "the adopted run still counts after its end")
    # Its grace period: any worker sees the new owner in what Redis holds.
    state = await b.get("s")
    assert state is not None and state.status == "done" and state.meta["owner"] == "user:1"


@pytest.mark.parametrize("adopter", ["the other worker", "the run's worker"])
async def test_an_adoption_whose_message_is_lost_is_found_once_the_channel_is_back(
    own_redis, saves, adopter
):
    """An adoption published while a worker's pub/sub connection is down (here
    killed, as a Redis restart or a proxy does) is lost to it. Once it
    listens again it finds the new owner in the run's hash: the run's worker
    (B adopts) moves its run to the new owner's count, a follower (A, which
    drives the run, adopts) its copy of the meta, which its clients are
    checked against."""
    gate = asyncio.Event()

    async def waiting() -> AsyncIterator[str]:
        yield "thinking "
        await gate.wait()

    async with two_workers(own_redis.url) as (a, b):
        try:
            meta = {"owner": "anon:a", "address": "203.0.113.7"}
            await a.start("s", new_id(), waiting(), start_data={}, meta=meta, finalize=saves)
            subscription = await b.subscribe("s")  # B follows it: a mirror of A's run
            assert text_of(await subscription.next_batch()) == "thinking "

            async def both_listen() -> bool:
                subscribed = await a.redis.pubsub_numsub(f"{a.prefix}:adopt")
                return bool(subscribed and subscribed[0][1] == 2)

            await eventually(both_listen, "a worker never listened")
            own_redis.command("CLIENT", "KILL", "TYPE", "pubsub")
            adopting, missing = (b, a) if adopter == "the other worker" else (a, b)
            assert await adopting.adopt("anon:a", "user:1", ["s"]) == 1

            async def adopted() -> bool:
                log = await missing.current_log("s")
                return (
                    log is not None
                    and log.meta.get("owner") == "user:1"
                    and await b.count_running(owner="user:1") == 1
                )

            await eventually(adopted, "the worker that missed the message kept the old owner")
            assert await b.count_running(owner="anon:a") == 0
            assert await b.count_running(address="203.0.113.7") == 0
        finally:
            gate.set()
        await collect(subscription)

        async def nothing_running() -> bool:
            return await b.count_running(owner="user:1") == 0

        await eventually(nothing_running, "the adopted run still counts after its end")


async def test_a_healthy_idle_redis_is_not_taken_for_an_outage(saves, caplog):
    """The mirror's blocking read waits at most half the socket's timeout (here
    1 s, from the URL): it used to block 5 s whatever the timeout, so with
    redis-py's default of 5 s a worker following an idle run on another worker
    logged "Redis unreachable" and reconnected every few seconds."""
    gate = asyncio.Event()

    async def idle() -> AsyncIterator[str]:
        yield "thinking "
        await gate.wait()
        yield "done"

    async with two_workers("redis://127.0.0.1:6379/0?socket_timeout=1") as (a, b):
        try:
            await start(a, idle(), saves)
            subscription = await b.subscribe("s")
            assert [e.event for e in await subscription.next_batch()] == ["start", "delta"]
            with caplog.at_level("WARNING", logger="detached_runs"):
                assert await subscription.next_batch(timeout=2.5) == []  # quiet: a keep-alive
            assert "unreachable" not in caplog.text
            gate.set()
            assert text_of(await collect(subscription)) == "done"
        finally:
            gate.set()


async def test_an_id_ahead_of_what_redis_gave_this_worker_waits_for_it(own_redis, saves):
    """A client reads from worker A, whose writes to Redis lag (here Redis
    pauses them), and comes back on worker B with A's last id: B has not seen
    it yet. It used to answer 400 "Unknown event id.", which ends EventSource
    for good; now it waits for the log to catch up and sends exactly the rest."""
    import redis.asyncio as aioredis

    url = f"redis://127.0.0.1:{own_redis.port}/0"
    a, b = RedisBackend(redis_url=url), RedisBackend(redis_url=url)
    admin = aioredis.Redis.from_url(url)
    words = [f"w{i} " for i in range(80)]
    try:
        await start(a, paced(words, 0.02), saves)
        local = await a.subscribe("s")
        seen = [await local.next_batch() for _ in range(3)]
        await admin.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
        await asyncio.sleep(0.5)  # A goes on; Redis holds its writes
        seen.append(await local.next_batch())
        last = seen[-1][-1].id
        began = asyncio.get_running_loop().time()
        rest = await collect(await b.subscribe("s", after=parse_id(last)))
        assert asyncio.get_running_loop().time() - began < 10
        got = text_of([e for batch in seen for e in batch]) + text_of(rest)
        assert got == "".join(words)
        assert rest[-1].data == {"status": "done"}
    finally:
        await admin.aclose()
        await a.shutdown(2)
        await b.shutdown(2)


async def test_an_id_that_can_never_be_valid_is_still_refused_at_once(workers, saves):
    a, b = workers
    run_id = await start(a, paced([f"w{i} " for i in range(5)], 0.01), saves)
    await collect(await a.subscribe("s"))
    began = asyncio.get_running_loop().time()
    with pytest.raises(BadEventId):  # past the end of a finished run
        await b.subscribe("s", after=parse_id(f"{run_id}:999-9"))
    assert asyncio.get_running_loop().time() - began < 1


# -- a bounded stream (REDIS_STREAM_MAXLEN) ----------------------------------

LONG = [f"w{i} " for i in range(400)]


async def test_a_bounded_stream_replays_the_whole_run_on_another_worker_with_its_ids(saves):
    """#14 item 2: with the stream bounded to 5 entries, a subscriber on another
    worker got no start, text from the middle on, and ids of its own."""
    async with two_workers(stream_maxlen=5) as (a, b):
        run_id = await start(a, paced(LONG, 0.001), saves)
        on_a = await a.subscribe("s")
        first: list[Event] = []
        while len(text_of(first)) < len("".join(LONG)) // 2:
            first += await on_a.next_batch()
        midway = first[len(first) // 2]
        # Mid-run on B: from the start, and from an id of A's.
        from_start = asyncio.ensure_future(collect(await b.subscribe("s")))
        resumed = asyncio.ensure_future(collect(await b.subscribe("s", parse_id(midway.id))))
        on_a_all = first + await collect(on_a)
        for events in (await from_start, await collect(await b.subscribe("s"))):  # then after
            assert events[0].event == "start" and events[0].id == on_a_all[0].id
            assert text_of(events) == "".join(LONG) and positions_follow(events, run_id)
            assert terminals(events) == [events[-1]] and events[-1].id == on_a_all[-1].id
        rest = await resumed
        seen = text_of(first[: first.index(midway) + 1])
        assert seen + text_of(rest) == "".join(LONG)
        assert positions_follow(rest, run_id, parse_id(midway.id)[1])
        assert rest[-1].id == on_a_all[-1].id
        assert await b.redis.xlen(b._key("s", "log", run_id)) <= 5


async def test_a_follower_that_falls_behind_a_trim_still_gets_every_event_in_order(saves):
    """Worker B follows the run; worker A then writes 300 entries in one go, so
    that by B's next read the entries that follow B's last one were trimmed
    away: B must read them again from what the trim kept, not skip them."""
    gate = asyncio.Event()
    burst = [item for i in range(150) for item in (f"t{i} ", ("tick", {"n": i}))]

    async def agent() -> AsyncIterator[Any]:
        yield "first "
        await gate.wait()
        for item in burst:  # no await between: one batch for A's writer
            yield item

    async with two_workers(stream_maxlen=5) as (a, b):
        run_id = await start(a, agent(), saves)
        following = await b.subscribe("s")
        seen: list[Event] = []
        while text_of(seen) != "first ":
            seen += await following.next_batch()
        assert run_id in b._followed  # B follows with its reader from here on
        gate.set()
        events = seen + await collect(following)
        assert text_of(events) == "first " + "".join(i for i in burst if isinstance(i, str))
        assert [e.data["n"] for e in events if e.event == "tick"] == list(range(150))
        assert positions_follow(events, run_id) and terminals(events) == [events[-1]]
        on_a = await collect(await a.subscribe("s"))
        assert events[-1].id == on_a[-1].id


# Not shrunk: an example is a few numbers, readable as found, and shrinking
# would run it hundreds of times, past the test's timeout.
@settings(max_examples=25, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(
    maxlen=st.integers(1, 12),
    count=st.integers(0, 300),
    tokens=st.lists(st.sampled_from(["a", "bb ", "é", "🙂 ", 'q"\\/ ', "x\n"]), min_size=1),
    tick_every=st.integers(1, 60),
    pause_every=st.integers(1, 40),
    resume=st.floats(0, 1),
)
async def test_any_bounded_stream_replays_and_resumes_the_whole_run_on_another_worker(
    maxlen: int,
    count: int,
    tokens: list[str],
    tick_every: int,
    pause_every: int,
    resume: float,
) -> None:
    """Whatever the bound and however A's writes are batched (a pause every few
    tokens, custom events among them): B, following from the start, replaying
    after the end, or resuming at any id of A's, gets exactly A's log."""

    async def agent() -> AsyncIterator[Any]:
        for i in range(count):
            yield tokens[i % len(tokens)]
            if i % tick_every == 0:
                yield ("tick", {"n": i})
            if i % pause_every == 0:
                await asyncio.sleep(0.001)

    # Ended runs stay while the test reads them, however slow the machine.
    async with two_workers(stream_maxlen=maxlen, evict_after=60) as (a, b):
        run_id = await start(a, agent(), Saves())
        following = asyncio.ensure_future(collect(await b.subscribe("s")))
        on_a = await collect(await a.subscribe("s"))
        assert positions_follow(on_a, run_id)
        for events in (await following, await collect(await b.subscribe("s"))):
            assert text_of(events) == text_of(on_a) and positions_follow(events, run_id)
            assert [e.data for e in events if e.event == "tick"] == [
                e.data for e in on_a if e.event == "tick"
            ]
            assert events[0].id == on_a[0].id and events[-1].id == on_a[-1].id
        midway = on_a[min(int(resume * len(on_a)), len(on_a) - 2)]
        rest = await collect(await b.subscribe("s", parse_id(midway.id)))
        seen = text_of(on_a[: on_a.index(midway) + 1])
        assert seen + text_of(rest) == text_of(on_a)
        assert positions_follow(rest, run_id, parse_id(midway.id)[1])
        assert await b.redis.xlen(b._key("s", "log", run_id)) <= maxlen


@pytest.mark.parametrize("end", ["done", "reaped"])
async def test_a_bounded_runs_head_expires_with_its_other_keys(end, saves):
    """The head goes with the run's other keys after the grace period, whether
    the run's worker ended it or another worker reaped it."""
    gate = asyncio.Event()

    async def agent() -> AsyncIterator[Any]:
        for word in WORDS:
            yield word
            # An event between words: entries that no write merges, so the
            # stream passes its bound however the writer batches them.
            yield ("tick", {})
            await asyncio.sleep(0.001)
        await gate.wait()  # the run ends here, or its worker dies here

    async with two_workers(stream_maxlen=5) as (a, b):
        run_id = await start(a, agent(), saves)

        async def in_redis() -> bool:
            state = await b.get("s")
            return state is not None and state.output == FULL

        await eventually(in_redis, "the run's text never reached Redis")
        assert await b.redis.exists(b._key("s", "head", run_id))
        if end == "done":
            gate.set()
            await collect(await a.subscribe("s"))
        else:
            for task in worker_tasks(a):
                task.cancel()
            await a.redis.delete(a._key("s", "lease", run_id))
        state = await b.get("s")  # (reaps the run if its worker is gone)
        assert state is not None and state.output == FULL

        async def expired() -> bool:
            return not [key async for key in b.redis.scan_iter(match=f"*{run_id}*")]

        await eventually(expired, "a key of the run outlived its grace period", timeout=10)


async def test_a_stop_whose_message_is_lost_still_stops_the_run(own_redis, saves):
    """A stop published while the running worker's stop channel reconnects
    (here its pub/sub connection is killed, as a Redis restart or a proxy
    does) is lost; the flag it also sets in the run's hash is read at the
    writer's next lease renewal, so the run stops all the same."""
    gate = asyncio.Event()

    async def thinking() -> AsyncIterator[str]:
        yield "thinking "
        await gate.wait()
        yield "never"

    async with two_workers(own_redis.url) as (a, b):
        try:
            await start(a, thinking(), saves)
            subscription = await a.subscribe("s")
            assert text_of(await subscription.next_batch()) == "thinking "
            own_redis.command("CLIENT", "KILL", "TYPE", "pubsub")
            assert await b.stop("s") is True
            # Within a renewal (plus slack), or never: the message is gone.
            events = await asyncio.wait_for(collect(subscription), RENEW_EVERY + 2)
            assert events[-1].data == {"status": "stopped"}
        finally:
            gate.set()


async def question_of(backend: RedisBackend, session: str) -> tuple[Any, str]:
    """A subscription to ``session`` at ``backend``, read up to its run's
    question, and the question's request id."""
    subscription = await backend.subscribe(session)
    events: list[Any] = []
    while not any(e.event == "input_required" for e in events):
        events += await subscription.next_batch()
    # Not the batch's last event: a question that timed out at once comes
    # with what followed it (on CI, under load).
    (asked,) = [e for e in events if e.event == "input_required"]
    return subscription, asked.data["request"]


async def test_an_answer_whose_message_is_lost_still_reaches_the_run(own_redis, saves):
    """An answer taken at B is announced on ``<prefix>:input``; if that message
    is lost (A's pub/sub connection killed, as a Redis restart or a proxy
    does), A finds the answer in the run's hash at its next look (every
    ``renew_every`` s), so the agent gets it all the same, once."""
    got: list[Any] = []
    ids: dict[str, str] = {}

    async def asking() -> AsyncIterator[str]:
        yield "asking "
        got.append(await a.ask("s", ids["run"], {"q": "?"}, 30))
        yield "answered"

    async with two_workers(own_redis.url, renew_every=0.5, lease_ms=3000) as (a, b):
        ids["run"] = new_id()  # the agent asks as soon as it begins
        await start(a, asking(), saves, run_id=ids["run"])
        subscription, request = await question_of(b, "s")
        own_redis.command("CLIENT", "KILL", "TYPE", "pubsub")
        assert await b.answer("s", request, {"ok": True}) is True
        assert await b.answer("s", request, {"ok": False}) is False  # taken already
        rest = await asyncio.wait_for(collect(subscription), 0.5 + 3)
        assert [e.event for e in rest if e.event != "delta"] == ["input_received", "done"]
        assert got == [{"ok": True}]


@pytest.mark.parametrize("answered_at", ["another worker", "the run's worker"])
async def test_an_answer_taken_as_the_question_times_out_reaches_the_agent(
    own_redis, saves, answered_at
):
    """Redis is held up (``CLIENT PAUSE``) while the question times out, with
    an answer already accepted there: the agent gets it, and the answering
    call says so. At another worker, A's watch (woken by B's message) is
    taking it as the timeout's withdrawal begins: the withdrawal waits for
    that take (it was dropped: the withdrawal found nothing, the agent timed
    out). At the run's worker, the withdrawal takes it and gives it to the
    agent before the answering call does (which said False: refused)."""
    outcomes: list[tuple[bool, str]] = []
    for _ in range(6):
        got: list[Any] = []
        ids: dict[str, str] = {}

        async def asking(got: Any = got, ids: Any = ids) -> AsyncIterator[str]:
            try:
                got.append(await a.ask("s", ids["run"], {"q": "?"}, 0.5))
            except InputTimeout:
                got.append("timed out")
            yield "end"

        async with two_workers(own_redis.url, renew_every=0.5, lease_ms=5000) as (a, b):
            ids["run"] = new_id()
            await start(a, asking(), saves, run_id=ids["run"])
            subscription, request = await question_of(b, "s")
            if answered_at == "another worker":
                accepted = await b.answer("s", request, "yes")
                assert accepted
                # Blocking: A's loop sees B's message only once the pause is on.
                own_redis.command("CLIENT", "PAUSE", "1000", "WRITE")
            else:
                # The answer and the withdrawal both wait for Redis, which
                # lets them on in either order.
                own_redis.command("CLIENT", "PAUSE", "1000", "WRITE")
                accepted = await a.answer("s", request, "yes")
            rest = await asyncio.wait_for(collect(subscription), 5)
            outcomes.append((accepted, got[0]))
        ends = [e.event for e in rest if e.event != "delta"]
        assert ends == ["input_received" if accepted else "input_timeout", "done"]
    assert all(got == ("yes" if accepted else "timed out") for accepted, got in outcomes), outcomes


@pytest.mark.parametrize("answered_at", ["another worker", "the run's worker"])
async def test_an_answer_as_the_question_times_out_is_taken_or_refused_never_lost(
    saves, answered_at
):
    """The worker's withdrawal and an answer race in Redis: whichever the
    script runs first wins. Accepted (True) means the agent got it; refused
    (False) means it timed out. Many rounds, both outcomes. Answered at
    another worker, the run's worker may be taking it (woken by the message)
    as the question times out; at the run's worker, the timeout's withdrawal
    may take it as the answering request gives it to the agent."""
    outcomes: list[tuple[bool, str]] = []
    async with two_workers(renew_every=0.5, lease_ms=3000) as (a, b):
        answering = b if answered_at == "another worker" else a
        for round_ in range(24):
            session = f"s{round_}"
            ids: dict[str, str] = {}
            got: list[str] = []

            async def asking(session: str = session, ids: Any = ids, got: Any = got) -> Any:
                try:
                    got.append(await a.ask(session, ids["run"], {"q": "?"}, 0.2))
                except InputTimeout:
                    got.append("timed out")
                yield "end"

            ids["run"] = new_id()
            await start(a, asking(), saves, session, ids["run"])
            subscription, request = await question_of(b, session)
            await asyncio.sleep(0.2 - 0.004 * (round_ % 8))  # about when it times out
            accepted = await answering.answer(session, request, "yes")
            await collect(subscription)
            outcomes.append((accepted, got[0]))
    assert all(got == ("yes" if accepted else "timed out") for accepted, got in outcomes), outcomes
    assert {accepted for accepted, _ in outcomes} == {True, False}, outcomes  # both races run


async def test_a_start_refused_by_a_shutdown_begun_meanwhile_leaves_nothing_in_redis(saves):
    """The shutdown begins while the start waits for Redis: the start is
    refused, and the run it had written (its hash, its lease, the session's
    current pointer, its place in the sets of runs in flight) goes with it.
    It was left behind, and later reaped as a lone terminal event."""
    async with two_workers() as (a, b):
        starting = asyncio.ensure_future(start(a, paced(["x "]), saves))
        await asyncio.sleep(0)  # into start(), past its first check
        await a.shutdown(1)
        with pytest.raises(BackendUnavailable):
            await starting
        assert await b.get("s") is None
        assert await b.count_running("o") == 0
        assert [key async for key in b.redis.scan_iter(match=f"*{b.prefix}*")] == []


@pytest.mark.django_db(transaction=True)
async def test_the_latest_row_of_a_session_is_its_current_run_whatever_order_the_starts_took():
    """A double send balanced to two workers: each service writes its row,
    then the starts take the session's Redis lock, in either order. The rows
    follow the lock's order (the backend's start time), so that the latest
    row, which the app serves once Redis forgets the session, is the run that
    won. Several rounds, since which start takes the lock first is luck."""
    from detached_runs.models import Run
    from detached_runs.runs import RunService

    async with two_workers() as (a, b):
        first, second = RunService(a), RunService(b)
        for round_ in range(6):
            session = f"double-{round_}"
            lock = a._key(session, "lock")
            await a.redis.set(lock, "held by the test", px=5000)
            starts = [
                asyncio.ensure_future(
                    service.start(session, prompt="3", agent="tests.agents.words")
                )
                for service in (first, second)
            ]
            await asyncio.sleep(0.05)  # both rows written, both starts waiting for the lock
            await a.redis.delete(lock)
            await asyncio.gather(*starts)
            current = await a.get(session)
            assert current is not None
            latest = await Run.objects.filter(session_key=session).alatest("started_at")
            assert latest.id.hex == current.run_id, f"round {round_}"
            for service in (first, second):
                await service.stop(session)


async def test_a_run_whose_workers_all_died_is_swept_by_a_worker_that_comes_later(saves):
    """Every worker dies (their tasks stop, as at kill -9; leases of 1 s here)
    and a new one starts only after two leases: it still finds and ends the
    dead run unasked. The set of runs in flight that sweeps read used to
    expire with its last renewal, and the run stayed running for good."""
    gate = asyncio.Event()

    async def thinking() -> AsyncIterator[str]:
        yield "thinking "
        await gate.wait()

    async with two_workers(lease_ms=1000, renew_every=0.3) as (a, b):
        run_id = await start(a, thinking(), saves)
        await asyncio.sleep(0.2)  # its start and first word are in Redis
        # a dies: nothing of it runs any more, nothing is ended
        for task in [a._sweeper, a._listener, *a._writers.values()]:
            if task is not None:
                task.cancel()
        await asyncio.sleep(2.5)  # past two leases, with no worker alive
        assert await b.count_running("o") == 0  # b's first call: its sweeps begin
        key = b._key("s", "run", run_id)
        deadline = asyncio.get_running_loop().time() + 3
        while await b.redis.hget(key, "status") != b"interrupted":
            assert asyncio.get_running_loop().time() < deadline, "never swept"
            await asyncio.sleep(0.1)
        gate.set()


async def test_a_start_waits_for_the_sessions_runs_on_both_workers(saves):
    """Two tabs, two workers: R1 runs on A and takes a while to let go; a start
    on B (R3) asks A to stop it and waits; then a start on A (R2) replaces R1
    locally and R3 remotely. R2's agent must begin only once R3 is saved too:
    it used to wait for R1 alone."""
    order: list[str] = []

    async def lingering() -> AsyncIterator[str]:
        try:
            yield "r1 "
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.5)

    def agent(name: str) -> AsyncIterator[str]:
        async def run() -> AsyncIterator[str]:
            order.append(f"{name} begins")
            yield f"{name} "
            await asyncio.sleep(3600)

        return run()

    async def logged(end: Any) -> None:
        await saves(end)
        order.append(f"{names[end.run_id]} saved")

    async with two_workers() as (a, b):
        names: dict[str, str] = {}
        for backend, source, name in ((a, lingering(), "r1"), (b, agent("r3"), "r3")):
            run_id = new_id()
            names[run_id] = name
            await backend.start(
                "s", run_id, source, start_data={}, meta={"owner": "o"}, finalize=logged
            )
            await asyncio.sleep(0.2)
        run_id = new_id()
        names[run_id] = "r2"
        await a.start("s", run_id, agent("r2"), start_data={}, meta={"owner": "o"}, finalize=logged)
        deadline = asyncio.get_running_loop().time() + 5
        while "r2 begins" not in order:
            assert asyncio.get_running_loop().time() < deadline, order
            await asyncio.sleep(0.05)
        assert order.index("r3 saved") < order.index("r2 begins"), order
        await a.stop("s")


async def test_the_sweeps_call_the_services_sweep_of_rows_now_and_then(monkeypatch):
    """Every `SWEEP_ROWS_EVERY` sweeps the backend calls ``on_sweep`` (the
    service's sweep of rows left running, which finds what Redis lost), even
    when that sweep fails (the database refuses) now and then."""
    monkeypatch.setattr("detached_runs.backends.redis.SWEEP_ROWS_EVERY", 2)
    calls: list[int] = []

    async def sweep() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise OSError("the database refuses")

    async with two_workers(renew_every=0.05) as (a, _b):
        a.on_sweep = sweep
        assert await a.count_running("o") == 0  # its sweeps begin
        await eventually(lambda: _at_least(calls, 3), "the service's sweep was not called")


async def _at_least(calls: list[int], count: int) -> bool:
    return len(calls) >= count


@pytest.mark.django_db(transaction=True)
async def test_a_row_whose_heartbeat_lapsed_stays_running_while_redis_has_the_run_in_flight(
    config,
):
    """The database refused a run's checkpoints for a while, so its row's
    heartbeat is stale (set here as such an outage leaves it), but the run goes
    on on worker A. Another worker resolving the row (the row sweep, a stored
    subscription) used to mark it ``interrupted`` at its checkpoint while it
    still streamed; the run in flight in Redis wins, and it is saved whole."""
    from datetime import timedelta

    from django.utils import timezone

    from detached_runs.models import Run
    from detached_runs.runs import RunService

    config(CHECKPOINT_EVERY=60)
    async with two_workers() as (a, b):
        first, second = RunService(a), RunService(b)
        run = await first.start("s", prompt="60", agent="tests.agents.words")
        await asyncio.sleep(0.1)
        stale = timezone.now() - timedelta(minutes=10)
        await Run.objects.filter(pk=run.pk).aupdate(updated_at=stale)
        resolved = await second.resolve(await Run.objects.aget(pk=run.pk))
        assert resolved.status == "running"
        async with await first.open("s") as subscription:
            events = [event async for event in subscription]
        assert events[-1].event == "done" and events[-1].data["status"] == "done"
        row = await Run.objects.aget(pk=run.pk)
        assert (row.status, row.output) == ("done", "".join(f"w{i} " for i in range(60)))


async def session_keys(backend: RedisBackend, session: str = "s") -> list[bytes]:
    return [k async for k in backend.redis.scan_iter(match=f"{{{backend.prefix}:{session}}}*")]


async def test_a_delete_on_one_worker_stops_the_run_another_drives_and_its_keys_go(workers, saves):
    a, b = workers

    async def forever() -> AsyncIterator[str]:
        yield "thinking "
        await asyncio.sleep(30)

    run_id = await start(a, forever(), saves)
    await asyncio.sleep(0.05)
    following = await a.subscribe("s")
    await b.delete("s", {run_id})
    assert saves.status_of(run_id) == "stopped"  # saved before the delete returned
    assert (await collect(following))[-1].data == {"status": "stopped"}
    assert await session_keys(a) == []
    await eventually(lambda: _forgotten(a), "the driving worker forgot the run", 2)
    assert await a.get("s") is None and await b.get("s") is None


async def _forgotten(backend: RedisBackend) -> bool:
    return "s" not in backend.driver.runs


async def test_a_follower_that_had_not_read_the_end_when_its_run_was_deleted_gets_one(
    workers, saves
):
    """A worker's mirror whose reader had not read the terminal event when
    the keys went (it lagged) would wait forever for it: the delete's message
    ends it with the run's status."""
    a, b = workers
    gate = asyncio.Event()

    async def waiting() -> AsyncIterator[str]:
        yield "x "
        await gate.wait()

    run_id = await start(a, waiting(), saves)
    follower = await b.subscribe("s")
    while "x " not in text_of(await follower.next_batch()):
        pass
    b._unfollow(run_id)  # b reads nothing more of the stream
    await asyncio.sleep(0.05)
    await a.delete("s", {run_id})
    events = await asyncio.wait_for(collect(follower), 3)
    assert events[-1].event == "done" and events[-1].data == {"status": "stopped"}
    assert b._mirrors == {} and b._followed == {}
    gate.set()


async def test_a_worker_follows_many_remote_runs_with_one_blocked_read(own_redis, saves):
    """Step 13: a worker following runs that another drives used to hold one
    blocked XREAD, and so one Redis connection, per run (1,000 followed runs,
    1,000 connections; twenty such workers pass Redis's ``maxclients``). Now
    one XREAD names them all; runs added while it blocks are named by the
    next one (a wake entry ends it), and each follower still gets its whole
    run."""
    gate = asyncio.Event()

    async def held() -> AsyncIterator[str]:
        yield "x "
        await gate.wait()
        for word in WORDS[:20]:
            yield word

    async def one_blocked_read() -> bool:
        clients = own_redis.command("CLIENT", "LIST").decode().splitlines()
        return sum(" cmd=xread " in f" {line} " for line in clients) == 1

    async with two_workers(f"redis://127.0.0.1:{own_redis.port}/0") as (a, b):
        sessions = [f"s{i}" for i in range(30)]
        for session in sessions:
            await start(a, held(), saves, session=session)
        followers = []
        for session in sessions:  # one at a time: each joins the XREAD blocked now
            follower = await b.subscribe(session)
            while "x " not in text_of(await follower.next_batch()):
                pass
            followers.append(follower)
        assert sorted(b._mirrors) == sorted(b._followed) and len(b._followed) == 30
        await eventually(one_blocked_read, "not one blocked XREAD")
        gate.set()
        for follower in followers:
            events = await asyncio.wait_for(collect(follower), 10)
            assert text_of(events) == "".join(WORDS[:20])
            assert events[-1].data == {"status": "done"}

        async def nothing_followed() -> bool:
            return not b._followed

        await eventually(nothing_followed, "closed runs are still followed")


async def test_more_runs_than_pooled_connections_wait_for_one_rather_than_fail(saves, caplog):
    """Found by `bench/followers.py`: redis-py's pool refuses a command at once
    past its ``max_connections`` (``MaxConnectionsError``, 100 by default),
    so a worker driving a few hundred runs had writes fail as if Redis were
    unreachable, and retried them late. The pool is a blocking one now: a
    command waits for a free connection. Here four connections serve 30
    runs writing at once (and a follower's reads)."""
    caplog.set_level("WARNING", logger="detached_runs")
    gate = asyncio.Event()
    async with two_workers(connection_kwargs={"max_connections": 4}) as (a, b):
        words = [f"w{i} " for i in range(40)]

        async def burst() -> AsyncIterator[str]:
            await gate.wait()  # every run writes at once
            for word in words:
                await asyncio.sleep(0)
                yield word

        sessions = [f"s{i}" for i in range(40)]
        for session in sessions:
            await start(a, burst(), saves, session=session)
        gate.set()
        for session in sessions:
            events = await asyncio.wait_for(collect(await b.subscribe(session)), 20)
            assert text_of(events) == "".join(words) and events[-1].data == {"status": "done"}
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert unreachable == []


async def test_a_run_redis_lost_is_followed_on_its_worker_until_it_is_written_again(workers, saves):
    """Redis lost the session (restarted empty, or a failover lost what the
    old master had not passed on): a subscriber on the run's own worker
    still follows it, from its local log, as its writer writes it again."""
    a, _ = workers
    gate = asyncio.Event()

    async def gated() -> AsyncIterator[str]:
        yield "half "
        await gate.wait()
        yield "rest"

    await start(a, gated(), saves)
    await eventually(lambda: _has_text(a, "half "), "the run did not begin")
    await delete_keys(a.redis, a.prefix)
    subscription = await a.subscribe("s")
    gate.set()
    events = await collect(subscription)
    assert text_of(events) == "half rest" and events[-1].data == {"status": "done"}


@pytest.mark.parametrize("where", ["the same worker", "another worker", "another, still ending"])
async def test_a_run_that_ended_as_redis_lost_it_leaves_the_session_to_the_run_in_flight(
    workers, saves, where
):
    """Redis lost the session (restarted empty) just as run W ended, replaced
    by run X (on W's worker, or on another one), while W's writer was still
    copying W's end, or W's agent was still cleaning up: W's writer writes W
    again (here called as it would be) before X's writer writes X again. W,
    stopped, must not take the session back: X would find it taken and stop,
    and a start on yet another worker would replace W and not wait for X."""
    a, b = workers
    w_worker = a if where == "the same worker" else b
    cleaned_up = asyncio.Event()
    if where != "another, still ending":
        cleaned_up.set()

    async def thinking() -> AsyncIterator[str]:
        try:
            yield "w "
            await asyncio.sleep(3600)
        finally:
            await cleaned_up.wait()  # its clean-up, once stopped

    w = await start(w_worker, thinking(), saves)
    await eventually(lambda: _has_text(a, "w "), "W did not reach Redis")
    w_run = w_worker.driver.runs["s"]
    words = [f"x{i} " for i in range(60)]
    x = await start(a, paced(words, 0.02), saves)
    subscription = await a.subscribe("s")

    async def w_stopping_and_x_current() -> bool:
        ended, current = await b.find("s", w), await b.get("s")
        if current is None or current.run_id != x or w_run.stop_reason is None:
            return False
        # Still ending: W's agent cleans up, and X waits for it. Else W ended
        # and X streams.
        return cleaned_up.is_set() is (
            ended is not None and ended.status == "stopped" and current.output != ""
        )

    await eventually(w_stopping_and_x_current, "W was not stopped, or X did not start")
    await delete_keys(a.redis, a.prefix)
    record = {"worker": worker_id(), "status": "running", "error": "", "meta": "{}"}
    await w_worker._resync(w_run, record)  # W's writer, still copying its end
    cleaned_up.set()
    events = await asyncio.wait_for(collect(subscription), 20)
    assert text_of(events) == "".join(words) and events[-1].data == {"status": "done"}

    async def x_is_current_and_done() -> bool:
        state = await b.get("s")
        return state is not None and (state.run_id, state.status) == (x, "done")

    await eventually(x_is_current_and_done, "X's end did not reach Redis as the session's run")


async def test_followers_that_arrive_at_once_share_one_mirror_that_is_followed(workers, saves):
    """Ten clients follow a run of A's on B at once, before B has a mirror of
    it: B reads the run from Redis once, and every client follows that one
    mirror to the end. Each used to read a copy of its own (a replay of a 20
    MiB answer grew a CI server by 280 MB), and only the one stored last was
    followed: the other clients got nothing after what they first read."""
    a, b = workers
    gate = asyncio.Event()

    # Long enough that reading it from Redis takes a while (its head and
    # stream: a few round trips and their decoding).
    words = [f"w{i:04d}-" + "x" * 200 + " " for i in range(3000)]

    async def agent() -> AsyncIterator[str]:
        for word in words:
            yield word
        await gate.wait()
        yield "last"

    await start(a, agent(), saves)
    await eventually(lambda: _has_text(b, "".join(words)), "the run did not reach Redis", 20)
    subscriptions = await asyncio.gather(*(b.subscribe("s") for _ in range(10)))
    logs = await asyncio.gather(*(b.current_log("s") for _ in range(3)))
    assert all(log is logs[0] for log in logs)
    gate.set()
    for subscription in subscriptions:
        events = await asyncio.wait_for(collect(subscription), 10)
        assert text_of(events) == "".join(words) + "last"
        assert events[-1].data == {"status": "done"}


async def _has_text(backend: RedisBackend, text: str) -> bool:
    state = await backend.get("s")
    return state is not None and state.output == text


def _begins(order: list[str], name: str, words: list[str]) -> AsyncIterator[str]:
    """An agent that notes when it begins, then says ``words`` slowly."""

    async def agent() -> AsyncIterator[str]:
        order.append(f"{name} begins")
        for word in words:
            await asyncio.sleep(0.05)
            yield word

    return agent()


def _lingering(order: list[str], name: str, seconds: float) -> AsyncIterator[str]:
    """An agent that says one word, thinks for ever, and takes ``seconds``
    to let go once stopped; notes when it let go."""

    async def agent() -> AsyncIterator[str]:
        try:
            yield f"{name} "
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(seconds)
            order.append(f"{name} let go")

    return agent()


@pytest.mark.parametrize("first_back", ["either", "W"])
async def test_a_start_waiting_for_a_run_elsewhere_goes_on_waiting_when_redis_loses_it(
    saves, first_back
):
    """X on B replaces W on A, whose agent takes a while to let go, and waits
    for W's end; then Redis restarts empty (its keys are deleted here). The
    wait read W's status, found none, and took that for W's end: X's agent
    began while W's still ran. W's worker writes W back within a lease.
    With ``first_back`` "W", W's writer writes W back (called here as it
    would be) before X's writer writes X back: W, asked to stop, used to
    take the session, and X's writer then stopped X, the run its user
    sent last, before its agent began."""
    order: list[str] = []
    async with two_workers() as (a, b):
        w = await start(a, _lingering(order, "w", 0.8), saves)
        w_run = a.driver.runs["s"]
        await eventually(lambda: _has_text(b, "w "), "W did not reach Redis")
        x = await start(b, _begins(order, "x", [f"x{i} " for i in range(20)]), saves)
        await asyncio.sleep(0.2)  # B waits for W's end, asked to stop
        assert order == []
        await delete_keys(a.redis, a.prefix)
        if first_back == "W":
            record = {"worker": worker_id(), "status": "running", "error": "", "meta": "{}"}
            await a._resync(w_run, record)
        await eventually(lambda: _has(order, "x begins"), f"X never began: {order}", 10)
        assert "w let go" in order and order.index("w let go") < order.index("x begins"), order
        await eventually(lambda: _saved(saves, x), "X was not saved", 10)
        assert (saves.status_of(w), saves.status_of(x)) == ("stopped", "done")


async def _saved(saves: Saves, run_id: str) -> bool:
    return any(end.run_id == run_id for end in saves.ends)


async def _has(order: list[str], item: str) -> bool:
    return item in order


async def _start_with_row(backend: RedisBackend, source: Any, saves: Saves) -> str:
    """`start`, with a row's id in the meta (as the service gives): a reap
    asks the row for its end (`RedisBackend.saved_end`)."""
    run_id = new_id()
    meta = {"owner": "o", "uuid": str(uuid.UUID(run_id))}
    await backend.start("s", run_id, source, start_data={"run": run_id}, meta=meta, finalize=saves)
    return run_id


async def test_a_lease_renewed_while_another_worker_reaps_the_run_keeps_the_run_alive(saves):
    """W's lease lapsed (its worker's renewal was held up: Redis paused its
    writes, or the worker's loop stalled; the lease is deleted here), and a
    start on B reaps W: it reads the lease, finds none, asks the row for
    W's end, and only then writes W's end. W's worker renews the lease in
    between (here, called as it would be, while B asks the row). The reap
    used to go on, and X's agent began at once, W's agent never asked to
    stop: it went on beside X until its next write."""
    order: list[str] = []
    async with two_workers() as (a, b):
        w = await _start_with_row(a, _lingering(order, "w", 0.3), saves)
        w_run = a.driver.runs["s"]
        await eventually(lambda: _has_text(b, "w "), "W did not reach Redis")
        await a.redis.delete(a._key("s", "lease", w))

        async def renewed_meanwhile(pk: str) -> None:
            assert await a._renew(w_run)  # W's worker renews its lease now
            return None  # W's row holds no end

        b.saved_end = renewed_meanwhile
        x = await start(b, _begins(order, "x", ["x "]), saves)
        await eventually(lambda: _has(order, "x begins"), f"X never began: {order}", 10)
        assert "w let go" in order and order.index("w let go") < order.index("x begins"), order
        await eventually(lambda: _saved(saves, x), "X was not saved", 10)
        assert (saves.status_of(w), saves.status_of(x)) == ("stopped", "done")


async def test_a_start_waiting_for_a_run_whose_lease_lapsed_and_came_back_goes_on_waiting(saves):
    """X on B waits for the end of W on A, asked to stop, whose agent takes a
    while to let go; meanwhile W's lease lapses (its worker's renewal was
    held up; the lease is deleted here) and comes back (renewed, here called
    as it would be while B asks W's row for its end, the reap's last step
    before it writes W's end). B's wait saw the lease gone, tried to reap W,
    was refused, and took that for W's end: X's agent began beside W's."""
    order: list[str] = []
    async with two_workers() as (a, b):
        w = await _start_with_row(a, _lingering(order, "w", 0.8), saves)
        w_run = a.driver.runs["s"]
        await eventually(lambda: _has_text(b, "w "), "W did not reach Redis")
        x = await start(b, _begins(order, "x", ["x "]), saves)
        await asyncio.sleep(0.1)  # B waits for W's end, asked to stop

        async def renewed_meanwhile(pk: str) -> None:
            assert await a._renew(w_run)  # W's worker renews its lease now
            return None  # W's row holds no end yet

        b.saved_end = renewed_meanwhile
        await a.redis.delete(a._key("s", "lease", w))
        await eventually(lambda: _has(order, "x begins"), f"X never began: {order}", 10)
        assert "w let go" in order and order.index("w let go") < order.index("x begins"), order
        await eventually(lambda: _saved(saves, x), "X was not saved", 10)
        assert (saves.status_of(w), saves.status_of(x)) == ("stopped", "done")


async def test_a_run_reaped_while_its_worker_was_cut_off_stops_at_its_workers_next_renewal(saves):
    """W's worker was cut off from Redis past W's lease (the lease is deleted
    here, as when it lapses), and a start on B reaped W and began X. Once W's
    worker reaches Redis again, its writer's renewal found W's hash there and
    renewed the lease: W's agent, thinking without writing, went on beside X
    for as long as it thought (only an append saw that W had ended)."""
    order: list[str] = []
    async with two_workers(renew_every=0.5, evict_after=30) as (a, b):
        w = await start(a, _lingering(order, "w", 0), saves)
        await eventually(lambda: _has_text(b, "w "), "W did not reach Redis")
        await a.redis.delete(a._key("s", "lease", w))
        x = await start(b, _begins(order, "x", [f"x{i} " for i in range(100)]), saves)
        assert await b.redis.hget(b._key("s", "run", w), "status") == b"interrupted"
        await eventually(lambda: _has(order, "w let go"), f"W went on beside X: {order}", 5)
        assert "x begins" in order
        await b.stop("s", x)


@pytest.mark.django_db(transaction=True)
async def test_a_queued_run_does_not_start_beside_a_run_redis_lost(saves):
    """W runs on A, X is queued behind it (``multitask="enqueue"``), and Redis
    restarts empty (its keys are deleted here). Before W's writer writes W
    back, B promotes the queue (`RunService._promote`, called here as B's
    row sweep calls it for a queue that waited long): it found no run in
    flight in the backend and started X beside W. A start waits up to a
    lease for such a run to come back (`RunService._rejoined`); so must the
    queue."""
    from detached_runs.models import Run
    from detached_runs.runs import RunService

    async with two_workers() as (a, b):
        first, second = RunService(a), RunService(b)
        w = await first.start("s", prompt="w", agent="tests.agents.forever")
        await eventually(lambda: _has_text(b, "thinking "), "W did not reach Redis")
        x = await second.start("s", prompt="5", agent="tests.agents.words", multitask="enqueue")
        assert x.status == "queued"
        await delete_keys(a.redis, a.prefix)
        assert await second._promote("s") is None
        rows = {run.pk: run.status async for run in Run.objects.filter(session_key="s")}
        assert (rows[w.pk], rows[x.pk]) == ("running", "queued")
        await first.stop("s")


async def test_a_run_whose_lease_lapses_while_redis_pauses_writes_is_not_reaped(own_redis, saves):
    """Redis pauses writes (``CLIENT PAUSE ... WRITE``) for longer than a
    lease: W's worker renews W's lease meanwhile, its renewal held by Redis.
    A read on B (a status) finds the lease lapsed (Redis answers an expired
    key as gone while it pauses) and reaps W: its reap's writes wait behind
    the renewal, which goes first once Redis takes writes again. The reap
    used to end W all the same, a run whose worker is alive and well."""
    import redis.asyncio as aioredis

    url = f"redis://127.0.0.1:{own_redis.port}/0"
    admin = aioredis.Redis.from_url(url)
    order: list[str] = []
    try:
        async with two_workers(url, lease_ms=1000, renew_every=0.3) as (a, b):
            w = await _start_with_row(a, _lingering(order, "w", 0), saves)
            await eventually(lambda: _has_text(b, "w "), "W did not reach Redis")
            await admin.execute_command("CLIENT", "PAUSE", 2000, "WRITE")
            await asyncio.sleep(1.3)  # A's renewal waits for Redis; the lease lapses
            state = await b.find("s", w)
            assert state is not None and state.status == "running"
            await asyncio.sleep(1)
            assert order == [] and a.driver.runs["s"].stop_reason is None
            assert await b.redis.hget(b._key("s", "run", w), "status") == b"running"
            await a.stop("s", w)
    finally:
        await admin.aclose()


async def test_a_run_that_ended_done_as_redis_lost_it_leaves_the_session_to_the_run_after_it(
    workers, saves
):
    """As `test_a_run_that_ended_as_redis_lost_it_leaves_the_session_to_the_run_in_flight`,
    but W ended by itself (``done``) on B, and X followed it on A: W's
    writer, still copying W's end when Redis lost it, writes W back (here
    called as it would be) before X's writer writes X back. W, ended, used
    to take the session back (only a run that ended stopped left it), and X
    found it taken and stopped."""
    a, b = workers
    w = await start(b, paced(["w "]), saves)
    w_run = b.driver.runs["s"]

    async def w_done() -> bool:
        state = await a.find("s", w)
        return state is not None and state.status == "done"

    await eventually(w_done, "W did not end")
    words = [f"x{i} " for i in range(60)]
    gate = asyncio.Event()

    async def x_thinks_then_talks() -> AsyncIterator[str]:
        yield "x0 x1 "
        await gate.wait()  # X's writer has nothing to write meanwhile
        for word in words[2:]:
            await asyncio.sleep(0.02)
            yield word

    x = await start(a, x_thinks_then_talks(), saves)
    subscription = await a.subscribe("s")
    await eventually(lambda: _x_streams(b), "X did not stream")
    await delete_keys(a.redis, a.prefix)
    record = {"worker": worker_id(), "status": "running", "error": "", "meta": "{}"}
    await b._resync(w_run, record)  # W's writer, still copying its end
    gate.set()
    events = await asyncio.wait_for(collect(subscription), 20)
    assert text_of(events) == "".join(words) and events[-1].data == {"status": "done"}
    assert saves.status_of(x) == "done"


async def _x_streams(backend: RedisBackend) -> bool:
    state = await backend.get("s")
    return state is not None and state.output.startswith("x0 x1 ")


async def test_a_replaced_run_whose_stop_was_lost_with_redis_does_not_win_the_session(saves):
    """X on B replaces W on A while A's stop channel is down (its listener is
    cancelled here: the message is lost), and Redis restarts empty before
    W's writer reads the stop's flag (its keys are deleted here): the flag
    is lost too. W's writer, writing as W goes on, writes W back first and
    claims the session; X's writer, at its renewal, finds the session taken
    and stopped X, the run its user sent last. B's wait asks W to stop again
    once W is back: both ended stopped. X, newer, takes the session back."""
    order: list[str] = []
    async with two_workers(renew_every=1.0) as (a, b):
        w = await start(a, _begins(order, "w", [f"w{i} " for i in range(200)]), saves)
        await eventually(lambda: _has(order, "w begins"), "W did not begin")
        await a._ensure_listener()
        assert a._listener is not None
        a._listener.cancel()
        x = await start(b, _begins(order, "x", ["x "]), saves)
        await asyncio.sleep(0.2)  # X's writer wrote X's start; it renews in a second
        await delete_keys(a.redis, a.prefix)
        await eventually(lambda: _saved(saves, x), "X was not saved", 15)
        assert (saves.status_of(x), saves.status_of(w)) == ("done", "stopped")

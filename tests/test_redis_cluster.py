"""The Redis backend on a real Redis Cluster of redis-servers of the test's
own (`tests.redis_cluster`): two backend instances stand for two workers.
(The contract every backend keeps runs on a cluster too:
tests/test_backend_contract.py, ``[redis-cluster]``.)

A command whose keys lie in several slots is refused by the cluster, and
the backend takes any refusal for Redis being unreachable and retries
quietly: so each test here fails on any warning the backend logs."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from detached_runs.events import parse_id

from .conftest import (
    Saves,
    collect,
    eventually,
    new_id,
    paced,
    positions_follow,
    terminals,
    text_of,
    two_workers,
)
from .redis_cluster import RedisClusterServers

pytest.importorskip("redis")

from detached_runs.backends.redis import SLOT_GROUPS, RedisBackend

WORDS = [f"w{i} " for i in range(40)]
FULL = "".join(WORDS)


@pytest.fixture(autouse=True)
def quiet(caplog: Any) -> Iterator[None]:
    """Fail the test if the backend logged a warning: a cross-slot command,
    refused, is logged as Redis unreachable."""
    caplog.set_level(logging.WARNING, logger="detached_runs")
    yield
    said = [r.getMessage() for r in caplog.records if r.name.startswith("detached_runs")]
    assert not said, said


@pytest.fixture
async def workers(redis_cluster: RedisClusterServers) -> AsyncIterator[Any]:
    async with two_workers(redis_cluster.url) as pair:
        yield pair


async def start(
    backend: RedisBackend,
    source: Any,
    saves: Saves,
    session: str = "s",
    owner: str = "o",
    address: str = "",
) -> str:
    run_id = new_id()
    meta = {"owner": owner, **({"address": address} if address else {})}
    await backend.start(
        session, run_id, source, start_data={"run": run_id}, meta=meta, finalize=saves
    )
    return run_id


async def test_a_run_is_followed_and_resumed_on_another_worker_with_the_same_ids(workers, saves):
    a, b = workers
    run_id = await start(a, paced([*WORDS, ("tool", {"n": 1}), *WORDS], 0.002), saves)
    on_b = await collect(await b.subscribe("s"))
    on_a = await collect(await a.subscribe("s"))
    assert text_of(on_b) == FULL + FULL and on_b[-1].data == {"status": "done"}
    assert positions_follow(on_b, run_id)
    assert [e.id for e in terminals(on_b)] == [e.id for e in terminals(on_a)]
    middle = len(on_a) // 2
    _, position = parse_id(on_a[middle].id)
    rest = await collect(await b.subscribe("s", (run_id, position)))
    assert text_of(on_a[: middle + 1]) + text_of(rest) == FULL + FULL
    assert positions_follow(rest, run_id, position) and len(terminals(rest)) == 1


async def test_runs_of_sessions_on_every_primary_are_followed_by_one_xread_per_slot_group(
    workers, redis_cluster, saves
):
    a, b = workers
    sessions = [f"s{i}" for i in range(60)]
    gate = asyncio.Event()
    for session in sessions:
        await start(a, gated(gate), saves, session=session)
    subscriptions = [await b.subscribe(session) for session in sessions]
    gate.set()
    # Every run is followed, from the few tasks of one XREAD per slot group.
    groups = {b._group(session) for session in sessions}
    assert len(b._readers) == len(groups) <= SLOT_GROUPS
    # ... whose slots lie on every primary of the cluster.
    tags = {b._key(session).partition("}")[0] + "}" for session in sessions}
    assert {redis_cluster.port_of(tag) for tag in tags} == set(redis_cluster.primaries())
    followed = await asyncio.gather(*(collect(s) for s in subscriptions))
    assert all(text_of(events) == FULL and len(terminals(events)) == 1 for events in followed)
    await eventually(lambda: _no_readers(b), "the readers did not end with their runs")


async def gated(gate: asyncio.Event, pace: float = 0.0) -> AsyncIterator[str]:
    """Half of `WORDS` (one each ``pace`` seconds), then the rest once
    ``gate`` is set."""
    for word in WORDS[: len(WORDS) // 2]:
        if pace:
            await asyncio.sleep(pace)
        yield word
    await gate.wait()
    for word in WORDS[len(WORDS) // 2 :]:
        await asyncio.sleep(0.002)
        yield word


async def _no_readers(backend: RedisBackend) -> bool:
    return all(task.done() for task in backend._readers.values())


async def test_every_key_of_a_session_lies_in_the_slot_of_its_group(redis_cluster, saves):
    sessions = [f"s{i}" for i in range(40)]
    gate = asyncio.Event()
    # Streams of at most 5 entries: the rest is compacted into each run's head.
    async with two_workers(redis_cluster.url, stream_maxlen=5) as (a, b):
        for session in sessions:
            await start(a, gated(gate), saves, session=session, owner="o", address="1.2.3.4")
        # Two runs of one group followed at once: the second wakes the group's XREAD.
        subscriptions = [await b.subscribe(session) for session in sessions]
        gate.set()
        for subscription in subscriptions:
            assert text_of(await collect(subscription)) == FULL
        keys = [key.decode() async for key in a.redis.scan_iter(match=f"*{a.prefix}*")]
        await check_slots(a, keys, sessions)


async def check_slots(a: RedisBackend, keys: list[str], sessions: list[str]) -> None:
    """Every key but the sets of runs (one key each) bears the hash tag of a
    slot group, and the keys of each session (its run's hash, log and head,
    its current run) lie in one slot, by the cluster's own ``CLUSTER
    KEYSLOT``."""
    assert any(":log:" in key for key in keys) and any(":wake:" in key for key in keys)
    untagged = [key for key in keys if not key.startswith("{")]
    assert all(key.endswith((":in-flight", ":unsaved")) for key in untagged), untagged
    tags = {key[: key.index("}") + 1] for key in keys if key.startswith("{")}
    assert tags <= {f"{{{a.prefix}:g{n}}}" for n in range(SLOT_GROUPS)}
    for session in sessions:
        session_keys = [key for key in keys if f":{session}:" in key]
        slots = {await a.redis.cluster_keyslot(key) for key in session_keys}
        assert any(":head:" in key for key in session_keys), session_keys
        assert len(slots) == 1, session_keys


async def test_a_stop_on_another_worker_stops_the_run_where_it_runs(workers):
    a, b = workers
    saves = Saves()
    run_id = await start(a, paced(WORDS * 50, 0.01), saves)
    subscription = await b.subscribe("s")
    assert await b.stop("s", run_id) is True
    events = await collect(subscription)
    assert events[-1].data == {"status": "stopped"}
    await eventually(lambda: _saved(saves, run_id), "the stopped run was not saved")
    assert saves.status_of(run_id) == "stopped"


async def _saved(saves: Saves, run_id: str) -> bool:
    return any(end.run_id == run_id for end in saves.ends)


async def test_runs_in_flight_are_counted_per_owner_and_address_on_every_worker(workers):
    a, b = workers
    gate = asyncio.Event()
    saves = Saves()
    await start(a, gated(gate), saves, session="one", owner="o")
    await start(b, gated(gate), saves, session="two", owner="o")
    await start(a, gated(gate), saves, session="three", owner="anon", address="10.0.0.1")
    assert await a.count_running("o") == await b.count_running("o") == 2
    assert await b.count_running(address="10.0.0.1") == 1
    gate.set()
    for backend, session in ((a, "one"), (b, "two"), (a, "three")):
        await collect(await backend.subscribe(session))
    # Taken out of the sets by the writer, once it wrote the end to Redis.
    await eventually(lambda: _none_counted(b), "the ended runs are still counted")


async def _none_counted(backend: RedisBackend) -> bool:
    return (await backend.count_running("o"), await backend.count_running(address="10.0.0.1")) == (
        0,
        0,
    )


async def test_a_deleted_session_leaves_no_key_and_its_followers_get_the_end(workers):
    a, b = workers
    saves = Saves()
    first = await start(a, paced(WORDS, 0.001), saves)
    await collect(await a.subscribe("s"))
    second = await start(a, paced(WORDS * 50, 0.01), saves)
    subscription = await b.subscribe("s")
    await b.delete("s", [first, second])
    events = await collect(subscription)
    assert len(terminals(events)) == 1 and events[-1].data["status"] in ("stopped", "interrupted")
    assert await a.get("s") is None and await b.get("s") is None
    left = [key async for key in a.redis.scan_iter(match=f"*{a.prefix}:*s:*")]
    assert not [key for key in left if first.encode() in key or second.encode() in key]


async def test_an_answer_on_another_worker_reaches_the_agent_through_pub_sub(workers, saves):
    """Taken at B, announced on ``<prefix>:input`` (published on one node,
    heard on another): A's agent gets it at once, not at its next look in
    the run's hash (every ``renew_every``, 3 s)."""
    a, b = workers
    got: list[Any] = []
    ids = {"run": new_id()}

    async def asking() -> AsyncIterator[str]:
        yield "asking "
        got.append(await a.ask("s", ids["run"], {"q": "?"}, 30))
        yield "answered"

    await a.start("s", ids["run"], asking(), start_data={}, meta={"owner": "o"}, finalize=saves)
    subscription = await b.subscribe("s")
    events: list[Any] = []
    while not any(e.event == "input_required" for e in events):
        events += await subscription.next_batch()
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await b.answer("s", events[-1].data["request"], {"ok": True}) is True
    rest = await collect(subscription)
    assert loop.time() - began < 1.5 and got == [{"ok": True}]
    assert [e.event for e in rest if e.event != "delta"] == ["input_received", "done"]


async def test_an_adoption_on_one_worker_reaches_the_worker_that_drives_the_run(workers, saves):
    """A visitor who logs in lands on B; A drives their run: its owner's and
    address's sets (keys of slots of their own) and A's copy of its meta
    follow."""
    a, b = workers
    gate = asyncio.Event()
    await start(a, gated(gate), saves, owner="anon:a", address="203.0.113.7")
    assert await b.count_running(address="203.0.113.7") == 1
    assert await b.adopt("anon:a", "user:1", ["s"]) == 1

    async def adopted() -> bool:
        state = await a.get("s")
        return (
            state is not None
            and state.meta.get("owner") == "user:1"
            and await b.count_running(owner="user:1") == 1
            and await b.count_running(owner="anon:a") == 0
        )

    await eventually(adopted, "worker A kept the old owner")
    assert await b.count_running(address="203.0.113.7") == 0
    gate.set()
    await collect(await a.subscribe("s"))


async def test_the_clock_of_starts_is_one_primarys(workers, redis_cluster):
    a, b = workers
    times = [await backend.now() for backend in (a, b, a, b)]
    assert times == sorted(times)
    port = redis_cluster.port_of(f"{a.prefix}:clock")
    assert a.redis.get_node_from_key(f"{a.prefix}:clock").port == port


# -- a primary that fails -------------------------------------------------------------


def said(caplog: Any, level: int) -> list[str]:
    """What the backend logged at ``level`` or above, which the test then
    takes as expected (`quiet` looks at nothing more)."""
    records = [r for r in caplog.records if r.name.startswith("detached_runs")]
    caplog.clear()
    return [r.getMessage() for r in records if r.levelno >= level]


async def test_a_stream_that_lost_its_last_entries_is_written_again_from_where_it_ends(
    workers, redis_cluster, saves, caplog
):
    """What a replica that lacked the last writes of its primary holds after
    a failover, made by hand: the writer's next append is refused (its last
    id is not the stream's) and it writes from where the stream ends, so the
    log has no hole, and no token twice."""
    a, b = workers
    gate = asyncio.Event()
    run_id = await start(a, gated(gate, pace=0.005), saves)
    log = a._key("s", "log", run_id)
    half = "".join(WORDS[: len(WORDS) // 2])
    await eventually(lambda: _logged(a, log, half), "the first half did not reach Redis")
    following = await b.subscribe("s")
    assert await a.redis.xlen(log) > 10
    lost = [entry_id for entry_id, _ in await a.redis.xrevrange(log, count=5)]
    await a.redis.xdel(log, *lost)
    top = (await a.redis.xrevrange(log, count=1))[0][0]
    await a.redis.execute_command("XSETID", log, top)
    gate.set()
    events = await collect(following)
    assert text_of(events) == FULL and positions_follow(events, run_id)
    await eventually(lambda: _logged(a, log, FULL), "the run did not reach Redis whole")
    assert await _logged(a, log, FULL, exactly=True)
    assert saves.ends[-1].output == FULL
    assert any("does not end where this worker left it" in m for m in said(caplog, logging.WARNING))


async def _logged(backend: RedisBackend, log: str, text: str, *, exactly: bool = False) -> bool:
    """Whether the deltas of a run's stream (one that was not compacted)
    begin with ``text`` (with ``exactly``: are ``text``)."""
    deltas = "".join(
        json.loads(fields[b"d"])["text"]
        for _, fields in await backend.redis.xrange(log)
        if fields[b"e"] == b"delta"
    )
    return deltas == text if exactly else deltas.startswith(text)


async def test_runs_reach_the_cluster_whole_when_a_worker_runs_out_of_connections(
    redis_cluster, caplog
):
    """A worker with 4 connections per node drives 30 runs, which all write
    at once: commands past them fail (redis-py's cluster client does not
    wait for a connection), and a failed pipeline closes every connection of
    the client, cutting commands of other runs in flight with anything (an
    AttributeError). Each writer retries until its run is in the cluster
    whole; none dies of it."""
    sessions = [f"s{i}" for i in range(30)]
    gate = asyncio.Event()
    saves = Saves()

    async def at_the_gate() -> AsyncIterator[str]:
        await gate.wait()
        for word in WORDS:
            await asyncio.sleep(0.001)
            yield word

    async with two_workers(redis_cluster.url) as (a, b):
        small = RedisBackend(
            redis_url=redis_cluster.url,
            redis_prefix=a.prefix,
            evict_after=3.0,
            connection_kwargs={"max_connections": 4},
        )
        try:
            for session in sessions:
                # One at a time (each run's start event in the cluster first):
                # a start refused for want of a connection would be a 503.
                run_id = await start(small, at_the_gate(), saves, session=session)
                log = a._key(session, "log", run_id)
                await eventually(lambda log=log: _started(a, log), "the start was not written")
            subscriptions = [await b.subscribe(session) for session in sessions]
            gate.set()
            followed = await asyncio.gather(*(collect(s) for s in subscriptions))
        finally:
            await small.shutdown(2)
    assert all(text_of(events) == FULL for events in followed)
    assert all([e.data for e in terminals(events)] == [{"status": "done"}] for events in followed)
    said(caplog, logging.WARNING)


async def _started(backend: RedisBackend, log: str) -> bool:
    return bool(await backend.redis.xlen(log))


@pytest.fixture
def replicated_cluster() -> Iterator[RedisClusterServers]:
    """A cluster of the test's own whose three primaries have a replica each,
    for a test that kills a primary."""
    servers = RedisClusterServers(masters=3, replicas=1)
    yield servers
    servers.stop()


async def test_a_primary_killed_mid_run_loses_no_token_and_doubles_none(replicated_cluster, caplog):
    """The primary of a running run's slot is killed (-9) while the run
    streams; its replica takes over. The run goes on: its followers on both
    workers, its log in the cluster afterwards, and the end saved for its
    row hold every token once, in order. (Asynchronous replication may lose
    the last writes before the kill: the writer's fenced append finds out,
    and it writes them again from its local log.)"""
    words = [f"t{i} " for i in range(300)]
    saves = Saves()
    async with two_workers(replicated_cluster.url) as (a, b):
        run_id = await start(a, paced(words, 0.01), saves)
        on_a, on_b = await a.subscribe("s"), await b.subscribe("s")
        seen = await on_b.next_batch()
        while len(text_of(seen)) < 200:
            seen += await on_b.next_batch()
        replicated_cluster.kill(replicated_cluster.port_of(a._key("s")))
        seen += await collect(on_b)
        here = await collect(on_a)
        for events in (seen, here):
            assert text_of(events) == "".join(words) and positions_follow(events, run_id)
            assert [e.data for e in terminals(events)] == [{"status": "done"}]
        await eventually(lambda: _saved(saves, run_id), "the run was not saved")
        assert saves.ends[-1].output == "".join(words) and saves.status_of(run_id) == "done"
        # A third worker, started afterwards, replays it from the cluster.
        third = RedisBackend(redis_url=replicated_cluster.url, redis_prefix=a.prefix)
        replayed = await collect(await third.subscribe("s"))
        await third.shutdown(2)
        assert text_of(replayed) == "".join(words) and replayed[-1].data == {"status": "done"}
    # Warnings, as Redis was unreachable for a while; no error (a hole in a log).
    assert not said(caplog, logging.ERROR)


def _session_off(cluster: RedisClusterServers, backend: RedisBackend, port: int) -> str:
    """A session whose keys lie on another primary than ``port``."""
    return next(f"s{i}" for i in range(100) if cluster.port_of(backend._key(f"s{i}")) != port)


async def test_a_worker_listening_on_a_primary_that_hangs_listens_again_elsewhere(
    replicated_cluster, caplog
):
    """The primary a worker's pub/sub listens on hangs (SIGSTOP: its
    connections stay open, nothing answers) and its replica takes over.
    The worker finds out (its quiet channel does not answer a PING) and
    listens on the new primary, while the old one still hangs: a message
    published then (an adoption, whose only way to the worker that drives
    the run is this channel) reaches it."""
    saves = Saves()
    gate = asyncio.Event()
    async with two_workers(replicated_cluster.url, renew_every=1.0) as (a, b):
        clock = replicated_cluster.port_of(f"{a.prefix}:clock")
        session = _session_off(replicated_cluster, a, clock)
        await start(a, gated(gate), saves, session=session, owner="anon:a")
        await eventually(lambda: _listens(replicated_cluster, a, clock), "A does not listen")
        replicated_cluster.pause(clock)
        try:
            await asyncio.to_thread(replicated_cluster.wait_taken_over, clock)
            now = replicated_cluster.port_of(f"{a.prefix}:clock")
            await eventually(
                lambda: _listens(replicated_cluster, a, now),
                "A does not listen on the primary that took over",
                timeout=30,
            )
            assert await b.adopt("anon:a", "user:1", [session]) == 1

            async def adopted_on_a() -> bool:
                return a.driver.runs[session].meta.get("owner") == "user:1"

            await eventually(adopted_on_a, "A did not hear of the adoption")
        finally:
            replicated_cluster.resume(clock)
        gate.set()
        await collect(await a.subscribe(session))
    said(caplog, logging.WARNING)


async def _listens(cluster: RedisClusterServers, backend: RedisBackend, port: int) -> bool:
    """Whether a worker (the only one that listens) listens on the node on ``port``."""
    said = await asyncio.to_thread(
        cluster.command, port, "pubsub", "numsub", f"{backend.prefix}:adopt"
    )
    return said.split()[-1] == "1"

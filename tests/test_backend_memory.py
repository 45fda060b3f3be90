"""What only the in-process backend does: its registry of runs (eviction
after the grace period, which a subscriber holds off), and the memory a
stalled subscriber does not take. The contract it shares with every backend
is in `tests/test_backend_contract.py`."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest

from detached_runs.events import Position

from .conftest import Saves, collect, eventually, new_id, paced, text_of
from .test_backend_contract import WORDS, Gate, start, wait_finished


async def test_a_stalled_subscriber_holds_no_queue(memory_backend, saves):
    words = [f"y{i} " for i in range(5000)]
    await start(memory_backend, paced(words, 0), saves)
    stalled = [await memory_backend.subscribe("s") for _ in range(10)]
    sizes_before = [sys.getsizeof(vars(s)) for s in stalled]
    await wait_finished(memory_backend)
    run = memory_backend.driver.runs["s"]
    # The log stored 5,000 deltas as one block; subscribers only hold a cursor.
    assert len(run.entries) == 3
    assert [sys.getsizeof(vars(s)) for s in stalled] == sizes_before
    assert all(s._cursor == Position(0, 0) for s in stalled)
    assert len(run.waiters) == 0
    for subscription in stalled:
        assert text_of(await collect(subscription)) == "".join(words)


async def test_start_then_stop_in_the_same_tick_still_ends_and_is_evicted(memory_backend, saves):
    run_id = await start(memory_backend, paced(WORDS), saves)
    assert await memory_backend.stop("s") is True  # the run's task has not run yet
    events = await collect(await memory_backend.subscribe("s"))
    assert [e.event for e in events] == ["start", "done"]
    assert events[-1].data == {"status": "stopped"}
    assert saves.status_of(run_id) == "stopped"
    await asyncio.sleep(0.3)
    assert len(memory_backend) == 0


async def test_run_stopped_while_waiting_for_the_previous_cleanup_still_ends(memory_backend, saves):
    memory_backend.evict_after = 0.1
    slow = Saves(delay=0.1)
    gate = Gate()
    first = await start(memory_backend, gate.agent(), slow)
    await asyncio.sleep(0.01)
    second = await start(memory_backend, paced(WORDS), slow)  # stops the first, waits for its save
    await asyncio.sleep(0.02)
    assert slow.active == 1
    assert await memory_backend.stop("s") is True
    events = await collect(await memory_backend.subscribe("s"))
    assert events[-1].data == {"status": "stopped"}
    assert slow.status_of(first) == "stopped" and slow.status_of(second) == "stopped"
    assert slow.log == [f"begin {first}", f"end {first}", f"begin {second}", f"end {second}"]

    async def evicted() -> bool:
        return len(memory_backend) == 0

    await eventually(evicted, "not evicted after the grace period")


@pytest.mark.parametrize("fails", ["raises", "returns False"])
async def test_a_failing_save_still_sends_the_terminal_event_and_is_tried_again(
    memory_backend, monkeypatch, fails
):
    monkeypatch.setattr("detached_runs.backends.driver.SAVE_AGAIN_DELAYS", (0.05,))
    attempts: list[str] = []

    async def broken(end: Any) -> bool:
        attempts.append(end.output)
        if len(attempts) < 3:
            if fails == "raises":
                raise RuntimeError("database on fire")
            return False
        return True

    await memory_backend.start(
        "s", new_id(), paced(["a "]), start_data={}, meta={}, finalize=broken
    )
    events = await collect(await memory_backend.subscribe("s"))
    assert events[-1].data == {"status": "done", "saved": False}

    # Saved at the third attempt, then evicted once the grace period (0.2 s)
    # is over; a loaded machine takes a while.
    async def saved_and_evicted() -> bool:
        return len(attempts) == 3 and len(memory_backend) == 0

    await eventually(saved_and_evicted, "not saved again, or not evicted")
    assert attempts == ["a "] * 3


async def test_finished_run_without_subscribers_is_evicted_after_the_grace_period(
    memory_backend, saves
):
    await start(memory_backend, paced(["a "]), saves)
    await wait_finished(memory_backend)
    await asyncio.sleep(0.1)
    assert len(memory_backend) == 1
    await asyncio.sleep(0.2)
    assert len(memory_backend) == 0


async def test_a_subscriber_during_the_grace_period_cancels_the_eviction(memory_backend, saves):
    await start(memory_backend, Gate().agent(), saves)
    await asyncio.sleep(0.01)
    await memory_backend.stop("s")
    await wait_finished(memory_backend)
    subscription = await memory_backend.subscribe("s")
    await asyncio.sleep(0.3)  # past the grace period, still subscribed
    assert len(memory_backend) == 1
    await subscription.aclose()  # grace already over: goes now
    assert len(memory_backend) == 0


async def test_the_grace_period_counts_from_the_end_despite_reconnects(memory_backend, saves):
    await start(memory_backend, paced(["a "]), saves)
    await wait_finished(memory_backend)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1.0
    while len(memory_backend) and loop.time() < deadline:
        await collect(await memory_backend.subscribe("s"))  # reconnect, again and again
        await asyncio.sleep(0.02)
    assert len(memory_backend) == 0
    assert loop.time() < deadline


async def test_a_stale_timer_never_evicts_a_newer_run(memory_backend, saves):
    await start(memory_backend, paced(["a "]), saves)
    await wait_finished(memory_backend)
    await asyncio.sleep(0.15)  # the first run's timer is about to fire
    gate = Gate()
    await start(memory_backend, gate.agent(), saves)
    await asyncio.sleep(0.15)
    assert len(memory_backend) == 1
    state = await memory_backend.get("s")
    assert state is not None and state.status == "running"
    gate.go.set()

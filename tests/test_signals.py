"""run_started and run_finished: who gets them, when, with what, and what a
failing receiver cannot break."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from django.dispatch import Signal
from django.utils import timezone

from detached_runs import runs
from detached_runs.models import Run
from detached_runs.runs import get_service
from detached_runs.signals import run_finished, run_started

from .agents import forever

pytestmark = pytest.mark.django_db(transaction=True)


@dataclass
class Call:
    signal: str
    receiver: str  # "sync" or "async"
    sender: Any
    run: Run
    status: str | None = None
    output: str | None = None
    saved: Run | None = None  # the row as the database had it when the receiver ran


@dataclass
class Received:
    calls: list[Call] = field(default_factory=list)

    def of(self, signal: str, receiver: str | None = None) -> list[Call]:
        return [c for c in self.calls if c.signal == signal and receiver in (None, c.receiver)]


def _connect(signal: Signal, receiver: Any, undo: list[Any]) -> None:
    signal.connect(receiver, weak=False)
    undo.append(lambda: signal.disconnect(receiver))


@pytest.fixture
def received() -> Iterator[Received]:
    """A sync and an async receiver on both signals; the sync one also reads the
    row from the database (it runs in a thread, as Django runs sync receivers)."""
    got = Received()
    undo: list[Any] = []
    for signal, name in ((run_started, "run_started"), (run_finished, "run_finished")):

        def sync_receiver(sender: Any, run: Run, name: str = name, **kwargs: Any) -> None:
            saved = Run.objects.get(pk=run.pk)
            got.calls.append(Call(name, "sync", sender, run, saved=saved, **_extra(kwargs)))

        async def async_receiver(sender: Any, run: Run, name: str = name, **kwargs: Any) -> None:
            got.calls.append(Call(name, "async", sender, run, **_extra(kwargs)))

        _connect(signal, sync_receiver, undo)
        _connect(signal, async_receiver, undo)
    yield got
    for step in undo:
        step()


def _extra(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k in ("status", "output")}


async def until_done(session_key: str) -> list[Any]:
    return [e async for e in runs.subscribe(session_key)]


async def first_delta(session_key: str) -> None:
    """Wait until the run has yielded some text."""
    async with await runs.subscribe(session_key) as subscription:
        async for event in subscription:
            if event.event == "delta":
                return


async def test_a_finished_run_is_announced_to_sync_and_async_receivers(received):
    run = await runs.start("chat", prompt="3")
    events = await until_done("chat")
    assert events[-1].data == {"status": "done"}
    for receiver in ("sync", "async"):
        [started] = received.of("run_started", receiver)
        [finished] = received.of("run_finished", receiver)
        assert started.sender is Run and finished.sender is Run
        assert started.run.pk == run.pk and started.run.status == "running"
        assert finished.run.pk == run.pk
        assert (finished.status, finished.output) == ("done", "w0 w1 w2 ")
        assert (finished.run.status, finished.run.output) == ("done", "w0 w1 w2 ")
        assert finished.run.finished_at is not None
        assert finished.run.last_event_id == events[-1].id
    # Sent after the final save: a receiver reading the row sees it ended.
    [finished] = received.of("run_finished", "sync")
    assert finished.saved is not None and finished.saved.status == "done"
    assert finished.saved.output == "w0 w1 w2 "
    # The row returned by start() is the caller's own: it is not changed behind its back.
    assert run.status == "running"


async def test_a_stopped_run_is_announced_with_its_partial_output(received):
    run = await runs.start("chat", prompt="x", agent=forever)
    await first_delta("chat")
    assert await runs.stop("chat")
    await until_done("chat")
    for receiver in ("sync", "async"):
        [finished] = received.of("run_finished", receiver)
        assert finished.run.pk == run.pk
        assert (finished.status, finished.output) == ("stopped", "thinking ")
    saved = received.of("run_finished", "sync")[0].saved
    assert saved is not None and saved.status == "stopped"


async def test_a_failed_run_is_announced_with_its_status_and_safe_error(received):
    run = await runs.start("chat", prompt="x", agent="tests.agents.failing")
    events = await until_done("chat")
    assert events[-1].data["status"] == "error"
    for receiver in ("sync", "async"):
        [finished] = received.of("run_finished", receiver)
        assert finished.run.pk == run.pk
        assert (finished.status, finished.output) == ("error", "partial ")
        assert finished.run.error == "the model is overloaded"


async def test_run_started_is_sent_before_the_agent_is_called(received):
    seen_by_agent: list[int] = []

    async def agent(ctx: Any) -> AsyncIterator[str]:
        seen_by_agent.append(len(received.of("run_started")))
        yield "hi"

    await runs.start("chat", prompt="x", agent=agent)
    await until_done("chat")
    assert seen_by_agent == [2]  # both receivers had run
    assert [c.signal for c in received.calls if c.receiver == "async"] == [
        "run_started",
        "run_finished",
    ]


async def test_a_double_send_announces_each_run_once(received):
    first = await runs.start("chat", prompt="x", agent=forever)
    second = await runs.start("chat", prompt="2")
    await until_done("chat")
    started = [c.run.pk for c in received.of("run_started", "async")]
    finished = [(c.run.pk, c.status) for c in received.of("run_finished", "async")]
    assert started == [first.pk, second.pk]
    assert finished == [(first.pk, "stopped"), (second.pk, "done")]


async def test_runs_ended_by_shutdown_are_announced_interrupted(received):
    run = await runs.start("chat", prompt="x", agent=forever)
    await first_delta("chat")
    await get_service().shutdown(5)
    [finished] = received.of("run_finished", "async")
    assert finished.run.pk == run.pk
    assert (finished.status, finished.output) == ("interrupted", "thinking ")


async def test_an_orphaned_run_is_announced_once_when_it_is_marked_interrupted(received):
    old = timezone.now() - timedelta(minutes=5)
    row = await Run.objects.acreate(
        session_key="dead", prompt="p", output="half an ans", started_at=old, updated_at=old
    )
    status = await runs.status("dead")
    assert status is not None and status.status == "interrupted"
    await until_done("dead")  # resolves the row again: already ended
    assert await runs.status("dead") is not None
    for receiver in ("sync", "async"):
        [finished] = received.of("run_finished", receiver)
        assert finished.run.pk == row.pk
        assert (finished.status, finished.output) == ("interrupted", "half an ans")
    assert received.of("run_started") == []  # its own process announced its start


async def test_a_run_another_process_already_ended_is_saved_but_not_announced_again(received):
    # Another process took the run for dead (its heartbeat looked stale), marked
    # the row interrupted and announced that; then the run's own process ends it.
    run = await runs.start("chat", prompt="x", agent=forever)
    await first_delta("chat")
    await Run.objects.filter(pk=run.pk).aupdate(status="interrupted")
    assert await runs.stop("chat")
    await until_done("chat")
    assert received.of("run_finished") == []
    row = await Run.objects.aget(pk=run.pk)
    assert (row.status, row.output) == ("stopped", "thinking ")  # the last word, as before


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_raising_receiver_breaks_neither_the_run_nor_its_save(received, caplog, kind):
    def sync_boom(sender: Any, **kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    async def async_boom(sender: Any, **kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    boom = sync_boom if kind == "sync" else async_boom
    run_started.connect(boom, weak=False)
    run_finished.connect(boom, weak=False)
    try:
        run = await runs.start("chat", prompt="3")
        events = await until_done("chat")
    finally:
        run_started.disconnect(boom)
        run_finished.disconnect(boom)
    assert events[-1].data == {"status": "done"}
    assert "".join(e.data.get("text", "") for e in events) == "w0 w1 w2 "
    row = await Run.objects.aget(pk=run.pk)
    assert (row.status, row.output) == ("done", "w0 w1 w2 ")
    # The other receivers were called all the same.
    assert len(received.of("run_started")) == 2 and len(received.of("run_finished")) == 2
    failures = [
        r
        for r in caplog.records
        if r.name == "detached_runs.runs" and r.levelno == logging.ERROR and r.exc_info
    ]
    assert [r.getMessage().split(" failed")[0].rsplit(" ", 1)[-1] for r in failures] == [
        "run_started",
        "run_finished",
    ]
    assert all(run.id.hex in r.getMessage() for r in failures)
    assert all(isinstance(r.exc_info[1], RuntimeError) for r in failures if r.exc_info)

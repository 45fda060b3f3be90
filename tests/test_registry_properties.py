"""Generated interleavings of start, token, agent error or end, stop, double stop,
subscribe at random resume points, read, disconnect and the passing of time,
checked after every step against an independent model of what each run produced.

The registry runs on an event loop whose clock is virtual: time moves only when
the machine says so, so grace periods are exact and the test never sleeps.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from detached_runs.backends.base import RunEnd
from detached_runs.backends.driver import _FINISHING
from detached_runs.backends.memory import MemoryBackend
from detached_runs.events import ORIGIN, Event, Position, parse_id
from detached_runs.exceptions import RunNotFound

GRACE = 5.0
SESSIONS = ("a", "b")
TOKENS = st.sampled_from(["a", "bb ", "é", "🙂 ", "x\n", "ω"])


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` is advanced by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def time(self) -> float:
        return self.now


@dataclass
class RunModel:
    id: str
    session: str
    commands: asyncio.Queue[tuple[str, Any]]
    items: list[Any] = field(default_factory=list)
    stop_hit: bool = False
    raised: bool = False
    saves: list[RunEnd] = field(default_factory=list)

    @property
    def text(self) -> bytes:
        return "".join(i for i in self.items if isinstance(i, str)).encode()

    def events(self) -> list[tuple[Position, Any]]:
        """The custom events the agent yielded, with where each sits in the log."""
        text, seq, out = 0, 1, []
        for item in self.items:
            if isinstance(item, str):
                text += len(item.encode())
            else:
                seq += 1
                out.append((Position(text, seq), item[1]))
        return out

    @property
    def expected_status(self) -> str:
        return "stopped" if self.stop_hit else "error" if self.raised else "done"


@dataclass
class SubModel:
    subscription: Any
    run: RunModel
    resume: Position
    received: list[Event] = field(default_factory=list)
    closed: bool = False


async def scripted(model: RunModel) -> AsyncIterator[Any]:
    while True:
        kind, value = await model.commands.get()
        if kind == "token":
            model.items.append(value)
            yield value
        elif kind == "event":
            model.items.append(("tool", {"n": value}))
            yield ("tool", {"n": value})
        elif kind == "raise":
            model.raised = True
            raise RuntimeError("scripted failure")
        else:
            return


class RegistryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = VirtualClockLoop()
        self.backend = MemoryBackend(evict_after=GRACE)
        self.runs: dict[str, RunModel] = {}
        self.subs: list[SubModel] = []
        self.seen_ids: list[str] = []
        self.saving: dict[str, int] = dict.fromkeys(SESSIONS, 0)
        self.overlaps = 0
        self.last_end = 0.0

    def teardown(self) -> None:
        async def close() -> None:
            for sub in self.subs:
                await sub.subscription.aclose()
            stopping = asyncio.ensure_future(self.backend.shutdown(10_000))
            while not stopping.done():  # saves take virtual time: let it pass
                self.loop.now += 5
                await asyncio.sleep(0)

        try:
            self.loop.run_until_complete(close())
            # Liveness: every run, however it was stopped, ended and was saved once.
            assert all(len(m.saves) == 1 for m in self.runs.values()), "a run never ended"
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    # -- helpers -----------------------------------------------------------

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def settle(self) -> None:
        async def spin() -> None:
            for _ in range(60):
                await asyncio.sleep(0)

        self.run(spin())

    def finalizer(self, model: RunModel) -> Any:
        async def save(end: RunEnd) -> None:
            self.saving[model.session] += 1
            self.overlaps += self.saving[model.session] > 1
            # A save takes (virtual) time, so later steps can land during it.
            await asyncio.sleep(0.3)
            self.saving[model.session] -= 1
            model.saves.append(end)
            self.last_end = max(self.last_end, self.loop.time())

        return save

    def live(self) -> list[RunModel]:
        return [m for m in self.runs.values() if not m.saves]

    def current(self, session: str) -> RunModel | None:
        run = self.backend.driver.runs.get(session)
        return None if run is None else self.runs[run.id]

    # -- rules -------------------------------------------------------------

    @rule(session=st.sampled_from(SESSIONS))
    def start(self, session: str) -> None:
        previous = self.backend.driver.runs.get(session)
        if previous is not None and previous.phase < _FINISHING:
            self.runs[previous.id].stop_hit = True
        model = RunModel(uuid.uuid4().hex, session, asyncio.Queue())
        self.runs[model.id] = model
        self.run(
            self.backend.start(
                session,
                model.id,
                scripted(model),
                start_data={"run": model.id},
                meta={},
                finalize=self.finalizer(model),
            )
        )
        self.settle()

    @rule(session=st.sampled_from(SESSIONS))
    def start_and_stop_in_the_same_tick(self, session: str) -> None:
        previous = self.backend.driver.runs.get(session)
        if previous is not None and previous.phase < _FINISHING:
            self.runs[previous.id].stop_hit = True
        model = RunModel(uuid.uuid4().hex, session, asyncio.Queue())
        self.runs[model.id] = model

        async def both() -> bool:
            await self.backend.start(
                session,
                model.id,
                scripted(model),
                start_data={"run": model.id},
                meta={},
                finalize=self.finalizer(model),
            )
            return await self.backend.stop(session)  # before the run's task ever ran

        assert self.run(both())
        model.stop_hit = True
        self.settle()

    @precondition(lambda self: self.live())
    @rule(
        data=st.data(),
        command=st.sampled_from(["token", "token", "token", "event", "raise", "finish"]),
    )
    def agent_does(self, data: st.DataObject, command: str) -> None:
        model = data.draw(st.sampled_from(self.live()))
        value = data.draw(TOKENS) if command == "token" else len(model.items)
        model.commands.put_nowait((command, value))
        self.settle()

    @rule(session=st.sampled_from(SESSIONS), times=st.integers(1, 2))
    def stop(self, session: str, times: int) -> None:
        for _ in range(times):  # a double click
            current = self.current(session)
            stopped = self.run(self.backend.stop(session))
            if stopped:
                assert current is not None
                current.stop_hit = True
        self.settle()

    @rule(session=st.sampled_from(SESSIONS), data=st.data())
    def subscribe(self, session: str, data: st.DataObject) -> None:
        after = data.draw(st.none() | st.sampled_from(self.seen_ids)) if self.seen_ids else None
        parsed = parse_id(after) if after else None
        try:
            subscription = self.run(self.backend.subscribe(session, parsed))
        except RunNotFound:
            assert session not in self.backend.driver.runs
            return
        model = self.runs[subscription.run_id]
        resume = parsed[1] if parsed and parsed[0] == model.id else ORIGIN
        self.subs.append(SubModel(subscription, model, resume))

    @precondition(lambda self: any(not s.closed for s in self.subs))
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        sub = data.draw(st.sampled_from([s for s in self.subs if not s.closed]))

        async def attempt() -> None:
            task = asyncio.ensure_future(sub.subscription.next_batch())
            for _ in range(5):
                await asyncio.sleep(0)
            if task.done():
                if task.exception() is None:
                    sub.received.extend(task.result())
                else:
                    assert isinstance(task.exception(), StopAsyncIteration)
            else:
                task.cancel()  # nothing new yet: the waiting reader goes away again
                await asyncio.wait([task])

        self.run(attempt())
        self.seen_ids.extend(e.id for e in sub.received[-3:])

    @precondition(lambda self: any(not s.closed for s in self.subs))
    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        sub = data.draw(st.sampled_from([s for s in self.subs if not s.closed]))
        self.run(sub.subscription.aclose())
        sub.closed = True
        self.settle()

    @rule(seconds=st.sampled_from([0.5, 2.0, GRACE, GRACE * 2, 60.0]))
    def time_passes(self, seconds: float) -> None:
        self.loop.now += seconds
        self.settle()

    # -- invariants --------------------------------------------------------

    @invariant()
    def subscribers_get_exactly_the_log_after_their_resume_point_in_order_once(self) -> None:
        for sub in self.subs:
            positions = [parse_id(e.id)[1] for e in sub.received]
            assert positions == sorted(set(positions)), "out of order or duplicated"
            assert all(p > sub.resume for p in positions)
            assert {parse_id(e.id)[0] for e in sub.received} <= {sub.run.id}
            got = "".join(e.data["text"] for e in sub.received if e.event == "delta").encode()
            rest = sub.run.text[sub.resume.text :]
            assert rest.startswith(got), "text not exactly the log after the resume point"
            customs = [e.data for e in sub.received if e.event == "tool"]
            expected = [data for at, data in sub.run.events() if at > sub.resume]
            assert customs == expected[: len(customs)]
            dones = [e for e in sub.received if e.event == "done"]
            assert len(dones) <= 1 and (not dones or sub.received[-1] is dones[0])
            if dones:
                assert got == rest
                assert dones[0].data["status"] == sub.run.expected_status

    @invariant()
    def every_run_saves_once_with_a_truthful_status_and_one_terminal_event(self) -> None:
        for model in self.runs.values():
            assert len(model.saves) <= 1
            if model.saves:
                assert model.saves[0].status == model.expected_status
                assert model.saves[0].output.encode() == model.text
        for run in self.backend.driver.runs.values():
            dones = [e for e in run.entries if isinstance(e, Event) and e.event == "done"]
            assert len(dones) == (1 if self.runs[run.id].saves else 0)

    @invariant()
    def saves_of_one_session_never_overlap(self) -> None:
        assert self.overlaps == 0

    @invariant()
    def the_registry_is_empty_once_every_grace_period_has_passed(self) -> None:
        quiet = not self.live() and all(s.closed for s in self.subs)
        if quiet and self.runs and self.loop.time() > self.last_end + GRACE:
            assert len(self.backend) == 0


RegistryMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_registry = RegistryMachine.TestCase

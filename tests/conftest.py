from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from detached_runs.backends.base import RunEnd
from detached_runs.backends.memory import MemoryBackend
from detached_runs.events import Event
from detached_runs.runs import get_service


@pytest.fixture(autouse=True)
def _fresh_service() -> Any:
    # The service keeps one backend per event loop; make each test start clean.
    get_service().reset()
    yield
    get_service().reset()


class Saves:
    """A finalize hook that records what it saved and can be made slow."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.ends: list[RunEnd] = []
        self.active = 0
        self.overlaps = 0
        self.log: list[str] = []

    async def __call__(self, end: RunEnd) -> None:
        self.active += 1
        self.overlaps += self.active > 1
        self.log.append(f"begin {end.run_id}")
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.active -= 1
        self.log.append(f"end {end.run_id}")
        self.ends.append(end)

    def status_of(self, run_id: str) -> str:
        return next(e.status for e in self.ends if e.run_id == run_id)


@pytest.fixture
def saves() -> Saves:
    return Saves()


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend(evict_after=0.2)


def new_id() -> str:
    return uuid.uuid4().hex


async def paced(words: list[str], delay: float = 0.001) -> AsyncIterator[Any]:
    for word in words:
        await asyncio.sleep(delay)
        yield word


async def collect(subscription: Any) -> list[Event]:
    return [event async for event in subscription]


def text_of(events: list[Event]) -> str:
    return "".join(e.data["text"] for e in events if e.event == "delta")


def terminals(events: list[Event]) -> list[Event]:
    return [e for e in events if e.event == "done"]

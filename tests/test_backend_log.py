"""A run's log alone (`detached_runs.backends.log`): what both backends read
and write in a process."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from detached_runs.backends.log import RunLog
from detached_runs.events import Position

from .conftest import new_id


@st.composite
def logs(draw: Any) -> list[Any]:
    """A run's items: text of 1- to 4-byte characters and custom events, in any order."""
    piece = st.text(st.sampled_from("a\u00f1\u20ac\U0001f600 "), min_size=1, max_size=30)
    event = st.builds(lambda n: ("note", {"n": n}), st.integers(0, 9))
    return draw(st.lists(st.one_of(piece, event), max_size=25))


@given(items=logs(), limit=st.integers(1, 80))
def test_reads_of_a_limited_size_add_up_to_the_whole_log_whatever_the_cuts(items, limit):
    """Read piece by piece (as a replay is, READ_CHUNK at a time), a log gives
    every character and every event once, in order, however the limit falls
    among multibyte characters and events."""

    async def check() -> None:
        run = RunLog(new_id(), "s", {})
        run.append_event("start", {})
        for item in items:
            run.append_text(item) if isinstance(item, str) else run.append_event(*item)
        run.append_event("done", {"status": "done"})
        run.mark_finished("done", "")
        run.compact()
        seen: list[Any] = []
        cursor = Position(0, 0)
        while cursor < run.position:
            batch, cursor = run.read(cursor, limit)
            assert batch
            for event in batch:
                if event.event == "delta":
                    assert len(event.data["text"].encode()) <= max(limit, 4)
                    if seen and isinstance(seen[-1], str):
                        seen[-1] += event.data["text"]
                        continue
                    seen.append(event.data["text"])
                else:
                    seen.append((event.event, event.data))
            run.check_after(cursor)  # every piece ends at a valid resume point
        expected: list[Any] = [("start", {})]
        for item in items:
            if isinstance(item, str) and isinstance(expected[-1], str):
                expected[-1] += item
            else:
                expected.append(item)
        assert seen == [*expected, ("done", {"status": "done"})]

    asyncio.run(check())

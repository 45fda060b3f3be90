"""For `tests/test_multitask_faults.py`: the test project's ASGI application on a
worker whose clock is 2 s behind the other's (and Redis's), as far as the
start time of the rows it writes goes; and an agent that says its history."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from tests.asgi import application  # sets Django up

__all__ = ["application", "history"]

SKEW = timedelta(seconds=2)


def _skew_the_clock() -> None:
    from django.utils import timezone

    from detached_runs.models import Run

    Run._meta.get_field("started_at").default = lambda: timezone.now() - SKEW


_skew_the_clock()


async def history(ctx: Any) -> AsyncIterator[Any]:
    """``history=<prompts of ctx.history>`` for the prompt "history"; else the
    suite's `words` agent."""
    if ctx.prompt == "history":
        yield "history=" + "|".join(turn.prompt for turn in ctx.history)
        return
    from tests.agents import words

    async for item in words(ctx):
        yield item

"""What the HTTP benchmarks serve (settings: bench.settings): the app at /runs/,
and the ceiling at /ceiling/ — a bare SSE view in the same process that streams
the same bytes with no registry (pre-rendered for bursts)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from django.http import HttpRequest, StreamingHttpResponse
from django.urls import include, path

from detached_runs.events import DELTA, DONE, START, Event, Position, make_id


def words(count: int) -> list[str]:
    return [f"tok{i} " for i in range(count)]


async def agent(ctx: Any) -> AsyncIterator[str]:
    """``"<tokens> <rate>"``: that many tokens, at that many per second (0: at once)."""
    count, rate = ([*ctx.prompt.split(), "0"])[:2]
    delay = 1 / float(rate) if float(rate) else 0
    for index, word in enumerate(words(int(count))):
        if delay:
            await asyncio.sleep(delay)
        elif index % 50 == 0:
            await asyncio.sleep(0)
        yield word


def _rendered(count: int) -> list[bytes]:
    run = "0" * 32
    out, text = [Event(make_id(run, Position(0, 1)), START, {"run": run, "prompt": ""}).sse], 0
    for word in words(count):
        text += len(word.encode())
        out.append(Event(make_id(run, Position(text, 1)), DELTA, {"text": word}).sse)
    out.append(Event(make_id(run, Position(text, 2)), DONE, {"status": "done"}).sse)
    return out


_CACHE: dict[int, list[bytes]] = {}


async def ceiling(request: HttpRequest) -> StreamingHttpResponse:
    """The same bytes as a run of ``count`` tokens, with no registry at all."""
    count = int(request.GET.get("tokens", "2000"))
    rate = float(request.GET.get("rate", "0"))
    frames = _CACHE.setdefault(count, _rendered(count))

    async def stream() -> AsyncIterator[bytes]:
        if rate:
            yield frames[0]
            for frame in frames[1:]:
                await asyncio.sleep(1 / rate)
                yield frame
        else:
            yield b"".join(frames)

    response = StreamingHttpResponse(stream(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    return response


urlpatterns = [
    path("runs/", include("detached_runs.urls")),
    path("ceiling/", ceiling),
]

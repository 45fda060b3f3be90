"""What the HTTP benchmarks serve (settings: bench.settings): the app at /runs/,
and next to it, in the same Django process, the ceiling: bare SSE views that
stream the same bytes with no registry, no database and no subscribers.

The agent and the ceiling read the same little language, so a scenario asks
both for the same run: ``"<tokens> <rate> [stamp] [relative] [gate=<name>]"``.

- ``rate`` tokens per second on an absolute schedule (``0``: as fast as it yields);
- ``relative`` paces as the original run manager's agent does
  (``../shared/seed-baseline/urls.py``): a token, then a pause of ``1/rate``,
  so that a loaded loop's lateness adds up and the run lasts longer than
  ``tokens/rate`` seconds, where the absolute schedule catches up;
- ``stamp`` puts ``time.monotonic()`` into each token, so the client can measure
  token latency (CLOCK_MONOTONIC is one clock for every process of the machine);
- ``gate=<name>`` waits until the client opens that gate (``POST /bench/gate/<name>/``),
  so that every subscriber is attached before the first token.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import sys
import time
import tracemalloc
import types
from collections.abc import AsyncIterator
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.urls import include, path
from django.views.decorators.csrf import csrf_exempt

from detached_runs import runs
from detached_runs.events import DELTA, DONE, START, Event, Position, make_id

_GATES: dict[str, asyncio.Event] = {}


def _gate(name: str) -> asyncio.Event:
    return _GATES.setdefault(name, asyncio.Event())


def words(count: int) -> list[str]:
    return [f"tok{i} " for i in range(count)]


def _parse(spec: str) -> tuple[int, float, bool, str | None]:
    parts = spec.split()
    count = int(parts[0]) if parts else 0
    rate = float(parts[1]) if len(parts) > 1 else 0.0
    gate = next((p.split("=", 1)[1] for p in parts if p.startswith("gate=")), None)
    return count, rate, "stamp" in parts, gate


def _token(index: int, stamp: bool) -> str:
    return f"t{index}@{time.monotonic():.6f} " if stamp else f"tok{index} "


async def tokens(spec: str) -> AsyncIterator[str]:
    """The tokens of one run, paced as ``spec`` says (shared by agent and ceiling)."""
    count, rate, stamp, gate = _parse(spec)
    if gate:
        await _gate(gate).wait()
    if rate and "relative" in spec.split():
        for index in range(count):
            yield _token(index, stamp)
            await asyncio.sleep(1 / rate)
    elif rate:
        # An absolute schedule with a random phase, so that a thousand runs do
        # not all tick at the same instant and the pace does not drift.
        began = time.monotonic() + random.random() / rate
        for index in range(count):
            delay = began + index / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            yield _token(index, stamp)
    else:
        for index, word in enumerate(words(count)):
            if index % 50 == 0:
                await asyncio.sleep(0)
            yield word


def agent(ctx: Any) -> AsyncIterator[str]:
    """The same generator the ceiling streams (an agent may return any async iterator)."""
    return tokens(ctx.prompt)


_RUN = "0" * 32


def _merged(count: int) -> bytes:
    """A finished run of ``count`` tokens as the fewest bytes that carry it:
    start, one delta, done. Nothing can send less, so it bounds the app above."""
    text = "".join(words(count))
    size = len(text.encode())
    return b"".join(
        [
            Event(make_id(_RUN, Position(0, 1)), START, {"run": _RUN, "prompt": ""}).sse,
            Event(make_id(_RUN, Position(size, 1)), DELTA, {"text": text}).sse,
            Event(make_id(_RUN, Position(size, 2)), DONE, {"status": "done"}).sse,
        ]
    )


_MERGED: dict[int, bytes] = {}


async def ceiling(request: HttpRequest) -> StreamingHttpResponse:
    """``?spec=...``: the same run as the agent's, with no registry at all. A
    burst (rate 0) is pre-rendered and written once; a paced run is the agent
    streamed straight into the response, one event per token."""
    spec = request.GET.get("spec", "2000 0")
    count, rate, _stamp, gate = _parse(spec)

    async def stream() -> AsyncIterator[bytes]:
        start = Event(make_id(_RUN, Position(0, 1)), START, {"run": _RUN, "prompt": spec})
        if not rate:
            yield b""  # headers now, as the app does
            if gate:
                await _gate(gate).wait()
            yield _MERGED.setdefault(count, _merged(count))
            return
        yield start.sse
        size = 0
        async for token in tokens(spec):
            size += len(token.encode())
            yield Event(make_id(_RUN, Position(size, 1)), DELTA, {"text": token}).sse
        yield Event(make_id(_RUN, Position(size, 2)), DONE, {"status": "done"}).sse

    response = StreamingHttpResponse(stream(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


@csrf_exempt
async def ceiling_start(request: HttpRequest) -> JsonResponse:
    """The ceiling of a start: a POST answered 202, with no row and no registry."""
    json.loads(request.body or b"{}")
    return JsonResponse({"id": _RUN, "status": "running"}, status=202)


@csrf_exempt
async def open_gate(request: HttpRequest, name: str) -> HttpResponse:
    _gate(name).set()
    return HttpResponse(status=204)


# -- memory ----------------------------------------------------------------

_OPAQUE = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.CodeType,
    asyncio.AbstractEventLoop,
)


def deep_size(root: object, stop: set[int]) -> int:
    """Bytes reachable from ``root`` (sys.getsizeof over gc referents), not
    counting what is shared with the rest of the process: code, types, modules,
    the event loop, the backend and anything in ``stop``."""
    seen = set(stop)
    pending: list[object] = [root]
    total = 0
    while pending:
        obj = pending.pop()
        if id(obj) in seen or isinstance(obj, _OPAQUE):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        pending.extend(gc.get_referents(obj))
    return total


async def memory(request: HttpRequest) -> JsonResponse:
    """What the registry holds for ``?session=``: the run's bytes (as
    ``deep_size`` counts them), its output's size and its subscribers; and the
    process's traced memory when it runs under ``PYTHONTRACEMALLOC``."""
    gc.collect()
    backend: Any = runs.get_service().backend
    held = output = subscribers = 0
    key = request.GET.get("session")
    run = await backend.current_log(key) if key else None
    if run is not None:
        stop = {
            id(backend),
            id(backend.driver),
            id(runs.get_service()),
            id(asyncio.get_running_loop()),
        }
        held = deep_size(run, stop)
        output = len(run.output().encode())
        subscribers = run.subscribers
    traced = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else None
    return JsonResponse(
        {"held": held, "output": output, "subscribers": subscribers, "traced": traced}
    )


async def plain(request: HttpRequest) -> JsonResponse:
    """A plain page of the same site, through the whole middleware stack:
    what a start's latency is held against (`bench/starts.py`)."""
    return JsonResponse({"ok": True})


urlpatterns = [
    path("bench/plain/", plain),
    path("runs/", include("detached_runs.urls")),
    path("ceiling/", ceiling),
    path("ceiling/start/", ceiling_start),
    path("bench/gate/<str:name>/", open_gate),
    path("bench/memory/", memory),
]

"""Benchmark of the memory backend alone (no Django, no HTTP): fan-out, replay, memory.

    .venv/bin/python bench/backend.py [--repeat 5]

Prints medians of several repetitions. The full HTTP suite against a bare-SSE
ceiling is bench work of a later step; this measures what the registry itself
costs per token and per subscriber.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from detached_runs.backends.base import RunEnd
from detached_runs.backends.memory import MemoryBackend


async def _nothing(end: RunEnd) -> None:
    return None


async def _finished(backend: MemoryBackend) -> None:
    subscription = await backend.subscribe("s")
    async for _ in subscription:
        pass


async def burst(words: int) -> AsyncIterator[str]:
    for i in range(words):
        yield f"tok{i} "
        if i % 50 == 0:
            await asyncio.sleep(0)  # let subscribers in, as a real agent's awaits do


async def fan_out(subscribers: int, tokens: int) -> float:
    """Tokens per second delivered to every subscriber (subscriber-tokens / s)."""
    backend = MemoryBackend(evict_after=60)
    run_id = uuid.uuid4().hex
    gate = asyncio.Event()

    async def source() -> AsyncIterator[str]:
        await gate.wait()
        async for word in burst(tokens):
            yield word

    await backend.start("s", run_id, source(), start_data={}, meta={}, finalize=_nothing)
    subs = [await backend.subscribe("s") for _ in range(subscribers)]

    async def drain(sub: Any) -> int:
        size = 0
        async for batch in sub.batches():
            for event in batch:
                size += len(event.sse)
        return size

    tasks = [asyncio.create_task(drain(s)) for s in subs]
    begin = time.perf_counter()
    gate.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - begin
    return subscribers * tokens / elapsed


async def replay(tokens: int) -> tuple[float, int]:
    """Seconds to replay a finished run to one subscriber, and how many events."""
    backend = MemoryBackend(evict_after=60)
    await backend.start(
        "s", uuid.uuid4().hex, burst(tokens), start_data={}, meta={}, finalize=_nothing
    )
    await _finished(backend)
    begin = time.perf_counter()
    sub = await backend.subscribe("s")
    events = [e async for e in sub]
    wire = b"".join(e.sse for e in events)
    elapsed = time.perf_counter() - begin
    assert wire
    return elapsed, len(events)


async def held_memory(tokens: int) -> tuple[int, int]:
    """Bytes the registry holds for one finished run, and its output's size."""
    gc.collect()
    tracemalloc.start()
    backend = MemoryBackend(evict_after=60)
    snapshot = tracemalloc.take_snapshot()
    await backend.start(
        "s", uuid.uuid4().hex, burst(tokens), start_data={}, meta={}, finalize=_nothing
    )
    await _finished(backend)
    await asyncio.sleep(0.01)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    held = sum(
        s.size_diff
        for s in after.compare_to(snapshot, "filename")
        if "detached_runs" in str(s.traceback)
    )
    output = len("".join(f"tok{i} " for i in range(tokens)).encode())
    return held, output


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    rows = []
    for subscribers, tokens in ((1, 20_000), (100, 2_000), (500, 2_000)):
        rates = [asyncio.run(fan_out(subscribers, tokens)) for _ in range(args.repeat)]
        rows.append(
            (
                f"fan-out {subscribers} subs x {tokens} tokens",
                f"{statistics.median(rates):,.0f} subscriber-tokens/s",
            )
        )
    results = [asyncio.run(replay(4000)) for _ in range(args.repeat)]
    rows.append(
        (
            "replay finished 4,000-token run",
            f"{statistics.median(r[0] for r in results) * 1000:.2f} ms, {results[0][1]} events",
        )
    )
    held, output = asyncio.run(held_memory(4000))
    rows.append(
        (
            "memory of finished 4,000-token run",
            f"{held:,} B held for {output:,} B output ({held / output:.2f}x)",
        )
    )
    width = max(len(name) for name, _ in rows)
    print(f"Python {sys.version.split()[0]}, median of {args.repeat}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()

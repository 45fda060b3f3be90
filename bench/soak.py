"""Soak: thousands of short runs with subscribers coming and going; does memory
return to its baseline once the grace period has passed?

    .venv/bin/python bench/soak.py [--runs 5000] [--concurrency 200] [--grace 0.5]

Drives the memory backend alone (the registry is what could leak), with real
tasks and real sleeps. Prints traced Python memory (tracemalloc) and RSS at the
baseline, at the peak, and after the grace period, plus how many runs the
registry still holds.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import random
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
from detached_runs.exceptions import RunNotFound


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def agent(tokens: int, rng: random.Random) -> AsyncIterator[Any]:
    for i in range(tokens):
        await asyncio.sleep(rng.random() * 0.002)
        yield f"token{i} "
        if i == tokens // 2 and rng.random() < 0.2:
            yield ("tool", {"name": "search", "i": i})
    if rng.random() < 0.05:
        raise RuntimeError("agent failure (part of the soak)")


async def _saved(end: RunEnd) -> None:
    await asyncio.sleep(0)


async def subscriber(backend: MemoryBackend, session: str, rng: random.Random) -> None:
    """Joins at a random moment, reads for a while or to the end, or vanishes."""
    await asyncio.sleep(rng.random() * 0.05)
    try:
        subscription = await backend.subscribe(session)
    except RunNotFound:
        return
    try:
        async for batch in subscription.batches():
            if rng.random() < 0.05:
                return  # the tab was closed mid-answer
            if batch and rng.random() < 0.1:
                await asyncio.sleep(0.01)  # a slow reader
    finally:
        await subscription.aclose()


async def one_run(backend: MemoryBackend, index: int, rng: random.Random) -> None:
    session = f"s{index % 997}"  # sessions are reused: double sends happen
    await backend.start(
        session,
        uuid.uuid4().hex,
        agent(rng.randint(20, 80), rng),
        start_data={"run": index},
        meta={"owner": "soak"},
        finalize=_saved,
    )
    if rng.random() < 0.05:
        await backend.stop(session)
    await asyncio.gather(*(subscriber(backend, session, rng) for _ in range(rng.randint(0, 3))))


async def soak(runs: int, concurrency: int, grace: float, rounds: int) -> None:
    rng = random.Random(7)
    backend = MemoryBackend(evict_after=grace)
    # Warm up (imports, caches, allocator pools), then take the baseline.
    await asyncio.gather(*(one_run(backend, i, rng) for i in range(50)))
    await asyncio.sleep(grace + 0.5)
    gc.collect()
    base_traced, base_rss = tracemalloc.get_traced_memory()[0], rss()
    print(f"{runs:,} runs a round, {concurrency} at a time, grace {grace} s")
    print(f"baseline: traced {base_traced / 1024:,.0f} KiB, RSS {base_rss / 2**20:.1f} MiB")
    semaphore = asyncio.Semaphore(concurrency)

    async def bounded(i: int) -> None:
        async with semaphore:
            await one_run(backend, i, rng)

    for round_ in range(1, rounds + 1):
        tracemalloc.reset_peak()
        began = time.perf_counter()
        await asyncio.gather(*(bounded(i) for i in range(runs)))
        busy = time.perf_counter() - began
        peak, held = tracemalloc.get_traced_memory()[1], len(backend)
        while len(backend) and time.perf_counter() - began < busy + grace * 4 + 5:  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # the grace period passes for the last runs
        await asyncio.sleep(0.2)
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0]
        print(
            f"round {round_}: {busy:.1f} s of load; peak traced {peak / 1024:,.0f} KiB, "
            f"{held} runs held at the end of the load, {len(backend)} after grace; "
            f"after grace traced {traced / 1024:,.0f} KiB "
            f"({(traced - base_traced) / 1024:+,.0f} KiB on baseline), "
            f"RSS {rss() / 2**20:.1f} MiB"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--grace", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("detached_runs").setLevel(logging.CRITICAL)  # the 5% failing agents
    tracemalloc.start()
    asyncio.run(soak(args.runs, args.concurrency, args.grace, args.rounds))


if __name__ == "__main__":
    main()

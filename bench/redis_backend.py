"""Cross-worker delivery through Redis next to the memory backend, in one run.

    .venv/bin/python bench/redis_backend.py [--repeat 5] [--redis redis://127.0.0.1:6379/0]

Two RedisBackend instances in one process stand for two workers: the run is
driven by A, its subscribers are on B, so every event crosses Redis (writer
XADD on A, the one XREAD BLOCK reader on B, fan-out from B's mirror). Both
"workers" share one clock, so a token's latency is its arrival on B minus the
moment A's agent yielded it. The memory backend is measured the same way with
its subscribers in the same process. Prints medians over --repeat runs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from detached_runs.backends.base import BaseBackend, RunEnd
from detached_runs.backends.memory import MemoryBackend
from detached_runs.backends.redis import RedisBackend


async def _saved(end: RunEnd) -> None:
    return None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def paced_latency(
    driver: Any, follower: Any, tokens: int, rate: float, subscribers: int
) -> list[float]:
    """Per-token latency (s) at a realistic pace, over every subscriber."""
    sent: dict[str, float] = {}
    gate = asyncio.Event()

    async def agent() -> AsyncIterator[str]:
        await gate.wait()
        for i in range(tokens):
            await asyncio.sleep(1 / rate)
            word = f"t{i} "
            sent[word] = time.perf_counter()
            yield word

    session = uuid.uuid4().hex[:8]
    await driver.start(session, uuid.uuid4().hex, agent(), start_data={}, meta={}, finalize=_saved)
    subs = [await follower.subscribe(session) for _ in range(subscribers)]
    latencies: list[float] = []

    async def read(sub: Any) -> None:
        async for batch in sub.batches():
            now = time.perf_counter()
            for event in batch:
                if event.event == "delta":
                    # A merged delta carries several tokens: each one's own latency.
                    for word in event.data["text"].split(" "):
                        if word:
                            latencies.append(now - sent[word + " "])

    readers = [asyncio.create_task(read(s)) for s in subs]
    await asyncio.sleep(0.2)
    gate.set()
    await asyncio.gather(*readers)
    return latencies


async def burst_throughput(driver: Any, follower: Any, tokens: int, subscribers: int) -> float:
    """Subscriber-tokens per second with the agent yielding as fast as it can."""
    gate = asyncio.Event()

    async def agent() -> AsyncIterator[str]:
        await gate.wait()
        for i in range(tokens):
            yield f"t{i} "
            if i % 50 == 0:
                await asyncio.sleep(0)

    session = uuid.uuid4().hex[:8]
    await driver.start(session, uuid.uuid4().hex, agent(), start_data={}, meta={}, finalize=_saved)
    subs = [await follower.subscribe(session) for _ in range(subscribers)]

    async def drain(sub: Any) -> None:
        async for _ in sub.batches():
            pass

    readers = [asyncio.create_task(drain(s)) for s in subs]
    await asyncio.sleep(0.2)
    began = time.perf_counter()
    gate.set()
    await asyncio.gather(*readers)
    return subscribers * tokens / (time.perf_counter() - began)


async def measure(kind: str, url: str) -> dict[str, float]:
    prefix = f"dr-bench-{uuid.uuid4().hex[:6]}"
    a: BaseBackend
    b: BaseBackend
    if kind == "memory":
        a = b = MemoryBackend(evict_after=5)
    else:
        a = RedisBackend(redis_url=url, redis_prefix=prefix, evict_after=5)
        b = RedisBackend(redis_url=url, redis_prefix=prefix, evict_after=5)
    try:
        latencies = await paced_latency(a, b, tokens=300, rate=100, subscribers=20)
        rate = await burst_throughput(a, b, tokens=5000, subscribers=100)
    finally:
        await a.shutdown(5)
        if b is not a:
            await b.shutdown(5)
        if kind == "redis":
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(url)
            keys = [k async for k in client.scan_iter(match=f"*{prefix}*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()
    return {
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
        "throughput": rate,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"memory": [], "redis": []}
    for _ in range(args.repeat):
        for kind in results:  # interleaved, so both see the same machine
            results[kind].append(asyncio.run(measure(kind, args.redis)))
    print(f"Python {sys.version.split()[0]}, medians of {args.repeat} runs")
    print("backend  latency p50   latency p99   burst throughput (100 subscribers)")
    for kind, runs in results.items():
        p50 = statistics.median(r["p50"] for r in runs) * 1000
        p99 = statistics.median(r["p99"] for r in runs) * 1000
        rate = statistics.median(r["throughput"] for r in runs)
        print(f"{kind:<8} {p50:8.2f} ms   {p99:8.2f} ms   {rate:14,.0f} subscriber-tokens/s")
    ratio = statistics.median(r["throughput"] for r in results["redis"]) / statistics.median(
        r["throughput"] for r in results["memory"]
    )
    print(f"redis/memory throughput: {ratio:.2f}")


if __name__ == "__main__":
    main()

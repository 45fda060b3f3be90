"""Redis connections of a worker that follows many runs driven by another,
and the cross-worker latency of their tokens, at 10, 100 and 1,000 runs.

    .venv/bin/python bench/followers.py [--runs 10,100,1000] [--seconds 10] [--rate 5]

Two processes, each with a RedisBackend, are two workers: worker A (a child
process) drives every run, worker B (this one) has one subscriber on each,
so every token crosses Redis. Each run yields ``--rate`` tokens a second for
``--seconds``. A stamps each token with the wall clock as its agent yields
it; its latency is its arrival at B's subscriber minus that stamp.

B's connections are counted by Redis (``CLIENT LIST``, by B's client name),
sampled every 0.25 s while the runs stream: the most it held, and how many
of them were blocked in an XREAD at that moment. Run it on two checkouts to
compare (before Step 13 a worker held one blocked XREAD per followed run).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.redis_backend import _saved, percentile
from detached_runs.backends.redis import RedisBackend


async def connections(probe: Any, name: str) -> tuple[int, int]:
    """(connections named ``name``, how many of them are blocked in XREAD)."""
    clients = await probe.client_list()
    mine = [c for c in clients if c.get("name") == name]
    return len(mine), sum(c.get("cmd") == "xread" for c in mine)


async def drive(url: str, prefix: str, runs: int, seconds: float, rate: float) -> None:
    """Worker A (``--drive``, a process of its own): start ``runs`` runs,
    say ``ready``, and once told ``go`` on stdin let each yield ``rate``
    tokens a second for ``seconds``, every token stamped with the wall clock
    (``r<run>t<i>@<time.time()>``)."""
    a = RedisBackend(redis_url=url, redis_prefix=prefix, evict_after=30.0)
    gate = asyncio.Event()
    tokens = int(seconds * rate)

    async def agent(run: int) -> AsyncIterator[str]:
        await gate.wait()
        for i in range(tokens):
            await asyncio.sleep(1 / rate)
            yield f"r{run}t{i}@{time.time():.6f} "

    for i in range(runs):
        await a.start(f"s{i}", uuid.uuid4().hex, agent(i), start_data={}, meta={}, finalize=_saved)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    gate.set()
    while len(a):  # until every run ended and was evicted, or a while after
        await asyncio.sleep(0.5)
        if all(run.closed for run in a.driver.runs.values()):
            break
    await a.shutdown(5)


async def measure(url: str, runs: int, seconds: float, rate: float) -> dict[str, float]:
    prefix = f"dr-bench-followers-{uuid.uuid4().hex[:8]}"
    name = f"bench-b-{uuid.uuid4().hex[:6]}"
    worker_a = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        *("--drive", str(runs), "--prefix", prefix, "--redis", url),
        *("--seconds", str(seconds), "--rate", str(rate)),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert worker_a.stdout is not None and worker_a.stdin is not None
    assert (await worker_a.stdout.readline()).strip() == b"ready"
    b = RedisBackend(
        redis_url=url,
        redis_prefix=prefix,
        evict_after=30.0,
        connection_kwargs={"client_name": name},
    )
    probe = RedisBackend(redis_url=url, redis_prefix=prefix).redis
    subscriptions = [await b.subscribe(f"s{i}") for i in range(runs)]
    latencies: list[float] = []

    async def read(subscription: Any) -> None:
        while True:
            batch = await subscription.next_batch()
            now = time.time()
            for event in batch:
                if event.event == "delta":
                    # A batch may join several tokens' deltas: split them again.
                    for word in event.data["text"].split(" ")[:-1]:
                        latencies.append(now - float(word.partition("@")[2]))
                elif event.event == "done":
                    return

    most = (0, 0)

    async def sample() -> None:
        nonlocal most
        while True:
            most = max(most, await connections(probe, name))
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample())
    worker_a.stdin.write(b"go\n")
    await worker_a.stdin.drain()
    await asyncio.gather(*(read(s) for s in subscriptions))
    sampler.cancel()
    for subscription in subscriptions:
        await subscription.aclose()
    await b.shutdown(5)
    await worker_a.wait()
    keys = [k async for k in probe.scan_iter(match=f"*{prefix}*")]
    if keys:
        await probe.delete(*keys)
    await probe.aclose()
    return {
        "connections": most[0],
        "blocked_xread": most[1],
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "tokens": len(latencies),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="10,100,1000")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=5.0, help="tokens per second per run")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--drive", type=int, help=argparse.SUPPRESS)  # worker A
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive is not None:
        asyncio.run(drive(args.redis, args.prefix, args.drive, args.seconds, args.rate))
        return
    print(f"{'runs':>6} {'B conns':>8} {'XREADs':>7} {'p50 ms':>8} {'p99 ms':>8} {'tokens':>8}")
    for runs in (int(n) for n in args.runs.split(",")):
        figures = asyncio.run(measure(args.redis, runs, args.seconds, args.rate))
        print(
            f"{runs:>6} {figures['connections']:>8} {figures['blocked_xread']:>7} "
            f"{figures['p50_ms']:>8.1f} {figures['p99_ms']:>8.1f} {figures['tokens']:>8}"
        )
        expected = runs * int(args.seconds * args.rate)
        if figures["tokens"] != expected:
            print(f"       (got {figures['tokens']} tokens of {expected})", file=sys.stderr)


if __name__ == "__main__":
    main()

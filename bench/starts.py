"""Starts under load, next to the original in-memory run manager
(`../shared/seed-baseline/`), in one invocation (Step 13's speed scenario).

    .venv/bin/python bench/starts.py [--runs 1000] [--tokens 300] [--rate 30]

On each site, under the same daphne and the same client: ``--runs`` runs
started one after another over HTTP (each start awaited before the next is
sent), each followed by one SSE subscriber from its start, each streaming
``--tokens`` tokens at ``--rate`` a second. Meanwhile a plain ``GET`` of the
same site (a JSON view through the whole middleware stack) every 0.1 s.

Reported per site: the whole scenario's seconds (first start to last
terminal event), a start's latency p50/p99 (its request to its answer), the
time from a start's request to its first text byte at the subscriber
p50/p99, the plain GET's p50/p99, and the tokens' latency p99 (yielded by the
agent to read by the subscriber); then the ratios. Figures of one
invocation: the machine is shared, its absolute times swing.

The detached_runs side is `bench/site.py` (SQLite in a scratch file, or
``BENCH_DATABASE_URL``); the original's is the seed's own site, started from
its folder (``--seed``) with this virtualenv.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sse import Client, _key, launch, request, start_server

SEED = Path(__file__).resolve().parent.parent.parent / "shared" / "seed-baseline"


class Subscriber(asyncio.Protocol):
    """One SSE response read as it arrives: when its first text came, each
    token's latency (by the stamp ``pattern`` finds, on the ``clock``), and
    when the ``end`` marker came."""

    def __init__(self, pattern: re.Pattern[bytes], clock: Callable[[], float], end: bytes) -> None:
        self.pattern, self.clock, self.end = pattern, clock, end
        self.first_text: float | None = None
        self.latencies: list[float] = []
        self.finished: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._tail = b""

    def data_received(self, data: bytes) -> None:
        now, stamp_now = time.perf_counter(), self.clock()
        text = self._tail + data
        found = self.pattern.findall(text)
        if found and self.first_text is None:
            self.first_text = now
        self.latencies += [stamp_now - float(s) for s in found]
        # A stamp cut between two reads is read with the next one.
        self._tail = text[-64:] if not text.endswith(b"\n\n") else b""
        if self._tail:
            self._tail = self._tail[self._tail.rfind(b"\n\n") + 2 :]
        if self.end in text and not self.finished.done():
            self.finished.set_result(now)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished.done():
            self.finished.set_exception(ConnectionError(f"the stream ended early: {exc}"))


async def subscribe(port: int, path: str, headers: dict[str, str], side: Side) -> Subscriber:
    loop = asyncio.get_running_loop()
    transport, subscriber = await loop.create_connection(
        lambda: Subscriber(side.pattern, side.clock, side.end), "127.0.0.1", port
    )
    head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    transport.write((head + "\r\n").encode())
    return subscriber


class Side:
    """How one site is started, followed and probed."""

    pattern: re.Pattern[bytes]
    clock: Callable[[], float]
    end: bytes

    def __init__(self, port: int) -> None:
        self.port = port

    async def start(self, key: str, tokens: int, rate: float) -> None:
        raise NotImplementedError

    def events(self, key: str) -> tuple[str, dict[str, str]]:
        raise NotImplementedError

    plain = "/"


class App(Side):
    # bench/site.py's agent: "t<i>@<time.monotonic()> " per token with "stamp".
    pattern = re.compile(rb"t\d+@([0-9.]+) ")
    clock = staticmethod(time.monotonic)
    end = b"event: done"
    plain = "/bench/plain/"

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.client = Client(port)

    async def start(self, key: str, tokens: int, rate: float) -> None:
        await self.client.start(key, f"{tokens} {rate} stamp")

    def events(self, key: str) -> tuple[str, dict[str, str]]:
        return f"/runs/{key}/events/", self.client.cookie()


class Seed(Side):
    # The seed's agent: data: {"delta": "tok ", "i": <i>, "t": <time.time()>}.
    pattern = re.compile(rb'"t": ([0-9.]+)\}')
    clock = staticmethod(time.time)
    end = b"[DONE]"
    plain = "/noop/plain"

    async def start(self, key: str, tokens: int, rate: float) -> None:
        reply = await request(self.port, "GET", f"/start/{key}?tokens={tokens}&rate={rate}")
        assert reply.status == 200, reply.body

    def events(self, key: str) -> tuple[str, dict[str, str]]:
        return f"/events/{key}", {}


def percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] * 1000, ordered[int(len(ordered) * 0.99)] * 1000


async def scenario(side: Side, runs: int, tokens: int, rate: float) -> dict[str, float]:
    if isinstance(side, App):
        await side.client.start(_key(), "1 0")  # the session cookie, before the load
    plain: list[float] = []
    done = asyncio.Event()

    async def probe() -> None:
        while not done.is_set():
            began = time.perf_counter()
            reply = await request(side.port, "GET", side.plain)
            assert reply.status == 200, reply.status
            plain.append(time.perf_counter() - began)
            await asyncio.sleep(0.1)

    probing = asyncio.create_task(probe())
    starts: list[float] = []
    first_text: list[float] = []
    subscribers: list[Subscriber] = []
    watchers: list[Awaitable[None]] = []

    async def watch(subscriber: Subscriber, began: float) -> None:
        await subscriber.finished
        assert subscriber.first_text is not None
        first_text.append(subscriber.first_text - began)

    scenario_began = time.perf_counter()
    for _ in range(runs):
        key = _key()
        began = time.perf_counter()
        await side.start(key, tokens, rate)
        starts.append(time.perf_counter() - began)
        path, headers = side.events(key)
        subscriber = await subscribe(side.port, path, headers, side)
        subscribers.append(subscriber)
        watchers.append(asyncio.ensure_future(watch(subscriber, began)))
    await asyncio.gather(*watchers)
    took = time.perf_counter() - scenario_began
    done.set()
    await probing
    tokens_read = [lat for s in subscribers for lat in s.latencies]
    assert len(tokens_read) == runs * tokens, (len(tokens_read), runs * tokens)
    figures = {"seconds": took}
    for name, values in (("start", starts), ("first text", first_text), ("plain GET", plain)):
        figures[f"{name} p50"], figures[f"{name} p99"] = percentiles(values)
    figures["token p99"] = percentiles(tokens_read)[1]
    return figures


def start_seed() -> tuple[subprocess.Popen[bytes], int]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    database = Path(tempfile.mkdtemp(prefix="seed-bench-")) / "seed.sqlite3"
    env = dict(os.environ, SEED_DB=str(database), DJANGO_SETTINGS_MODULE="settings", PYTHONPATH=".")
    subprocess.run(
        [sys.executable, "-m", "django", "migrate", "--noinput", "-v0"],
        env=env,
        cwd=SEED,
        check=True,
    )
    daphne = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port)]
    return launch([*daphne, "asgi:application"], env, SEED, port), port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--rate", type=float, default=30.0)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    for name, begin, kind in (
        ("original", start_seed, Seed),
        ("detached_runs", start_server, App),
    ):
        process, port = begin()
        try:
            results[name] = asyncio.run(scenario(kind(port), args.runs, args.tokens, args.rate))
        finally:
            process.terminate()
            process.wait(10)
    original, ours = results["original"], results["detached_runs"]
    print(f"{'':<18}{'original':>12}{'detached_runs':>15}{'ratio':>8}")
    for figure in original:
        print(
            f"{figure:<18}{original[figure]:>12.1f}{ours[figure]:>15.1f}"
            f"{ours[figure] / original[figure]:>8.2f}"
        )
    print(
        f"scenario speed-up over the original: {original['seconds'] / ours['seconds']:.2f}x;"
        f" start p99 / plain GET p99: {ours['start p99'] / ours['plain GET p99']:.2f}"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()

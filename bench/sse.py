"""The HTTP benchmark suite: every scenario of Step 5 over a real daphne process
on loopback, with a cheap load client (raw asyncio sockets), each next to its
ceiling — a bare SSE view in the same Django process that streams the same run
with no registry (see bench/site.py). Prints one table of medians.

    .venv/bin/python bench/sse.py                  # everything, medians of 3
    .venv/bin/python bench/sse.py --only burst,replay --repeat 5
    .venv/bin/python bench/sse.py --quick          # smaller loads, one repetition

Scenarios (the goals are those of the Step 5 issue):

- burst: 1 run, 500 subscribers attached before the first token, 2,000 tokens
  as fast as the agent yields; subscriber-tokens/s vs the ceiling's.
- capacity: 1,000 runs at once, 1 subscriber each, 300 tokens at 30 tokens/s;
  share of the demanded 30,000 tokens/s delivered, and token latency.
- replay: reconnect with no Last-Event-ID to a finished 4,000-token run.
- resume: reconnect mid-run with Last-Event-ID: first event, exact text.
- memory: what the registry holds for a finished 4,000-token run.
- stalled: 10 subscribers that never read a 20,000-token run; the server's
  traced memory they hold (a second daphne, under PYTHONTRACEMALLOC).
- start: POST start to the first byte of the stream's start event, at 50/s.
- starts: 1,000 runs started one after another over HTTP (each start awaited
  before the next), each streaming 300 tokens at 30/s to one SSE subscriber,
  while the earlier ones stream; a start's latency and the time from its POST
  to the first text byte at its subscriber, p50/p99, and a plain GET's p99
  meanwhile. Its ceiling is the same sequence against the bare views.
  (`bench/starts.py` runs it next to the original run manager.)
- together: 200 starts sent at once (``--together``; each a session of its
  own) while as many runs stream; a start's latency p50/p99, next to as many
  POSTs at once to the ceiling's start. ``BENCH_DATABASE_THREADS`` sets
  ``DATABASE_THREADS``.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import functools
import json
import os
import re
import resource
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent


# -- the load client ---------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: bytes = b""
    first_byte: float = 0.0  # the status line
    first_event: float = 0.0  # the first byte of an event
    last_byte: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)

    def events(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        current: dict[str, object] = {}
        for line in self.body.decode().split("\n"):
            if not line:
                if current:
                    out.append(current)
                current = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                current[name] = json.loads(value) if name == "data" else value
        return out


def _dechunk(raw: bytes) -> bytes:
    out, rest = [], raw
    while rest:
        size, found, rest = rest.partition(b"\r\n")
        if not found or not size.strip():
            break  # a partial read that ended inside a chunk header
        length = int(size, 16)
        if length == 0:
            break
        out.append(rest[:length])
        rest = rest[length + 2 :]
    return b"".join(out)


def _head(method: str, path: str, headers: dict[str, str] | None, body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def request(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    read_for: float | None = None,
    until: bytes | None = None,
) -> Reply:
    """One request on its own connection; reads to the end, for ``read_for``
    seconds, or until ``until`` shows up in the body."""
    began = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_head(method, path, headers, body))
    head = await reader.readuntil(b"\r\n\r\n")
    first = time.perf_counter() - began
    status = int(head.split(b" ", 2)[1])
    parsed: dict[str, str] = {}
    for line in head.decode().split("\r\n")[1:]:
        if ": " in line:
            k, v = line.split(": ", 1)
            key = k.lower()
            parsed[key] = parsed.get(key, "") + ("; " if key in parsed else "") + v
    chunks: list[bytes] = []
    first_event = 0.0
    while True:
        if read_for is not None:
            left = read_for - (time.perf_counter() - began)
            if left <= 0:
                break
            try:
                data = await asyncio.wait_for(reader.read(65536), left)
            except TimeoutError:
                break
        else:
            data = await reader.read(65536)
        if not data:
            break
        chunks.append(data)
        if not first_event and b"data: " in data:
            first_event = time.perf_counter() - began
        if until is not None and until in data:
            break
    last = time.perf_counter() - began
    writer.close()
    raw = b"".join(chunks)
    chunked = parsed.get("transfer-encoding") == "chunked"
    body_bytes = _dechunk(raw) if chunked else raw
    return Reply(status, body_bytes, first, first_event, last, parsed)


_STAMP = re.compile(rb"@(\d+\.\d+) ")


class Follower(asyncio.Protocol):
    """A long-lived SSE reader that costs little: it only looks for token
    stamps, the start and the done event, in whole events."""

    def __init__(self, stamps: list[tuple[float, float]] | None = None) -> None:
        self.started = asyncio.get_running_loop().create_future()
        self.finished = asyncio.get_running_loop().create_future()
        self.stamps = stamps
        self.tokens = 0
        self.pending = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if not self.started.done():
            self.started.set_result(now)  # the headers: the server has subscribed us
        data = self.pending + data
        cut = data.rfind(b"\n\n") + 2
        whole, self.pending = data[:cut], data[cut:]
        if not whole:
            return
        if self.stamps is not None:
            for match in _STAMP.finditer(whole):
                self.stamps.append((now, now - float(match.group(1))))
        else:
            self.tokens += whole.count(b"tok")
        if b"event: done" in whole and not self.finished.done():
            self.finished.set_result(now)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        for future in (self.started, self.finished):
            if not future.done():
                future.set_exception(ConnectionError("the stream closed early"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def follow(
    port: int, path: str, headers: dict[str, str], stamps: list[tuple[float, float]] | None = None
) -> Follower:
    loop = asyncio.get_running_loop()
    _transport, follower = await loop.create_connection(lambda: Follower(stamps), "127.0.0.1", port)
    assert follower.transport is not None
    follower.transport.write(_head("GET", path, headers, b""))
    return follower


class Client:
    """One browser: its own cookies (session, CSRF)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.csrf = secrets.token_hex(16)
        self.cookies = {"csrftoken": self.csrf}

    def cookie(self) -> dict[str, str]:
        return {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}

    async def start(self, key: str, prompt: str) -> Reply:
        body = json.dumps({"prompt": prompt}).encode()
        headers = {**self.cookie(), "X-CSRFToken": self.csrf, "Content-Type": "application/json"}
        reply = await request(self.port, "POST", f"/runs/{key}/", headers, body)
        assert reply.status == 202, reply.body
        for part in reply.headers.get("set-cookie", "").split("; "):
            if part.startswith("sessionid="):
                self.cookies["sessionid"] = part.split("=", 1)[1]
        return reply

    async def events(self, key: str, after: str | None = None, **kwargs: object) -> Reply:
        headers = self.cookie()
        if after:
            headers["Last-Event-ID"] = after
        return await request(self.port, "GET", f"/runs/{key}/events/", headers, **kwargs)  # type: ignore[arg-type]

    async def follow(self, key: str, stamps: list[tuple[float, float]] | None = None) -> Follower:
        return await follow(self.port, f"/runs/{key}/events/", self.cookie(), stamps)

    async def wait_done(self, key: str) -> None:
        while True:
            reply = await request(self.port, "GET", f"/runs/{key}/", self.cookie())
            if json.loads(reply.body)["run"]["status"] != "running":
                return
            await asyncio.sleep(0.05)


async def open_gate(port: int, name: str) -> None:
    reply = await request(port, "POST", f"/bench/gate/{name}/")
    assert reply.status == 204, reply


async def memory(port: int, key: str = "") -> dict[str, int]:
    reply = await request(port, "GET", f"/bench/memory/?session={key}")
    return json.loads(reply.body)  # type: ignore[no-any-return,unused-ignore]


def ceiling_path(spec: str) -> str:
    return f"/ceiling/?spec={quote(spec)}"


T = TypeVar("T")


async def bounded(jobs: Iterable[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    """Run coroutine factories, ``limit`` at a time (daphne's listen backlog is 50)."""
    semaphore = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[T]]) -> T:
        async with semaphore:
            return await job()

    return await asyncio.gather(*(one(job) for job in jobs))


def _key() -> str:
    return secrets.token_hex(6)


# -- the server --------------------------------------------------------------


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))


#: The ASGI server the scenarios run on (``--server``): daphne, the stack the
#: goals are set for, or uvicorn, to see which limits are the server's.
SERVER = "daphne"
SERVER_PID = 0


@functools.cache
def _scratch() -> str:
    path = tempfile.mkdtemp(prefix="detached_runs_bench-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def start_server(traced: bool = False) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="bench.settings", PYTHONPATH=str(ROOT))
    if "BENCH_DB" not in os.environ and "BENCH_DATABASE_URL" not in os.environ:
        # A new SQLite file for each server: what earlier runs left in a
        # shared one would weigh on the next invocation's inserts and checkpoints.
        env["BENCH_DB"] = str(Path(_scratch()) / f"bench-{port}.sqlite3")
    if traced:
        env["PYTHONTRACEMALLOC"] = "1"
    subprocess.run(
        [sys.executable, "-m", "django", "migrate", "-v0"], env=env, check=True, cwd=ROOT
    )
    if SERVER == "uvicorn":
        command = ["uvicorn", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--no-access-log", "--lifespan", "off", "bench.asgi:application"]
    else:
        command = ["daphne", "-b", "127.0.0.1", "-p", str(port), "bench.asgi:application"]
    return launch([sys.executable, "-m", *command], env, ROOT, port), port


def launch(argv: list[str], env: dict[str, str], cwd: Path, port: int) -> subprocess.Popen[bytes]:
    """Start a server process (``argv``, in ``cwd``) and return it once it
    listens on ``port``; RuntimeError if it does not within 15 s."""
    process = subprocess.Popen(
        argv,
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_raise_fd_limit,
    )
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"{argv[2]} did not start")


# -- the scenarios -------------------------------------------------------------


@dataclass
class Figure:
    """One repetition of one scenario: the app's numbers and the ceiling's."""

    app: dict[str, float]
    ceiling: dict[str, float]


async def _fan_out(port: int, paths: list[str], headers: dict[str, str], gate: str) -> float:
    """Attach every follower, then open the gate; seconds until all saw done."""
    followers = await bounded((partial(follow, port, p, headers) for p in paths), 50)
    await asyncio.gather(*(f.started for f in followers))
    began = time.perf_counter()
    await open_gate(port, gate)
    await asyncio.gather(*(f.finished for f in followers))
    elapsed = time.perf_counter() - began
    counts = {f.tokens for f in followers}
    assert len(counts) == 1, f"followers saw different numbers of tokens: {sorted(counts)[:5]}"
    return elapsed


async def burst(port: int, subscribers: int, tokens: int = 2000) -> Figure:
    client = Client(port)
    key, gate = _key(), _key()
    await client.start(key, f"{tokens} 0 gate={gate}")
    # The app sends its start event at once; the ceiling its headers, then waits.
    app = await _fan_out(port, [f"/runs/{key}/events/"] * subscribers, client.cookie(), gate)
    gate = _key()
    ceiling = await _fan_out(
        port, [ceiling_path(f"{tokens} 0 gate={gate}")] * subscribers, {}, gate
    )
    rate = subscribers * tokens
    return Figure({"tokens/s": rate / app}, {"tokens/s": rate / ceiling})


def _server_cpu() -> float:
    """CPU seconds (user and system) the server process has used so far."""
    fields = Path(f"/proc/{SERVER_PID}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _paced(
    port: int,
    paths: list[str],
    headers: dict[str, str],
    gate: str,
    seconds: float,
    rate: float,
) -> dict[str, float]:
    stamps: list[tuple[float, float]] = []
    followers = await bounded((partial(follow, port, p, headers, stamps) for p in paths), 50)
    await asyncio.gather(*(f.started for f in followers))
    began, cpu = time.monotonic(), time.process_time()
    await open_gate(port, gate)
    # The server's CPU over the steady part, per token demanded.
    await asyncio.sleep(1)
    server_cpu, steady = _server_cpu(), time.monotonic()
    await asyncio.sleep(seconds - 2)
    server_cpu, steady = _server_cpu() - server_cpu, time.monotonic() - steady
    await asyncio.wait_for(
        asyncio.gather(*(f.finished for f in followers)),
        seconds * 4 + 30,
    )
    # The load client must cost little: say what share of a core it used.
    client_cpu = (time.process_time() - cpu) / (time.monotonic() - began)
    # The steady part of the run: after the first second, before the last.
    window = [lat for at, lat in stamps if began + 1 <= at < began + seconds - 1]
    window.sort()
    return {
        "delivered": len(window) / (seconds - 2),
        "p50 ms": window[len(window) // 2] * 1000,
        "p99 ms": window[int(len(window) * 0.99)] * 1000,
        "client cpu": client_cpu,
        "server cores": server_cpu / steady,
        "us/token": server_cpu / steady / (len(paths) * rate) * 1e6,
    }


async def capacity(port: int, runs: int, tokens: int = 300, rate: float = 30) -> Figure:
    client = Client(port)
    await client.start(_key(), "1 0")  # the session cookie, before the crowd
    gate = _key()
    keys = [_key() for _ in range(runs)]
    spec = f"{tokens} {rate} stamp gate={gate}"
    await bounded((partial(client.start, k, spec) for k in keys), 20)
    seconds = tokens / rate
    app = await _paced(
        port, [f"/runs/{k}/events/" for k in keys], client.cookie(), gate, seconds, rate
    )
    gate = _key()
    ceiling = await _paced(
        port, [ceiling_path(f"{tokens} {rate} stamp gate={gate}")] * runs, {}, gate, seconds, rate
    )
    demanded = runs * rate
    for figure in (app, ceiling):
        figure["delivered"] /= demanded
    return Figure(app, ceiling)


async def replay(port: int, tokens: int = 4000) -> Figure:
    client = Client(port)
    key = _key()
    await client.start(key, f"{tokens} 0")
    await client.wait_done(key)
    app, ceiling, events = [], [], 0
    for _ in range(20):
        reply = await client.events(key)
        app.append(reply.last_byte)
        events = len(reply.events())
        reply = await request(port, "GET", ceiling_path(f"{tokens} 0"))
        ceiling.append(reply.last_byte)
    return Figure(
        {"ms": statistics.median(app) * 1000, "events": events},
        {"ms": statistics.median(ceiling) * 1000},
    )


def _text(events: list[dict[str, object]]) -> str:
    return "".join(e["data"]["text"] for e in events if e.get("event") == "delta")  # type: ignore[index]


async def resume(port: int, samples: int = 8) -> Figure:
    """Read part of a paced run, drop the connection, come back 100 ms later
    (a reload) with Last-Event-ID: the first byte of the response, the first
    event (the text missed meanwhile, all in one), and whether the text is
    exact. The ceiling's is the first event of a fresh bare stream."""
    first_byte, first_event, ceiling, exact = [], [], [], True
    for _ in range(samples):
        client = Client(port)
        key = _key()
        await client.start(key, "200 100")
        partial = await client.events(key, read_for=0.5)
        seen = [e for e in partial.events() if "id" in e]
        await asyncio.sleep(0.1)  # the run goes on: ten tokens to catch up on
        rest = await client.events(key, str(seen[-1]["id"]))
        first_byte.append(rest.first_byte)
        first_event.append(rest.first_event)
        exact &= _text(seen) + _text(rest.events()) == "".join(f"tok{i} " for i in range(200))
        reply = await request(port, "GET", ceiling_path("200 100"), until=b"data: ")
        ceiling.append(reply.first_event)
    return Figure(
        {
            "first byte ms": statistics.median(first_byte) * 1000,
            "ms": statistics.median(first_event) * 1000,
            "exact": float(exact),
        },
        {"ms": statistics.median(ceiling) * 1000},
    )


async def held(port: int, tokens: int = 4000) -> Figure:
    client = Client(port)
    key = _key()
    await client.start(key, f"{tokens} 0")
    await client.wait_done(key)
    figures = await memory(port, key)
    # The ceiling of memory is the output itself: nothing can hold less.
    return Figure({"bytes": figures["held"]}, {"bytes": figures["output"]})


async def _stalled_sockets(
    port: int, path: str, headers: dict[str, str], count: int
) -> list[socket.socket]:
    out = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(_head("GET", path, headers, b""))
        out.append(sock)
    return out


async def _settled(port: int, quiet: float = 1.5) -> int:
    """Traced memory once it has not moved for ``quiet`` seconds: writes have
    drained into the transports, and the server has let go of closed
    connections (daphne does so once a second; caught before that, the
    figure swung by some 85 KB either way)."""
    last, since = -1, time.monotonic()
    deadline = since + 15
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = (await memory(port))["traced"]
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


async def _subscribers(port: int, key: str, wanted: Callable[[int], bool]) -> None:
    for _ in range(200):
        if wanted((await memory(port, key))["subscribers"]):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("the server never saw the subscribers come or go")


def _send_queue(port: int) -> int:
    """Bytes the kernel holds in the send queues of the server's sockets."""
    try:
        out = subprocess.run(["ss", "-tnH"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum(
        int(fields[2])
        for fields in (line.split() for line in out.splitlines())
        if len(fields) >= 4 and fields[3].endswith(f":{port}")
    )


async def stalled(port: int, subscribers: int = 10, tokens: int = 20000) -> Figure:
    """What ``subscribers`` clients that never read hold in the server: traced
    memory with them attached after the run, minus the same once they left.
    (On loopback the kernel's send queues take a good part; reported aside.)"""
    client = Client(port)
    key, gate = _key(), _key()
    await client.start(key, f"{tokens} 0 gate={gate}")
    # Warm up: the first requests of a kind load code and fill caches.
    warm = await _stalled_sockets(port, f"/runs/{key}/events/", client.cookie(), subscribers)
    await _subscribers(port, key, lambda n: n >= subscribers)
    for sock in warm:
        sock.close()
    await _subscribers(port, key, lambda n: n == 0)
    sockets = await _stalled_sockets(port, f"/runs/{key}/events/", client.cookie(), subscribers)
    await _subscribers(port, key, lambda n: n >= subscribers)
    await open_gate(port, gate)
    await client.wait_done(key)
    with_them = await _settled(port)
    kernel = _send_queue(port)
    for sock in sockets:
        sock.close()
    await _subscribers(port, key, lambda n: n == 0)
    app = with_them - await _settled(port)
    log = (await memory(port, key))["held"]

    gate = _key()
    sockets = await _stalled_sockets(port, ceiling_path(f"{tokens} 0 gate={gate}"), {}, subscribers)
    await asyncio.sleep(0.5)
    await open_gate(port, gate)
    with_them = await _settled(port)
    for sock in sockets:
        sock.close()
    ceiling = with_them - await _settled(port)
    return Figure({"bytes": app, "log": log, "kernel": kernel}, {"bytes": ceiling})


async def _starts(
    port: int, rate: float, seconds: float, one: Callable[[], Coroutine[Any, Any, float]]
) -> dict[str, float]:
    began = time.perf_counter()
    tasks: list[asyncio.Task[float]] = []
    for index in range(int(rate * seconds)):
        delay = began + index / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    times = sorted(await asyncio.gather(*tasks))
    return {"p50 ms": times[len(times) // 2] * 1000, "p99 ms": times[int(len(times) * 0.99)] * 1000}


async def start(port: int, rate: float = 50, seconds: float = 10) -> Figure:
    client = Client(port)
    await client.start(_key(), "1 0")  # the session cookie

    async def app_one() -> float:
        began = time.perf_counter()
        key = _key()
        await client.start(key, "30 30")
        await client.events(key, until=b"data: ")
        return time.perf_counter() - began

    async def ceiling_one() -> float:
        began = time.perf_counter()
        headers = {"Content-Type": "application/json"}
        await request(port, "POST", "/ceiling/start/", headers, b'{"prompt": "30 30"}')
        await request(port, "GET", ceiling_path("30 30"), until=b"data: ")
        return time.perf_counter() - began

    app = await _starts(port, rate, seconds, app_one)
    await asyncio.sleep(1.5)  # let the app's runs end
    ceiling = await _starts(port, rate, seconds, ceiling_one)
    return Figure(app, ceiling)


# -- starts under load: the runs' own scenario and bench/starts.py's ----------------


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

    def __init__(self, port: int, *, relative: bool = False) -> None:
        """``relative``: the agent paces its tokens as the original's does (a
        token, then a pause; `bench.site`), not on an absolute schedule."""
        self.port = port
        self.relative = relative

    def spec(self, tokens: int, rate: float) -> str:
        """The run `bench.site`'s agent and ceiling are asked for."""
        return f"{tokens} {rate} stamp" + (" relative" if self.relative else "")

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

    def __init__(self, port: int, *, relative: bool = False) -> None:
        super().__init__(port, relative=relative)
        self.client = Client(port)

    async def start(self, key: str, tokens: int, rate: float) -> None:
        await self.client.start(key, self.spec(tokens, rate))

    def events(self, key: str) -> tuple[str, dict[str, str]]:
        return f"/runs/{key}/events/", self.client.cookie()


class Ceiling(Side):
    """The bare ceiling of `bench/site.py` in the same process: a start is a
    POST answered 202 with no row and no registry, and the stream is the
    agent's tokens written straight into the response."""

    pattern = App.pattern
    clock = staticmethod(time.monotonic)
    end = b"event: done"
    plain = "/bench/plain/"

    def __init__(self, port: int, *, relative: bool = False) -> None:
        super().__init__(port, relative=relative)
        self.specs: dict[str, str] = {}

    async def start(self, key: str, tokens: int, rate: float) -> None:
        self.specs[key] = self.spec(tokens, rate)
        headers = {"Content-Type": "application/json"}
        body = json.dumps({"prompt": self.specs[key]}).encode()
        reply = await request(self.port, "POST", "/ceiling/start/", headers, body)
        assert reply.status == 202, reply.status

    def events(self, key: str) -> tuple[str, dict[str, str]]:
        return ceiling_path(self.specs.pop(key)), {}


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


async def starts(port: int, runs: int) -> Figure:
    """The ``starts`` scenario: `scenario` on the app, then on the ceiling."""
    app = await scenario(App(port), runs, 300, 30)
    ceiling = await scenario(Ceiling(port), runs, 300, 30)
    return Figure(app, ceiling)


async def together(port: int, count: int = 200) -> Figure:
    """The ``together`` scenario: ``count`` starts at once, beside ``count``
    runs streaming (30 tokens/s) that a first wave started."""
    client = Client(port)
    await client.start(_key(), "1 0")  # the session cookie

    async def timed(call: Callable[[], Awaitable[Any]]) -> float:
        began = time.perf_counter()
        await call()
        return time.perf_counter() - began

    await asyncio.gather(*(client.start(_key(), "300 30") for _ in range(count)))
    app = await asyncio.gather(
        *(timed(partial(client.start, _key(), "30 30")) for _ in range(count))
    )
    headers = {"Content-Type": "application/json"}
    ceiling = await asyncio.gather(
        *(
            timed(partial(request, port, "POST", "/ceiling/start/", headers, b'{"prompt": "1"}'))
            for _ in range(count)
        )
    )
    return Figure(
        dict(zip(("p50 ms", "p99 ms"), percentiles(app), strict=True)),
        dict(zip(("p50 ms", "p99 ms"), percentiles(ceiling), strict=True)),
    )


# -- the table -----------------------------------------------------------------


def _median(figures: list[Figure], side: str, name: str) -> float:
    return statistics.median(getattr(f, side)[name] for f in figures)


def report(results: dict[str, list[Figure]], args: argparse.Namespace) -> None:
    rows: list[tuple[str, str, str, str, str, str]] = []

    def row(scenario: str, app: str, ceiling: str, ratio: str, goal: str, met: bool) -> None:
        rows.append((scenario, app, ceiling, ratio, goal, "yes" if met else "NO"))

    if "burst" in results:
        f = results["burst"]
        app, ceiling = _median(f, "app", "tokens/s"), _median(f, "ceiling", "tokens/s")
        row(
            f"burst: 1 run, {args.subscribers} subscribers x 2,000 tokens",
            f"{app / 1e6:.2f} M tokens/s",
            f"{ceiling / 1e6:.2f} M tokens/s",
            f"{app / ceiling:.0%}",
            ">= 85% of the ceiling",
            app / ceiling >= 0.85,
        )
    if "capacity" in results:
        f = results["capacity"]
        delivered = _median(f, "app", "delivered")
        p50, p99 = _median(f, "app", "p50 ms"), _median(f, "app", "p99 ms")
        c_delivered = _median(f, "ceiling", "delivered")
        c_p99 = _median(f, "ceiling", "p99 ms")
        cost, c_cost = _median(f, "app", "us/token"), _median(f, "ceiling", "us/token")
        cores, c_cores = _median(f, "app", "server cores"), _median(f, "ceiling", "server cores")
        row(
            f"capacity: {args.runs:,} runs x 300 tokens at 30/s",
            f"{delivered:.0%} delivered, p50 {p50:.1f} ms, p99 {p99:.1f} ms;"
            f" server {cost:.0f} us/token ({cores:.2f} cores)",
            f"{c_delivered:.0%}, p99 {c_p99:.1f} ms; {c_cost:.0f} us/token ({c_cores:.2f} cores)",
            f"{delivered / c_delivered:.0%}",
            ">= 90% delivered, p99 < 100 ms",
            delivered >= 0.9 and p99 < 100,
        )
    if "replay" in results:
        f = results["replay"]
        ms, c_ms = _median(f, "app", "ms"), _median(f, "ceiling", "ms")
        events = int(_median(f, "app", "events"))
        row(
            "replay: finished 4,000-token run",
            f"{ms:.2f} ms to the last byte, {events} events",
            f"{c_ms:.2f} ms",
            f"{c_ms / ms:.0%}",
            "<= 10 events, < 5 ms",
            events <= 10 and ms < 5,
        )
    if "resume" in results:
        f = results["resume"]
        byte, ms = _median(f, "app", "first byte ms"), _median(f, "app", "ms")
        c_ms = _median(f, "ceiling", "ms")
        exact = all(x.app["exact"] for x in f)
        row(
            "resume: Last-Event-ID, 100 ms after a drop",
            f"first byte {byte:.2f} ms, first event {ms:.2f} ms, exact text: {exact}",
            f"first event {c_ms:.2f} ms",
            f"{c_ms / ms:.0%}",
            "first byte < 5 ms, exact",
            exact and byte < 5 and ms < 5,
        )
    if "memory" in results:
        f = results["memory"]
        held_bytes, output = _median(f, "app", "bytes"), _median(f, "ceiling", "bytes")
        row(
            "memory: finished 4,000-token run held",
            f"{held_bytes:,.0f} B",
            f"{output:,.0f} B of output",
            f"{held_bytes / output:.2f}x",
            "<= 1.5x output + 2 KiB",
            held_bytes <= 1.5 * output + 2048,
        )
    if "stalled" in results:
        f = results["stalled"]
        app, ceiling = _median(f, "app", "bytes"), _median(f, "ceiling", "bytes")
        log, kernel = _median(f, "app", "log"), _median(f, "app", "kernel")
        row(
            "stalled: 10 never-reading subscribers, 20,000 tokens",
            f"{app / 1024:,.1f} KiB beyond the log ({log / 1024:,.0f} KiB);"
            f" kernel send queues {kernel / 1024:,.0f} KiB",
            f"{ceiling / 1024:,.1f} KiB",
            f"{(app - ceiling) / 1024:+,.1f} KiB",
            "< 64 KiB beyond the log",
            app < 64 * 1024,
        )
    if "start" in results:
        f = results["start"]
        p50, p99 = _median(f, "app", "p50 ms"), _median(f, "app", "p99 ms")
        c_p99 = _median(f, "ceiling", "p99 ms")
        row(
            "start: POST to first event, 50 starts/s",
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms",
            f"p99 {c_p99:.1f} ms",
            f"{c_p99 / p99:.0%}",
            "p99 < 20 ms",
            p99 < 20,
        )
    if "starts" in results:
        f = results["starts"]
        p50, p99 = _median(f, "app", "start p50"), _median(f, "app", "start p99")
        text50, text99 = _median(f, "app", "first text p50"), _median(f, "app", "first text p99")
        plain99 = _median(f, "app", "plain GET p99")
        c_p50, c_p99 = _median(f, "ceiling", "start p50"), _median(f, "ceiling", "start p99")
        c_text99 = _median(f, "ceiling", "first text p99")
        row(
            f"starts: {args.start_runs:,} one after another, 300 tokens at 30/s each",
            f"start p50 {p50:.1f} ms, p99 {p99:.1f} ms; first text p50 {text50:.1f} ms,"
            f" p99 {text99:.1f} ms; {_median(f, 'app', 'seconds'):.1f} s;"
            f" plain GET p99 {plain99:.1f} ms",
            f"start p50 {c_p50:.1f} ms, p99 {c_p99:.1f} ms; first text p99 {c_text99:.1f} ms;"
            f" {_median(f, 'ceiling', 'seconds'):.1f} s",
            f"{c_p99 / p99:.0%}",
            "start p99 <= 2x plain GET p99",
            p99 <= 2 * plain99,
        )
    if "together" in results:
        f = results["together"]
        p50, p99 = _median(f, "app", "p50 ms"), _median(f, "app", "p99 ms")
        c_p50, c_p99 = _median(f, "ceiling", "p50 ms"), _median(f, "ceiling", "p99 ms")
        row(
            f"together: {args.together} starts at once beside {args.together} streaming runs,"
            f" DATABASE_THREADS={os.environ.get('BENCH_DATABASE_THREADS', '1')}",
            f"start p50 {p50:.1f} ms, p99 {p99:.1f} ms",
            f"p50 {c_p50:.1f} ms, p99 {c_p99:.1f} ms",
            f"{c_p99 / p99:.0%}",
            "(measured, no goal)",
            True,
        )
    headings = ("scenario", "app", "ceiling", "ceiling/app", "goal", "met")
    print("| " + " | ".join(headings) + " |")
    print("|" + "---|" * len(headings))
    for r in rows:
        print("| " + " | ".join(r) + " |")


SCENARIOS = (
    "burst",
    "capacity",
    "replay",
    "resume",
    "memory",
    "stalled",
    "start",
    "starts",
    "together",
)


async def main(args: argparse.Namespace) -> None:
    global SERVER, SERVER_PID
    SERVER = args.server
    _raise_fd_limit()
    only = args.only.split(",") if args.only else list(SCENARIOS)
    results: dict[str, list[Figure]] = {}
    jobs: dict[str, Callable[[int], Awaitable[Figure]]] = {
        "burst": lambda port: burst(port, args.subscribers),
        "capacity": lambda port: capacity(port, args.runs),
        "replay": replay,
        "resume": resume,
        "memory": held,
        "stalled": stalled,
        "start": lambda port: start(port, seconds=args.start_seconds),
        "starts": lambda port: starts(port, args.start_runs),
        "together": lambda port: together(port, args.together),
    }
    for name in only:
        # A server of its own for each scenario: runs another scenario left in
        # the registry (EVICT_AFTER) would otherwise weigh on its heap and its
        # garbage collector. The memory scenarios run under PYTHONTRACEMALLOC.
        process, port = start_server(traced=name in ("memory", "stalled"))
        SERVER_PID = process.pid
        try:
            results[name] = []
            for _ in range(args.repeat):
                results[name].append(await jobs[name](port))
                print(f"  {name}: {results[name][-1]}", file=sys.stderr)
        finally:
            process.terminate()
            process.wait(10)
    report(results, args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="", help=f"comma-separated, of: {', '.join(SCENARIOS)}")
    parser.add_argument("--subscribers", type=int, default=500)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--start-seconds", type=float, default=10)
    parser.add_argument("--start-runs", type=int, default=1000, help="starts: runs started")
    parser.add_argument(
        "--together",
        type=int,
        default=200,
        help="together: starts sent at once, beside as many streaming runs",
    )
    parser.add_argument("--quick", action="store_true", help="small loads, one repetition")
    parser.add_argument(
        "--server", choices=("daphne", "uvicorn"), default="daphne", help="the ASGI server"
    )
    args = parser.parse_args()
    unknown = [name for name in args.only.split(",") if args.only and name not in SCENARIOS]
    if unknown:
        parser.error(f"--only: no scenario {', '.join(unknown)}; they are {', '.join(SCENARIOS)}")
    if args.quick:
        args.repeat, args.subscribers, args.runs, args.start_seconds = 1, 100, 200, 3
        args.start_runs, args.together = 200, 50
    asyncio.run(main(args))

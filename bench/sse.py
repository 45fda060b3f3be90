"""HTTP benchmarks over a real daphne process on loopback, with a cheap load
client (raw asyncio sockets), each next to its ceiling: a bare SSE view in the
same Django process streaming the same bytes with no registry.

    .venv/bin/python bench/sse.py [--repeat 3] [--subscribers 500]

Scenarios so far: burst fan-out (1 run, N subscribers, 2,000 tokens as fast as
the agent yields), replay (reconnect to a finished 4,000-token run), resume
(reconnect mid-run with Last-Event-ID). Medians of --repeat repetitions.

Work in progress (Step 5): the burst ceiling streams every token as its own
event, while the app merges what piled up for a subscriber, so the two do not
send the same bytes yet; the capacity, memory, stalled-subscriber and start
scenarios are still to come.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Reply:
    status: int
    body: bytes = b""
    first_byte: float = 0.0
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


async def request(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    read_for: float | None = None,
) -> Reply:
    began = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    head = await reader.readuntil(b"\r\n\r\n")
    first = time.perf_counter() - began  # the first byte of the response
    status = int(head.split(b" ", 2)[1])
    parsed: dict[str, str] = {}
    for line in head.decode().split("\r\n")[1:]:
        if ": " in line:
            k, v = line.split(": ", 1)
            parsed[k.lower()] = (
                parsed.get(k.lower(), "") + ("; " if k.lower() in parsed else "") + v
            )
    chunks: list[bytes] = []
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
    last = time.perf_counter() - began
    writer.close()
    raw = b"".join(chunks)
    chunked = parsed.get("transfer-encoding") == "chunked"
    body_bytes = _dechunk(raw) if chunked else raw
    return Reply(status, body_bytes, first, last, parsed)


class Client:
    """One browser: its own cookies (session, CSRF)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.csrf = secrets.token_hex(16)
        self.cookies = {"csrftoken": self.csrf}

    def _cookie(self) -> dict[str, str]:
        return {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}

    async def start(self, key: str, prompt: str) -> None:
        body = json.dumps({"prompt": prompt}).encode()
        reply = await request(
            self.port,
            "POST",
            f"/runs/{key}/",
            {
                **self._cookie(),
                "X-CSRFToken": self.csrf,
                "Content-Type": "application/json",
            },
            body,
        )
        assert reply.status == 202, reply.body
        for part in reply.headers.get("set-cookie", "").split("; "):
            if part.startswith("sessionid="):
                self.cookies["sessionid"] = part.split("=", 1)[1]

    async def events(
        self, key: str, after: str | None = None, read_for: float | None = None
    ) -> Reply:
        headers = self._cookie()
        if after:
            headers["Last-Event-ID"] = after
        return await request(self.port, "GET", f"/runs/{key}/events/", headers, read_for=read_for)

    async def wait_done(self, key: str) -> None:
        while True:
            reply = await request(self.port, "GET", f"/runs/{key}/", self._cookie())
            if json.loads(reply.body)["run"]["status"] != "running":
                return
            await asyncio.sleep(0.05)


def start_daphne() -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="bench.settings", PYTHONPATH=str(ROOT))
    subprocess.run(
        [sys.executable, "-m", "django", "migrate", "-v0"], env=env, check=True, cwd=ROOT
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daphne",
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            "bench.asgi:application",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return process, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("daphne did not start")


async def burst(port: int, subscribers: int, tokens: int = 2000) -> tuple[float, float]:
    """Subscriber-tokens/s for the app and for the ceiling."""
    client = Client(port)
    key = secrets.token_hex(6)
    await client.start(key, f"{tokens} 0 ")
    await client.wait_done(key)  # warm: compare delivery, not agent speed
    # The app: N subscribers to a live burst. Start a fresh run and attach all.
    key = secrets.token_hex(6)
    await client.start(key, f"{tokens} 0")
    began = time.perf_counter()
    replies = await asyncio.gather(*(client.events(key) for _ in range(subscribers)))
    app = subscribers * tokens / (time.perf_counter() - began)
    assert all(r.body.count(b"event: done") == 1 for r in replies)
    began = time.perf_counter()
    replies = await asyncio.gather(
        *(request(port, "GET", f"/ceiling/?tokens={tokens}") for _ in range(subscribers))
    )
    ceiling = subscribers * tokens / (time.perf_counter() - began)
    return app, ceiling


async def replay(port: int, tokens: int = 4000) -> tuple[float, int]:
    client = Client(port)
    key = secrets.token_hex(6)
    await client.start(key, f"{tokens} 0")
    await client.wait_done(key)
    times, count = [], 0
    for _ in range(20):
        reply = await client.events(key)
        times.append(reply.last_byte)
        count = len(reply.events())
    return statistics.median(times), count


def _text(events: list[dict[str, object]]) -> str:
    return "".join(e["data"]["text"] for e in events if e.get("event") == "delta")  # type: ignore[index]


async def resume(port: int) -> tuple[float, bool]:
    """Read part of a paced run, drop the connection, resume with Last-Event-ID."""
    firsts, exact = [], True
    for _ in range(5):
        client = Client(port)
        key = secrets.token_hex(6)
        await client.start(key, "200 100")
        partial = await client.events(key, read_for=0.6)
        seen = [e for e in partial.events() if "id" in e]
        rest = await client.events(key, str(seen[-1]["id"]))
        firsts.append(rest.first_byte)
        exact &= _text(seen) + _text(rest.events()) == "".join(f"tok{i} " for i in range(200))
    return statistics.median(firsts), exact


async def main(repeat: int, subscribers: int) -> None:
    process, port = start_daphne()
    try:
        bursts = [await burst(port, subscribers) for _ in range(repeat)]
        replays = [await replay(port) for _ in range(repeat)]
        resumes = [await resume(port) for _ in range(repeat)]
    finally:
        process.terminate()
        process.wait(10)
    app = statistics.median(b[0] for b in bursts)
    ceiling = statistics.median(b[1] for b in bursts)
    print(
        f"burst fan-out, {subscribers} subscribers x 2,000 tokens: app {app:,.0f} "
        f"subscriber-tokens/s, ceiling {ceiling:,.0f}: {app / ceiling:.0%} of the ceiling"
    )
    replay_ms = statistics.median(r[0] for r in replays) * 1000
    resume_ms = statistics.median(r[0] for r in resumes) * 1000
    print(
        f"replay of a finished 4,000-token run: {replay_ms:.2f} ms to the last byte, "
        f"{replays[0][1]} events"
    )
    print(
        f"resume with Last-Event-ID: first byte {resume_ms:.2f} ms, "
        f"exactly the missing text: {all(r[1] for r in resumes)}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--subscribers", type=int, default=500)
    args = parser.parse_args()
    asyncio.run(main(args.repeat, args.subscribers))

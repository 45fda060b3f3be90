"""A redis-server of a test's own (for tests of real server processes), on a
free port, that the test can pause, kill, and start again empty on the same
port, as a Redis without persistence restarts."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from typing import Any

import pytest

from .conftest import die_with_the_tests, free_port


def wait_listening(port: int, what: str, process: subprocess.Popen[bytes] | None = None) -> None:
    """Return once 127.0.0.1:``port`` takes connections; RuntimeError naming
    ``what`` if it does not within 10 s, or if ``process`` (the server
    started there) exits meanwhile: its port was taken between its pick
    and its bind, and what listens there is another process's."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} on port {port} exited ({process.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{what} on port {port} did not start")


def redis_cli(port: int, *args: str) -> str:
    """One command to the server (or sentinel) on ``port``, with redis-cli; its output."""
    return subprocess.run(
        ["redis-cli", "-p", str(port), *args], check=True, capture_output=True, timeout=10
    ).stdout.decode()


class RedisServer:
    """Started at once unless ``start=False`` (then call `start`, from the
    main thread: a child dies with the thread that started it)."""

    def __init__(self, *, start: bool = True, also_on: tuple[str, ...] = ()) -> None:
        """``also_on``: addresses it listens on besides 127.0.0.1 (another
        host's way to it, in `tests.hosts`), at the same port."""
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.also_on = also_on
        if start:
            self.start()

    def start(self) -> None:
        """Start it (empty: no RDB, no AOF) and wait until it answers."""
        self.process = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *self.also_on,
                *("--save", "", "--appendonly", "no", "--protected-mode", "no"),
            ],
            stdout=subprocess.DEVNULL,
            preexec_fn=die_with_the_tests,
        )
        wait_listening(self.port, "redis-server", self.process)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart_empty(self) -> None:
        """Kill it and start it again on the same port with nothing in it."""
        self.kill()
        self.start()

    def client(self) -> Any:
        """A (sync) redis-py client of it."""
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5)

    def command(self, *args: str) -> bytes:
        """One command with redis-cli (``CLIENT PAUSE 3000 WRITE``...)."""
        return subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], check=True, capture_output=True
        ).stdout

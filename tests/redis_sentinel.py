"""A Redis master watched by Redis Sentinel, of a test's own: a master and a
replica (redis-servers) and one sentinel (``redis-server --sentinel``), on
free ports, that the test can ask to fail the master over to the replica."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import die_with_the_tests, free_port
from .redis_server import redis_cli, wait_listening

#: The name the sentinel knows the master by.
SERVICE = "mymaster"


class RedisSentinelServers:
    """Started at once: a master, its replica (in sync) and a sentinel that
    knows both (`wait_ready`)."""

    def __init__(self) -> None:
        if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
            if os.environ.get("DETACHED_RUNS_REQUIRE_REDIS") == "1":
                raise RuntimeError("DETACHED_RUNS_REQUIRE_REDIS=1 but redis-cli is not installed")
            pytest.skip("redis-server and redis-cli are not installed")
        self.directory = Path(tempfile.mkdtemp(prefix="redis-sentinel-"))
        self.master, self.replica, self.sentinel = free_port(), free_port(), free_port()
        self.processes: list[subprocess.Popen[bytes]] = []
        self._server(self.master)
        self._server(self.replica, "--replicaof", "127.0.0.1", str(self.master))
        config = self.directory / "sentinel.conf"
        config.write_text(
            f"port {self.sentinel}\n"
            "bind 127.0.0.1\n"
            "protected-mode no\n"
            f"dir {self.directory}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.master} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 5000\n"
        )
        self._start(["redis-server", str(config), "--sentinel"], self.sentinel)
        self.wait_ready()

    @property
    def url(self) -> str:
        """Its `REDIS_URL`."""
        return f"redis+sentinel://127.0.0.1:{self.sentinel}/{SERVICE}/0"

    def _server(self, port: int, *extra: str) -> None:
        self._start(
            [
                *("redis-server", "--port", str(port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--protected-mode", "no"),
                *("--repl-diskless-sync-delay", "0", "--dir", str(self.directory)),
                *extra,
            ],
            port,
        )

    def _start(self, command: list[str], port: int) -> None:
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, preexec_fn=die_with_the_tests
        )
        self.processes.append(process)
        wait_listening(port, command[0], process)

    def command(self, port: int, *args: str) -> str:
        """One command to one server or the sentinel, with redis-cli; its output."""
        return redis_cli(port, *args)

    def master_port(self) -> int:
        """The port of the master, as the sentinel says it now."""
        answer = self.command(self.sentinel, "sentinel", "get-master-addr-by-name", SERVICE)
        return int(answer.split()[1])

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until the master's replica is in sync and the sentinel knows it."""
        deadline = time.monotonic() + timeout
        while True:
            replica = self.replica if self.master_port() == self.master else self.master
            synced = "master_link_status:up" in self.command(replica, "info", "replication")
            known = f"{replica}" in self.command(self.sentinel, "sentinel", "replicas", SERVICE)
            if synced and known:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the sentinel does not know the replica in sync")
            time.sleep(0.05)

    def fail_over(self, timeout: float = 20.0) -> None:
        """``SENTINEL FAILOVER``: the replica becomes the master (returns once
        the sentinel says so), the master its replica."""
        before = self.master_port()
        deadline = time.monotonic() + timeout
        # Asked again while it answers an error: just after it started, the
        # sentinel may not have a link to the replica yet ("NOGOODSLAVE").
        while "OK" not in (said := self.command(self.sentinel, "sentinel", "failover", SERVICE)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sentinel refused to fail the master over: {said}")
            time.sleep(0.1)
        asked = time.monotonic()
        while self.master_port() == before:
            if time.monotonic() > deadline:
                raise RuntimeError("the sentinel did not fail the master over")
            if time.monotonic() - asked > 6:
                # Past its failover-timeout (5 s) the sentinel gave that one up
                # (seen once on a loaded CI run: it said OK, and nothing
                # moved): asked again.
                self.command(self.sentinel, "sentinel", "failover", SERVICE)
                asked = time.monotonic()
            time.sleep(0.05)

    def pause_master(self) -> int:
        """Freeze the master (SIGSTOP: its connections stay open, it answers
        nothing, as a host that hangs); the sentinel fails it over to the
        replica. Returns its port; `resume` thaws it."""
        port = self.master_port()
        self.processes[[self.master, self.replica].index(port)].send_signal(signal.SIGSTOP)
        return port

    def resume(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

"""A Redis Cluster of a test's own: redis-servers started on free ports with
``--cluster-enabled yes``, joined by ``redis-cli --cluster create``, that
the test can take a primary of down (a replica is promoted in about two
seconds: ``cluster-node-timeout`` is 1 s)."""

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
from .redis_server import redis_cli

#: Milliseconds after which a node that does not answer is taken for failed.
NODE_TIMEOUT_MS = 1000


class RedisClusterServers:
    """``masters`` primaries with ``replicas`` replicas each, all on
    127.0.0.1, started and joined at once (a few seconds: `wait_ready`)."""

    def __init__(self, masters: int = 3, replicas: int = 0) -> None:
        if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
            if os.environ.get("DETACHED_RUNS_REQUIRE_REDIS") == "1":
                raise RuntimeError(
                    "DETACHED_RUNS_REQUIRE_REDIS=1 but redis-server is not installed"
                )
            pytest.skip("redis-server and redis-cli are not installed")
        self.directory = Path(tempfile.mkdtemp(prefix="redis-cluster-"))
        self.ports: list[int] = []
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.paused: set[int] = set()
        self.masters = masters
        for _ in range(masters * (1 + replicas)):
            self.ports.append(self._start_node())
        subprocess.run(
            [
                *("redis-cli", "--cluster", "create"),
                *(f"127.0.0.1:{port}" for port in self.ports),
                *("--cluster-replicas", str(replicas), "--cluster-yes"),
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        self.wait_ready(replicas=masters * replicas)

    @property
    def url(self) -> str:
        """Its `REDIS_URL`, naming every node as a startup node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports) + "/"

    def _start_node(self) -> int:
        """Start a node on a free port, and another on another port if that
        one is taken meanwhile (a free port is only free when it is picked:
        another test process may take it, or the node's bus port, before the
        node binds them; the node then exits, and what answers on its port
        may be another's server). Return its port once the node answers
        there."""
        for _ in range(5):
            port = free_port()
            if port in self.processes:
                continue
            self._start(port)
            if self._answers(port):
                return port
            failed = self.processes.pop(port)
            failed.kill()
            failed.wait()
        raise RuntimeError(f"no redis-server of the cluster in {self.directory} started")

    def _answers(self, port: int) -> bool:
        """Whether the node started on ``port`` answers there, within 10 s:
        it runs, and what answers says it keeps its files in this cluster's
        directory. False as soon as it exits."""
        process = self.processes[port]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if str(self.directory) in self.command(port, "config", "get", "dir"):
                    return True
            except subprocess.CalledProcessError:
                pass  # not listening yet
            time.sleep(0.02)
        return False

    def _start(self, port: int) -> None:
        self.processes[port] = subprocess.Popen(
            [
                *("redis-server", "--port", str(port), "--bind", "127.0.0.1"),
                *("--cluster-enabled", "yes", "--cluster-port", str(free_port())),
                *("--cluster-config-file", str(self.directory / f"nodes-{port}.conf")),
                *("--cluster-node-timeout", str(NODE_TIMEOUT_MS)),
                *("--save", "", "--appendonly", "no", "--protected-mode", "no"),
                # A replica gets its primary's data at once, not 5 s later.
                *("--repl-diskless-sync-delay", "0", "--dir", str(self.directory)),
                *("--logfile", str(self.directory / f"node-{port}.log")),
            ],
            stdout=subprocess.DEVNULL,
            preexec_fn=die_with_the_tests,
        )

    def command(self, port: int, *args: str) -> str:
        """One command to one node with redis-cli; its output."""
        return redis_cli(port, *args)

    def live_ports(self) -> list[int]:
        """The nodes that run and answer (not `pause`d)."""
        return [
            port
            for port, process in self.processes.items()
            if process.poll() is None and port not in self.paused
        ]

    def pause(self, port: int) -> None:
        """Freeze one node (SIGSTOP): it keeps its connections open and
        answers nothing, as a host that hangs or is cut off; a primary's
        replica takes over its slots. `resume` thaws it."""
        self.processes[port].send_signal(signal.SIGSTOP)
        self.paused.add(port)

    def resume(self, port: int) -> None:
        self.processes[port].send_signal(signal.SIGCONT)
        self.paused.discard(port)

    def wait_taken_over(self, port: int, timeout: float = 20.0) -> None:
        """Wait until a replica serves the slots of ``port``, a primary that
        stopped answering: the cluster has as many primaries as it began
        with again, and ``port`` is not one."""
        deadline = time.monotonic() + timeout
        while (
            (primaries := self.primaries()).keys() & {port}
            or len(primaries) < self.masters
            or not all(
                "cluster_state:ok" in self.command(live, "cluster", "info")
                for live in self.live_ports()
            )
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no replica took over from {port}")
            time.sleep(0.05)

    def wait_ready(self, replicas: int = 0, timeout: float = 20.0) -> None:
        """Wait until every live node says ``cluster_state:ok`` and at least
        ``replicas`` replicas are in sync with their primary."""
        deadline = time.monotonic() + timeout
        while True:
            states = [self.command(port, "cluster", "info") for port in self.live_ports()]
            synced = sum(
                "master_link_status:up" in self.command(port, "info", "replication")
                for port in self.live_ports()
            )
            if all("cluster_state:ok" in state for state in states) and synced >= replicas:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the cluster is not ready: {states}, {synced} replicas in sync; "
                    f"nodes that exited: {self._exited()}"
                )
            time.sleep(0.05)

    def _exited(self) -> dict[int, str]:
        """The nodes that exited without being killed here: their exit
        status and the end of their log."""
        return {
            port: f"{process.returncode}: "
            + (self.directory / f"node-{port}.log").read_text(errors="replace")[-2000:]
            for port, process in self.processes.items()
            if process.poll() is not None and process.returncode != -signal.SIGKILL
        }

    def primaries(self) -> dict[int, str]:
        """The live primaries: their port, and the slots they serve (as
        ``CLUSTER NODES`` says them)."""
        port = self.live_ports()[0]
        found = {}
        for line in self.command(port, "cluster", "nodes").splitlines():
            fields = line.split()
            if "master" in fields[2] and "fail" not in fields[2] and len(fields) > 8:
                found[int(fields[1].split("@")[0].rpartition(":")[2])] = " ".join(fields[8:])
        return found

    def port_of(self, key: str) -> int:
        """The port of the primary that serves ``key``'s slot now."""
        port = self.live_ports()[0]
        slot = int(self.command(port, "cluster", "keyslot", key))
        for primary, ranges in self.primaries().items():
            for piece in ranges.split():
                low, _, high = piece.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return primary
        raise LookupError(f"no primary serves slot {slot}")

    def kill(self, port: int) -> None:
        """Kill one node (-9): a primary's replica takes over its slots."""
        process = self.processes[port]
        process.kill()
        process.wait()

    def stop(self) -> None:
        for port in [*self.paused]:
            self.resume(port)
        for port in self.live_ports():
            self.kill(port)
        shutil.rmtree(self.directory, ignore_errors=True)

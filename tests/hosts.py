"""Hosts of the test's own: each a Linux network namespace with its own
address and hostname (``ip netns``, a veth pair on a bridge, ``unshare
--uts``), joined by a bridge on this machine that holds the services they
share (a redis-server started here, the test database through a TCP proxy).

    hosts = Hosts(["host-a", "host-b"])
    server = hosts.start_server(0, env)    # daphne on host-a, at hosts.address(0)
    hosts.close()

Root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) is needed; `Hosts.unavailable`
says why a machine cannot, for a skip with a reason.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .conftest import Server, die_with_the_tests

PORT = 8000


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


class Hosts:
    def __init__(self, hostnames: list[str]) -> None:
        tag = secrets.token_hex(3)
        # A /24 of its own in 10.64.0.0/10, unlikely to be any real network's.
        net = f"10.{64 + secrets.randbelow(60)}.{secrets.randbelow(256)}"
        self.hostnames = hostnames
        self.bridge = f"drbr{tag}"
        #: The address of this machine on the bridge: what the hosts reach it at.
        self.gateway = f"{net}.1"
        self.namespaces = [f"dr{tag}n{i}" for i in range(len(hostnames))]
        self._addresses = [f"{net}.{i + 2}" for i in range(len(hostnames))]
        self._made: list[list[str]] = []  # how to undo what was made, last first
        try:
            self._make(tag)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def unavailable() -> str | None:
        """Why this machine cannot make such hosts (None if it can)."""
        name = f"drprobe{secrets.token_hex(3)}"
        made = _ip("netns", "add", name, check=False)
        if made.returncode != 0:
            return f"cannot create a network namespace: {made.stderr.strip()}"
        _ip("netns", "del", name, check=False)
        probe = subprocess.run(["unshare", "--uts", "true"], capture_output=True, text=True)
        if probe.returncode != 0:
            return f"cannot create a UTS namespace: {probe.stderr.strip()}"
        return None

    def _make(self, tag: str) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(["link", "del", self.bridge])
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for index, namespace in enumerate(self.namespaces):
            _ip("netns", "add", namespace)
            self._made.append(["netns", "del", namespace])
            outside, inside = f"dr{tag}v{index}", f"dr{tag}p{index}"
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            self._made.append(["link", "del", outside])
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            _ip("link", "set", inside, "netns", namespace)
            inner = ["netns", "exec", namespace, "ip"]
            _ip(*inner, "addr", "add", f"{self._addresses[index]}/24", "dev", inside)
            _ip(*inner, "link", "set", inside, "up")
            _ip(*inner, "link", "set", "lo", "up")
            _ip(*inner, "route", "add", "default", "via", self.gateway)

    def address(self, index: int) -> str:
        return self._addresses[index]

    def popen(self, index: int, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Run ``argv`` on host ``index``: in its network namespace, with its
        hostname (a UTS namespace of its own); the rest of this machine
        (files, processes) is shared."""
        command = [
            *("ip", "netns", "exec", self.namespaces[index]),
            *("unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"'),
            self.hostnames[index],
            *argv,
        ]
        return subprocess.Popen(command, preexec_fn=die_with_the_tests, **kwargs)

    def start_server(self, index: int, env: dict[str, str]) -> Server:
        """daphne on host ``index``, at ``address(index)``:`PORT`, once it listens."""
        log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the server
            "w+", prefix="daphne-host-", suffix=".log", delete=False
        )
        argv = [sys.executable, "-m", "daphne", "-b", self.address(index), "-p", str(PORT)]
        process = self.popen(
            index,
            [*argv, "tests.asgi:application"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"daphne exited:\n{Path(log.name).read_text()}")
            try:
                socket.create_connection((self.address(index), PORT), timeout=0.2).close()
                return Server(PORT, process, log, env)
            except OSError:
                time.sleep(0.05)
        process.kill()
        raise RuntimeError(f"daphne did not listen:\n{Path(log.name).read_text()}")

    def close(self) -> None:
        """Take down the namespaces, links and bridge (their processes are
        the caller's to stop first)."""
        while self._made:
            _ip(*self._made.pop(), check=False)

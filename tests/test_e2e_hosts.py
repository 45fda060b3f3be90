"""Step 13, many hosts: two hosts (network namespaces with hostnames of their
own, `tests.hosts`), a daphne server on each, one Redis and one database
between them. A run started on host A and followed on host B outlives A's
server: killed, its run ends ``interrupted`` on B within the lease bound,
with every token that reached Redis, and nothing here relies on the two
servers sharing a host (B cannot see A's processes: its hostname differs)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse, urlunparse

import pytest

from detached_runs.models import Run

from .conftest import LEASE_BOUND, SHORT_LEASE, ended_row, server_env, stop_server
from .http import Browser, text

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

ALL_500 = "".join(f"w{i} " for i in range(500))


@pytest.fixture
def hosts() -> Iterator[Any]:
    from .hosts import Hosts

    why = Hosts.unavailable()
    if why is not None:
        if os.environ.get("DETACHED_RUNS_REQUIRE_NETNS") == "1":
            raise RuntimeError(f"DETACHED_RUNS_REQUIRE_NETNS=1, but {why}")
        pytest.skip(f"this machine cannot make the test's hosts: {why}")
    made = Hosts(["host-a", "host-b"])
    yield made
    made.close()


@pytest.fixture
def shared(hosts: Any) -> Iterator[dict[str, str]]:
    """The environment of both hosts' servers: a redis-server of the test's
    own and the test database, both reached through the bridge."""
    from django.db import connection

    from .proxy import Proxy
    from .redis_server import RedisServer

    redis = RedisServer(also_on=(hosts.gateway,))
    env = server_env(
        TEST_BACKEND="redis",
        TEST_REDIS_URL=f"redis://{hosts.gateway}:{redis.port}/0",
        TEST_AGENT_DELAY="0.02",
        TEST_KEEPALIVE="1",
        LOG="INFO",
        **SHORT_LEASE,
    )
    proxy = None
    if connection.vendor != "sqlite":  # SQLite's file is shared as it is
        url = urlparse(env["DATABASE_URL"])
        proxy = Proxy(
            upstream=int(url.port or 0),
            host=hosts.gateway,
            upstream_host=url.hostname,
            server_first=connection.vendor == "mysql",
        )
        netloc = url.netloc.rpartition("@")[0] + f"@{hosts.gateway}:{proxy.port}"
        env["DATABASE_URL"] = urlunparse(url._replace(netloc=netloc))
    yield env
    if proxy is not None:
        proxy.close()
    redis.kill()


def test_a_run_started_on_host_a_and_followed_on_host_b_survives_host_a(hosts, shared):
    a = hosts.start_server(0, shared)
    b = hosts.start_server(1, shared)
    try:
        key = uuid.uuid4().hex[:10]
        on_a = Browser(a.port, host=hosts.address(0))
        assert on_a.request("POST", f"/runs/{key}/", {"prompt": "500"}).status == 202
        on_b = Browser(b.port, cookies=dict(on_a.cookies), host=hosts.address(1))
        stream = on_b.stream(f"/runs/{key}/events/")
        first = stream.take(20)
        row = Run.objects.get(session_key=key)
        assert row.worker.startswith("host-a:"), row.worker  # A's own hostname
        a.process.send_signal(signal.SIGKILL)
        a.process.wait(timeout=10)
        killed = time.monotonic()
        rest = stream.rest()
        ended = time.monotonic() - killed
        log = b.output()
        assert rest[-1].data == {"status": "interrupted"}, log
        assert ended < LEASE_BOUND, log  # the lease lapsed, and B's sweep found it
        got = text(first) + text(rest)
        assert ALL_500.startswith(got) and 0 < len(got) < len(ALL_500), log
        row = ended_row(key, 10, "the row did not end")
        # Every token that reached Redis: all B's client got, in the row too.
        assert (row.status, row.output, row.last_event_id) == ("interrupted", got, rest[-1].id)
        # Host B serves the ended run whole, from its start.
        replay = on_b.stream(f"/runs/{key}/events/").rest()
        assert text(replay) == got and replay[-1].id == rest[-1].id
        assert "Traceback" not in log, log
    finally:
        for server in (a, b):
            stop_server(server)

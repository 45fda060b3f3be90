from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import settings as hypothesis_settings

from detached_runs.backends.base import BaseBackend, RunEnd
from detached_runs.backends.memory import MemoryBackend
from detached_runs.events import ORIGIN, Event, Position, make_id
from detached_runs.runs import get_service

# No deadline for Hypothesis's examples: speed is measured in bench/, and a
# loaded CI machine took 272 ms for an example with a database round trip
# (tests/test_options.py) against the default 200 ms.
hypothesis_settings.register_profile("suite", deadline=None)
hypothesis_settings.load_profile("suite")

if TYPE_CHECKING:
    from .database_fault import DatabaseFault
    from .redis_cluster import RedisClusterServers
    from .redis_server import RedisServer


@pytest.fixture(autouse=True)
def _fresh_service(request: Any) -> Any:
    # The service keeps one backend per event loop; make each test start clean.
    # Under TEST_BACKEND=redis each test gets its own key prefix, as it gets a
    # fresh in-process registry with the memory backend.
    prefix = f"dr-test-{uuid.uuid4().hex[:10]}"
    if os.environ.get("TEST_BACKEND") == "redis":
        settings = request.getfixturevalue("settings")
        settings.DETACHED_RUNS = {**settings.DETACHED_RUNS, "REDIS_PREFIX": prefix}
    get_service().reset()
    yield
    get_service().reset()
    if os.environ.get("TEST_BACKEND") == "redis":
        import redis

        client = redis.Redis(host="127.0.0.1", port=6379)
        keys = list(client.scan_iter(match=f"*{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def config(settings: Any) -> Any:
    """``config(KEY=value, ...)`` overrides keys of ``DETACHED_RUNS`` for one
    test, and makes the service load its backend again with them."""

    def apply(**values: Any) -> None:
        settings.DETACHED_RUNS = {**settings.DETACHED_RUNS, **values}
        get_service().reset()

    return apply


class Saves:
    """A finalize hook that records what it saved and can be made slow."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.ends: list[RunEnd] = []
        self.active = 0
        self.overlaps = 0
        self.log: list[str] = []

    async def __call__(self, end: RunEnd) -> None:
        self.active += 1
        self.overlaps += self.active > 1
        self.log.append(f"begin {end.run_id}")
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.active -= 1
        self.log.append(f"end {end.run_id}")
        self.ends.append(end)

    def status_of(self, run_id: str) -> str:
        return next(e.status for e in self.ends if e.run_id == run_id)


@pytest.fixture
def saves() -> Saves:
    return Saves()


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def backend(request: Any) -> AsyncIterator[BaseBackend]:
    """Each backend in turn, for the contract every backend keeps (DESIGN.md,
    "Behaviour every backend must keep"): the in-process one, the Redis one
    on the machine's Redis, and the Redis one on a Redis Cluster of three
    primaries (`redis_cluster`), each with a key prefix of its own, cleaned
    up afterwards. An ended run is evicted after 0.2 s."""
    if request.param == "memory":
        yield MemoryBackend(evict_after=0.2)
        return
    if os.environ.get("DETACHED_RUNS_REQUIRE_REDIS") != "1":
        pytest.importorskip("redis")
    from detached_runs.backends.redis import RedisBackend

    url = "redis://127.0.0.1:6379/0"
    if request.param == "redis-cluster":
        url = request.getfixturevalue("redis_cluster").url
    prefix = f"dr-contract-{uuid.uuid4().hex[:10]}"
    redis_backend = RedisBackend(redis_url=url, redis_prefix=prefix, evict_after=0.2)
    yield redis_backend
    await redis_backend.shutdown(2)
    await delete_keys(redis_backend.redis, prefix)
    await redis_backend.redis.aclose()


async def delete_keys(client: Any, prefix: str) -> None:
    """Delete the keys of ``prefix`` a redis-py asyncio client (of one server
    or of a cluster: every primary's) holds."""
    keys = [key async for key in client.scan_iter(match=f"*{prefix}*")]
    if keys:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.delete(key)
        await pipe.execute()


@contextlib.asynccontextmanager
async def two_workers(
    url: str = "redis://127.0.0.1:6379/0", **options: Any
) -> AsyncIterator[tuple[Any, Any]]:
    """Two Redis backends on one Redis (a server, a cluster or Sentinel's
    master, by ``url``), standing for two worker processes, with a key prefix
    of their own that is cleaned up afterwards; ``options`` go to both
    (``stream_maxlen=5``; ``evict_after`` is 3 s unless they say: long enough
    for a test to read an ended run on a loaded machine)."""
    from detached_runs.backends.redis import RedisBackend

    prefix = f"dr-test-{uuid.uuid4().hex[:8]}"
    a, b = (
        RedisBackend(redis_url=url, redis_prefix=prefix, **{"evict_after": 3.0, **options})
        for _ in range(2)
    )
    try:
        yield a, b
    finally:
        await a.shutdown(2)
        await b.shutdown(2)
        cleaner = RedisBackend(redis_url=url, redis_prefix=prefix)
        await delete_keys(cleaner.redis, prefix)
        await cleaner.redis.aclose()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """A Redis Cluster of three primaries of this test process's own
    (`tests.redis_cluster`), shared by its tests, which keep to key
    prefixes of their own."""
    from .redis_cluster import RedisClusterServers  # it uses this module's helpers

    servers = RedisClusterServers(masters=3)
    yield servers
    servers.stop()


@pytest.fixture
def memory_backend() -> MemoryBackend:
    """The in-process backend, for what only it does (its registry's size,
    its wake-ups)."""
    return MemoryBackend(evict_after=0.2)


def new_id() -> str:
    return uuid.uuid4().hex


async def paced(words: list[Any], delay: float = 0.001) -> AsyncIterator[Any]:
    for word in words:
        await asyncio.sleep(delay)
        yield word


async def collect(subscription: Any) -> list[Event]:
    return [event async for event in subscription]


async def eventually(check: Any, what: str, timeout: float = 5.0) -> None:
    """Wait until ``await check()`` is true; fail with ``what`` after ``timeout`` s."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.02)


async def ended(session_key: str) -> Any:
    """The session's latest `Run` row once it is no longer in flight
    (awaited from the test's event loop; fails after 10 s)."""
    from detached_runs.models import Run

    for _ in range(1000):
        row = await Run.objects.filter(session_key=session_key).order_by("-started_at").afirst()
        if row is not None and row.status not in ("running", "waiting"):
            return row
        await asyncio.sleep(0.01)
    raise AssertionError("the run did not end")


def ended_row(session_key: str, timeout: float, what: str) -> Any:
    """The session's latest `Run` row once it is no longer ``running`` (polled
    from the test's thread); fails with ``what`` after ``timeout`` s."""
    import time

    from detached_runs.models import Run

    deadline = time.monotonic() + timeout
    while (row := Run.objects.filter(session_key=session_key).latest("started_at")).status in (
        "running",
        "waiting",
    ):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return row


def text_of(events: list[Event]) -> str:
    return "".join(e.data["text"] for e in events if e.event == "delta")


def terminals(events: list[Event]) -> list[Event]:
    return [e for e in events if e.event == "done"]


def positions_follow(events: list[Any], run_id: str, after: Position = ORIGIN) -> bool:
    """Whether every event's id is the position it has in its run's log (text
    bytes, other events) counting on from ``after``: the ids that the run's
    own worker gives, whichever worker sends them. Takes `Event`s and the SSE
    events of `tests.http` alike."""
    text, seq = after.text, after.seq
    for event in events:
        if event.event == "delta":
            text += len(event.data["text"].encode())
        else:
            seq += 1
        if event.id != make_id(run_id, Position(text, seq)):
            return False
    return True


# -- a real daphne server ----------------------------------------------------------


class Server:
    def __init__(self, port: int, process: Any, log: Any, env: dict[str, str]) -> None:
        self.port = port
        self.process = process
        self.log = log
        #: The environment it runs with.
        self.env = env

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as handle:
            return handle.read()


def as_stored(value: Any) -> Any:
    """JSON data as a database's JSON column gives it back: numbers compared
    as floats (PostgreSQL's jsonb keeps a float of 1e16 or more as the integer
    it equals, ``9.93063082179097e+16`` as ``99306308217909700``)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, dict):
        return {key: as_stored(item) for key, item in value.items()}
    return [as_stored(item) for item in value]


def require_redis(*, module: bool = False) -> None:
    """Skip (the whole module, with ``module``) if no Redis answers on
    127.0.0.1:6379; raise instead under ``DETACHED_RUNS_REQUIRE_REDIS=1``
    (CI), where a Redis test must not skip."""
    import socket

    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=0.5).close()
    except OSError:
        if os.environ.get("DETACHED_RUNS_REQUIRE_REDIS") == "1":
            raise RuntimeError(
                "DETACHED_RUNS_REQUIRE_REDIS=1 but no Redis on 127.0.0.1:6379"
            ) from None
        pytest.skip("no Redis server on 127.0.0.1:6379", allow_module_level=module)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: The Redis key prefixes of the servers this process started (`server_env`).
_server_prefixes: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def _server_keys_deleted() -> Iterator[None]:
    """What this process's servers left in the machine's Redis goes at the end."""
    yield
    if os.environ.get("TEST_BACKEND") != "redis" or not _server_prefixes:
        return
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379)
    try:
        for prefix in _server_prefixes:
            keys = list(client.scan_iter(match=f"*{prefix}*"))
            if keys:
                client.delete(*keys)
    except redis.RedisError:
        pass  # Redis is not there: nothing was left in it
    finally:
        client.close()


def server_env(**extra: str) -> dict[str, str]:
    """The environment for a server process that shares the test database.
    On the Redis pass its key prefix is its own (``TEST_REDIS_PREFIX``; the
    same for servers started again with this environment): servers of
    other tests in this process do not share its runs, nor their counts
    (the anonymous runs of a client address, which dead servers' runs
    fill until their leases lapse)."""
    import os
    from urllib.parse import urlparse, urlunparse

    from django.db import connection

    prefix = f"dr-server-{uuid.uuid4().hex[:10]}"
    _server_prefixes.append(prefix)
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="tests.settings",
        PYTHONUNBUFFERED="1",
        TEST_REDIS_PREFIX=prefix,
    )
    name = str(connection.settings_dict["NAME"])
    if connection.vendor == "sqlite":
        env["DETACHED_RUNS_TEST_DB"] = name
        env["TEST_SQLITE_TRANSACTION_MODE"] = "IMMEDIATE"
    else:
        url = urlparse(os.environ["DATABASE_URL"])
        env["DATABASE_URL"] = urlunparse(url._replace(path="/" + name))
    env.update(extra)
    return env


def die_with_the_tests() -> None:
    """Run in a server's child process before it starts: Linux sends it SIGTERM
    when the test run that started it dies, so a run killed on a timeout
    (which skips every teardown) leaves no server behind."""
    import ctypes
    import signal

    # A test run started in the background by a shell inherits SIGINT ignored,
    # and so would the server; its own SIGINT handling is under test.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: teardown still stops the servers of a run that ends


def start_server(
    env: dict[str, str], app: str = "tests.asgi:application", kind: str = "daphne"
) -> Server:
    import socket
    import subprocess
    import sys
    import tempfile
    import time

    port = free_port()
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the server
        "w+", prefix="daphne-", suffix=".log", delete=False
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), app]
        if kind == "daphne"
        else [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port), app],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_the_tests,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{kind} exited:\n{Path(log.name).read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return Server(port, process, log, env)
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"{kind} did not listen:\n{Path(log.name).read_text()}")


def stop_server(server: Server) -> None:
    import subprocess

    server.process.terminate()
    try:
        server.process.wait(10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session", params=["daphne", "uvicorn"])
def server(request: Any, django_db_setup: Any, django_db_blocker: Any) -> Any:
    """The test project under a real ASGI server: every end-to-end test runs
    under daphne (Twisted) and under uvicorn (asyncio, with its own flow
    control and lifespan)."""
    with django_db_blocker.unblock():
        env = server_env(
            TEST_AGENT_DELAY="0.02",
            TEST_KEEPALIVE="0.3",
            TEST_EVICT_AFTER="1",
            LOG="DEBUG",
            TEST_SWEEP_ROWS="0",  # it outlives its tests: see tests/asgi.py
        )
    running = start_server(env, kind=request.param)
    yield running
    stop_server(running)


@pytest.fixture
def browser(server: Server) -> Any:
    """A client of `server` with cookies of its own (`tests.http.Browser`)."""
    from .http import Browser

    return Browser(server.port)


@pytest.fixture
def key() -> str:
    """A fresh session key."""
    return uuid.uuid4().hex[:12]


# -- a redis-server of the test's own ---------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own (`tests.redis_server.RedisServer`)."""
    from .redis_server import RedisServer  # it uses this module's helpers

    server = RedisServer()
    yield server
    server.kill()


# -- two workers sharing Redis and the database ----------------------------------

#: The environment of workers whose Redis leases are short (2 s, renewed every
#: 0.5 s), for a test that waits for a dead worker's lease to lapse; not for
#: one that pauses Redis's writes longer than that (a live worker cannot renew
#: its lease then, and its runs are taken for dead).
SHORT_LEASE = {"TEST_REDIS_LEASE_MS": "2000", "TEST_REDIS_RENEW_EVERY": "0.5"}
#: Seconds within which live workers with `SHORT_LEASE` end a dead worker's
#: runs by themselves: its lease lapses, then a sweep finds it (plus slack).
LEASE_BOUND = 2.0 + 2 * 0.5 + 3


@pytest.fixture
def database_fault() -> Iterator[DatabaseFault]:
    """A database the test can make refuse (`tests.database_fault`); request
    it before `start_workers`, so that the workers stop before it goes."""
    from .database_fault import DatabaseFault

    fault = DatabaseFault()
    yield fault
    fault.close()


@pytest.fixture
def start_workers() -> Iterator[Any]:
    """``start_workers(**env)``: two daphne workers sharing Redis and the
    database, ``env`` overriding their ``TEST_*`` settings (``TEST_REDIS_URL``,
    ``TEST_SHUTDOWN_TIMEOUT``...); ``start_workers(fault, **env)`` puts their
    database behind ``fault`` (`database_fault`); ``kinds`` are their servers
    (``("daphne", "uvicorn")``...). Returns the pair; they are
    stopped, and their Redis keys deleted, afterwards. The key prefix is
    ``pair[0].env["TEST_REDIS_PREFIX"]``."""
    pytest.importorskip("redis")
    import redis

    started: list[tuple[tuple[Server, Server], str, str]] = []

    def start(
        fault: DatabaseFault | None = None,
        *,
        kinds: tuple[str, str] = ("daphne", "daphne"),
        **env: str,
    ) -> tuple[Server, Server]:
        prefix = f"dr-e2e-{uuid.uuid4().hex[:8]}"
        environment = server_env(
            **{
                "TEST_BACKEND": "redis",
                "TEST_REDIS_PREFIX": prefix,
                "TEST_AGENT_DELAY": "0.02",
                "TEST_EVICT_AFTER": "30",
                # A stream waiting for a dead worker's run stays open.
                "TEST_KEEPALIVE": "1",
                "LOG": "INFO",
                **env,
            }
        )
        if fault is not None:
            environment = fault.env(environment)
        pair = start_server(environment, kind=kinds[0]), start_server(environment, kind=kinds[1])
        started.append((pair, prefix, env.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")))
        return pair

    yield start
    for pair, prefix, url in started:
        for server in pair:
            stop_server(server)
        client = redis.Redis.from_url(url)
        try:
            keys = list(client.scan_iter(match=f"*{prefix}*"))
            if keys:
                client.delete(*keys)
        except redis.RedisError:
            pass  # the test's own Redis is gone already
        client.close()


@pytest.fixture(scope="session", autouse=True)
def _close_async_connections(django_db_setup: Any) -> Any:
    """The async ORM's queries run on asgiref's one sync thread (and the app's
    on the threads of ``DATABASE_THREADS``), whose connections would otherwise
    stay open and keep PostgreSQL from dropping the test database."""
    yield
    from asgiref.sync import SyncToAsync
    from django.db import connections

    from detached_runs.db import close_pool_connections

    SyncToAsync.single_thread_executor.submit(connections.close_all).result()
    close_pool_connections()

"""The Redis backend on a master watched by Redis Sentinel, all of the test's
own (`tests.redis_sentinel`): two backend instances stand for two workers,
which find the master through the sentinel, again after a failover."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import (
    Saves,
    collect,
    die_with_the_tests,
    eventually,
    free_port,
    new_id,
    paced,
    positions_follow,
    terminals,
    text_of,
    two_workers,
)
from .redis_sentinel import RedisSentinelServers
from .redis_server import wait_listening

pytest.importorskip("redis")

from detached_runs.backends.redis import BlockingSentinelConnectionPool, RedisBackend

WORDS = [f"w{i} " for i in range(40)]
FULL = "".join(WORDS)


@pytest.fixture(scope="module")
def sentinel() -> Iterator[RedisSentinelServers]:
    servers = RedisSentinelServers()
    yield servers
    servers.stop()


async def start(backend: RedisBackend, source: Any, saves: Saves, session: str = "s") -> str:
    run_id = new_id()
    await backend.start(
        session, run_id, source, start_data={"run": run_id}, meta={"owner": "o"}, finalize=saves
    )
    return run_id


async def _saved(saves: Saves, run_id: str) -> bool:
    return any(end.run_id == run_id for end in saves.ends)


async def test_a_run_is_followed_and_stopped_from_another_worker_through_sentinel(sentinel, caplog):
    caplog.set_level(logging.WARNING, logger="detached_runs")
    saves = Saves()
    async with two_workers(sentinel.url) as (a, b):
        first = await start(a, paced(WORDS, 0.002), saves)
        events = await collect(await b.subscribe("s"))
        assert text_of(events) == FULL and positions_follow(events, first)
        second = await start(a, paced(WORDS * 50, 0.01), saves)
        following = await b.subscribe("s")
        assert await b.count_running("o") == 1
        assert await b.stop("s", second) is True
        assert (await collect(following))[-1].data == {"status": "stopped"}
        await eventually(lambda: _saved(saves, second), "the stopped run was not saved")
    assert not [r for r in caplog.records if r.name.startswith("detached_runs")]


async def test_a_command_past_the_pools_connections_waits_for_one_instead_of_failing(sentinel):
    backend = RedisBackend(redis_url=sentinel.url, connection_kwargs={"max_connections": 1})
    assert isinstance(backend.redis.connection_pool, BlockingSentinelConnectionPool)
    try:
        loop = asyncio.get_running_loop()
        began = loop.time()
        # The one connection blocks for 0.3 s; the PING waits for it.
        held = asyncio.ensure_future(backend.redis.blpop([f"nothing-{uuid.uuid4().hex}"], 0.3))
        await asyncio.sleep(0.05)
        assert await backend.redis.ping() is True
        assert loop.time() - began >= 0.25 and (await held) is None
    finally:
        await backend.shutdown(2)


async def test_a_failover_mid_run_loses_no_token_and_doubles_none(sentinel, caplog):
    """``SENTINEL FAILOVER`` while a run streams: the workers find the new
    master through the sentinel, and the followers on both workers and the
    end saved for the run's row hold every token once, in order. (What the
    old master took after its replica stopped following it is lost: the
    writer's fenced append finds out and writes it again.)"""
    words = [f"t{i} " for i in range(200)]
    saves = Saves()
    async with two_workers(sentinel.url) as (a, b):
        run_id = await start(a, paced(words, 0.01), saves)
        on_a, on_b = await a.subscribe("s"), await b.subscribe("s")
        seen = await on_b.next_batch()
        while len(text_of(seen)) < 100:
            seen += await on_b.next_batch()
        sentinel.fail_over()
        seen += await collect(on_b)
        here = await collect(on_a)
        for events in (seen, here):
            assert text_of(events) == "".join(words) and positions_follow(events, run_id)
            assert [e.data for e in terminals(events)] == [{"status": "done"}]
        await eventually(lambda: _saved(saves, run_id), "the run was not saved")
        assert saves.ends[-1].output == "".join(words)
        third = RedisBackend(redis_url=sentinel.url, redis_prefix=a.prefix)
        replayed = await collect(await third.subscribe("s"))
        await third.shutdown(2)
        assert text_of(replayed) == "".join(words) and replayed[-1].data == {"status": "done"}
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


async def test_a_worker_listening_on_a_master_that_hangs_listens_on_the_new_one():
    """The master hangs (SIGSTOP) and the sentinel fails it over: the worker
    listens on the new master, while the old one still hangs, and a message
    published there (an adoption, whose only way to the worker that drives
    the run is this channel) reaches it."""
    servers = RedisSentinelServers()
    saves = Saves()
    gate = asyncio.Event()

    async def gated() -> Any:
        yield "half "
        await gate.wait()
        yield "rest"

    try:
        async with two_workers(servers.url, renew_every=1.0) as (a, b):
            await a.start(
                "s", new_id(), gated(), start_data={}, meta={"owner": "anon:a"}, finalize=saves
            )
            await eventually(lambda: _listens(servers, a, servers.master), "A does not listen")
            old = servers.pause_master()
            try:
                new = servers.replica if old == servers.master else servers.master
                await eventually(lambda: _master_is(servers, new), "no failover", timeout=30)
                await eventually(
                    lambda: _listens(servers, a, new), "A does not listen on the new master", 30
                )

                # What B finds to adopt in Redis depends on what the hung
                # master had passed on (A writes a lost run again once its
                # lease's renewal there times out); its message to A is sent
                # either way, and only the channel under test brings it.
                await b.adopt("anon:a", "user:1", ["s"])

                async def adopted_on_a() -> bool:
                    return a.driver.runs["s"].meta.get("owner") == "user:1"

                await eventually(adopted_on_a, "A did not hear of the adoption")
            finally:
                servers.resume()
            gate.set()
            await collect(await a.subscribe("s"))
    finally:
        servers.stop()


async def _master_is(servers: RedisSentinelServers, port: int) -> bool:
    return await asyncio.to_thread(servers.master_port) == port


async def _listens(servers: RedisSentinelServers, backend: RedisBackend, port: int) -> bool:
    """Whether a worker (the only one that listens) listens on the server on ``port``."""
    channel = f"{backend.prefix}:adopt"
    said = await asyncio.to_thread(servers.command, port, "pubsub", "numsub", channel)
    return said.split()[-1] == "1"


@pytest.fixture(scope="module")
def tls_sentinel(tmp_path_factory: Any) -> Iterator[tuple[int, int, str]]:
    """A master that takes TLS only and a sentinel that takes TLS (and, on
    another port, plain connections), with a certificate of the test's own:
    ``(TLS port, plain port, CA file)`` of the sentinel."""
    if shutil.which("openssl") is None or shutil.which("redis-server") is None:
        pytest.skip("openssl and redis-server are needed")
    directory = tmp_path_factory.mktemp("tls-sentinel")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    tls = f"tls-cert-file {cert}\ntls-key-file {key}\ntls-ca-cert-file {cert}\n"
    tls += "tls-auth-clients no\ntls-replication yes\n"
    master, sentinel, plain = free_port(), free_port(), free_port()
    (directory / "master.conf").write_text(f"port 0\ntls-port {master}\nsave ''\n{tls}")
    (directory / "sentinel.conf").write_text(
        f"port {plain}\ntls-port {sentinel}\n{tls}sentinel monitor mymaster 127.0.0.1 {master} 1\n"
    )
    processes = [
        subprocess.Popen(
            ["redis-server", str(directory / name), *extra],
            stdout=subprocess.DEVNULL,
            cwd=directory,
            preexec_fn=die_with_the_tests,
        )
        for name, extra in (("master.conf", []), ("sentinel.conf", ["--sentinel"]))
    ]
    try:
        for port in (master, sentinel, plain):
            wait_listening(port, "redis-server")
        yield sentinel, plain, str(cert)
    finally:
        for process in processes:
            process.kill()
            process.wait()


async def test_a_rediss_sentinel_url_speaks_tls_to_the_sentinels_too(tls_sentinel):
    sentinel, _, ca = tls_sentinel
    url = f"rediss+sentinel://127.0.0.1:{sentinel}/mymaster/0"
    backend = RedisBackend(redis_url=url, connection_kwargs={"ssl_ca_certs": ca})
    try:
        assert await backend.now() > 0
    finally:
        await backend.shutdown(2)


async def test_sentinels_without_tls_are_told_by_sentinel_kwargs(tls_sentinel):
    _, plain, ca = tls_sentinel
    url = f"rediss+sentinel://127.0.0.1:{plain}/mymaster/0"
    options = {"ssl_ca_certs": ca, "sentinel_kwargs": {"ssl": False}}
    backend = RedisBackend(redis_url=url, connection_kwargs=options)
    try:
        assert await backend.now() > 0
    finally:
        await backend.shutdown(2)


async def test_a_move_a_reconnect_noticed_first_still_drops_the_connections_in_use(
    sentinel, caplog
):
    """A connection that reconnects after a failover updates the pool's idea
    of the master (and drops the idle connections); the connections in use,
    a blocked XREAD among them, are still on the old master. The sweep's
    look at the master still sees the move, and drops them."""
    backend = RedisBackend(redis_url=sentinel.url, redis_prefix=f"dr-sent-{uuid.uuid4().hex[:8]}")
    try:
        await backend.now()
        await backend._follow_master()
        pool = backend.redis.connection_pool
        in_use = await pool.get_connection()
        await in_use.send_command("PING")
        assert await in_use.read_response() == b"PONG"
        old = pool.master_address
        sentinel.fail_over()

        async def moved() -> bool:
            # What a connection that reconnects does (the sentinel's list of
            # masters shows the move once its failover is over).
            return await pool.get_master_address() != old

        await eventually(moved, "the pool never saw the master move", 20)
        with caplog.at_level(logging.WARNING, logger="detached_runs"):
            await backend._follow_master()
        assert "moved the master" in caplog.text
        assert not in_use.is_connected
        await pool.release(in_use)
        await backend.now()  # on the new master
    finally:
        await backend.shutdown(2)

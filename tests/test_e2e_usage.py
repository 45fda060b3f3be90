"""Usage over a real server (daphne), on the memory backend and on Redis: the
usage of a run that is done, stopped, failed, shut down or whose worker was
killed, as clients get it (SSE, the status endpoint) and as its row keeps it;
and the OpenAI-compatible agent against a fake endpoint (`tests.fake_openai`)
running beside the server."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from detached_runs.models import Run

from .agents import script
from .conftest import (
    LEASE_BOUND,
    SHORT_LEASE,
    Server,
    ended_row,
    require_redis,
    server_env,
    start_server,
    stop_server,
)
from .fake_openai import FakeOpenAI, Reply, chunk, text_chunks, usage_chunk
from .http import SSE, Browser, text

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

BACKENDS = ["memory", "redis"]
WORDS = [f"w{i} " for i in range(500)]
INPUT = {"input_tokens": 40, "model": "scripted"}
ESTIMATE = {"output_tokens": 3, "estimated": True}
#: A script that reports its input tokens, then words until it is stopped,
#: when it reports an estimate of its output (`tests.agents.words`).
STOPPED_MIDWAY = [{"event": "usage", "data": INPUT}, {"report_unless_done": ESTIMATE}, *WORDS]


def launch(backend: str, **env: str) -> Server:
    """A daphne server of the test's own on ``backend`` (a Redis key prefix of
    its own), sharing the test database."""
    if backend == "redis":
        require_redis()
    settings = {
        "TEST_BACKEND": backend,
        "TEST_REDIS_PREFIX": f"dr-e2e-usage-{uuid.uuid4().hex[:8]}",
        "TEST_AGENT_DELAY": "0.02",
        "TEST_SHUTDOWN_TIMEOUT": "5",
        "LOG": "INFO",
        **env,
    }
    environment = server_env(**settings)
    if backend == "memory":
        environment.pop("TEST_BACKEND")
    return start_server(environment)


@pytest.fixture(scope="module", params=BACKENDS)
def server(request: Any, django_db_setup: Any, django_db_blocker: Any) -> Iterator[Server]:
    """A server on each backend in turn, for the tests that do not kill it."""
    with django_db_blocker.unblock():
        running = launch(request.param)
    yield running
    stop_server(running)


def start(browser: Browser, key: str, items: list[Any]) -> None:
    assert browser.request("POST", f"/runs/{key}/", {"prompt": script(items)}).status == 202


def usage_of(events: list[SSE]) -> list[Any]:
    return [event.data for event in events if event.event == "usage"]


def ended(key: str, timeout: float = 15) -> Run:
    row: Run = ended_row(key, timeout, "the run never ended")
    return row


def status(browser: Browser, key: str) -> dict[str, Any]:
    run: dict[str, Any] = browser.request("GET", f"/runs/{key}/").json()["run"]
    return run


# -- done, stopped, error ------------------------------------------------------------


def test_a_done_runs_usage_reaches_clients_and_its_row(server):
    key = uuid.uuid4().hex[:10]
    browser = Browser(server.port)
    start(
        browser,
        key,
        [
            {"event": "usage", "data": INPUT},
            "Hello ",
            "there.",
            {"event": "usage", "data": {"output_tokens": 2, "total_tokens": 42}},
        ],
    )
    events = browser.stream(f"/runs/{key}/events/").rest()
    assert usage_of(events) == [INPUT, {"output_tokens": 2, "total_tokens": 42}]
    assert events[-1].data == {"status": "done"}
    usage = {**INPUT, "output_tokens": 2, "total_tokens": 42}
    row = ended(key)
    assert (row.status, row.output, row.usage) == ("done", "Hello there.", usage)
    assert row.first_token_at is not None and row.started_at < row.first_token_at
    run = status(browser, key)
    assert run["usage"] == usage and run["first_token_at"] == row.first_token_at.isoformat()


def test_a_stopped_run_keeps_its_usage_and_what_its_agent_reported_as_it_stopped(server):
    key = uuid.uuid4().hex[:10]
    browser = Browser(server.port)
    start(browser, key, STOPPED_MIDWAY)
    stream = browser.stream(f"/runs/{key}/events/")
    seen = stream.take(6)
    assert browser.request("POST", f"/runs/{key}/stop/").json() == {"stopped": True}
    seen += stream.rest()
    assert usage_of(seen) == [INPUT, ESTIMATE]
    assert [e.event for e in seen][-2:] == ["usage", "done"]
    assert seen[-1].data == {"status": "stopped"}
    row = ended(key)
    assert row.status == "stopped" and row.output == text(seen)
    assert row.usage == {**INPUT, **ESTIMATE}
    assert status(browser, key)["usage"] == row.usage


def test_a_failed_run_keeps_its_usage(server):
    key = uuid.uuid4().hex[:10]
    browser = Browser(server.port)
    start(browser, key, [{"event": "usage", "data": INPUT}, "partial ", {"raise": "overloaded"}])
    events = browser.stream(f"/runs/{key}/events/").rest()
    assert events[-1].data == {"status": "error", "error": "overloaded"}
    row = ended(key)
    assert (row.status, row.output, row.usage) == ("error", "partial ", INPUT)


# -- a process that ends or dies -----------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_shutdown_saves_the_usage_of_the_runs_it_interrupts(backend):
    server = launch(backend)
    try:
        key = uuid.uuid4().hex[:10]
        browser = Browser(server.port)
        start(browser, key, STOPPED_MIDWAY)
        stream = browser.stream(f"/runs/{key}/events/")
        seen = stream.take(6)
        server.process.send_signal(signal.SIGTERM)
        seen += stream.rest()
        server.process.wait(timeout=15)
    finally:
        stop_server(server)
    assert seen[-1].data == {"status": "interrupted"} and usage_of(seen) == [INPUT, ESTIMATE]
    row = Run.objects.get(session_key=key)
    assert row.status == "interrupted" and row.usage == {**INPUT, **ESTIMATE}
    assert "Traceback" not in server.output()


def test_a_killed_servers_run_keeps_the_usage_of_its_last_checkpoint():
    """Memory backend: kill -9, then a new server on the same database shows
    the run interrupted with what its last checkpoint (every 0.2 s) saved."""
    first = launch("memory")
    key = uuid.uuid4().hex[:10]
    browser = Browser(first.port)
    try:
        start(browser, key, [{"event": "usage", "data": INPUT}, *WORDS])
        browser.stream(f"/runs/{key}/events/").take(30)  # ~0.6 s: checkpoints were written
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait(timeout=10)
    finally:
        stop_server(first)
    assert Run.objects.get(session_key=key).status == "running"
    second = launch("memory")
    try:
        browser.port = second.port
        run = status(browser, key)
        assert run["status"] == "interrupted" and run["usage"] == INPUT
        assert run["first_token_at"] is not None
    finally:
        stop_server(second)
    assert Run.objects.get(session_key=key).usage == INPUT


def test_a_dead_workers_run_is_saved_with_the_usage_in_its_redis_log(start_workers):
    """Redis, two workers: A is killed (-9); B ends the run from its log in
    Redis, usage events included, unasked, within the lease bound."""
    a, b = start_workers(**SHORT_LEASE)
    key = uuid.uuid4().hex[:10]
    on_a = Browser(a.port)
    usage = {"output_tokens": 9, "cost": 0.25}
    items = [{"event": "usage", "data": INPUT}, *WORDS[:20], {"event": "usage", "data": usage}]
    start(on_a, key, [*items, *WORDS[20:]])
    on_b = Browser(b.port, cookies=dict(on_a.cookies))
    stream = on_b.stream(f"/runs/{key}/events/")
    seen = stream.take(30)
    assert usage_of(seen) == [INPUT, usage]
    os.kill(a.process.pid, signal.SIGKILL)
    a.process.wait(timeout=10)
    seen += stream.rest()
    assert seen[-1].data == {"status": "interrupted"}
    row = ended_row(key, LEASE_BOUND, "the dead worker's run was never ended")
    assert row.status == "interrupted" and row.usage == {**INPUT, **usage}
    assert row.output == text(seen)


# -- the OpenAI-compatible agent -----------------------------------------------------


@pytest.fixture
def endpoint() -> Iterator[FakeOpenAI]:
    """The fake endpoint, served from a thread of its own (its event loop)
    while the test's thread speaks to the server."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-openai", daemon=True)
    thread.start()
    fake = FakeOpenAI()
    asyncio.run_coroutine_threadsafe(fake.__aenter__(), loop).result(5)
    yield fake
    asyncio.run_coroutine_threadsafe(fake.__aexit__(None, None, None), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


@pytest.fixture(params=BACKENDS)
def openai_server(request: Any, endpoint: FakeOpenAI) -> Iterator[Server]:
    running = launch(
        request.param,
        TEST_AGENT="detached_runs.agents.openai.agent",
        OPENAI_BASE_URL=endpoint.url,
        OPENAI_MODEL="fake-model",
        OPENAI_API_KEY="",
    )
    yield running
    stop_server(running)


def test_a_finished_openai_run_has_the_endpoints_usage(openai_server, endpoint):
    endpoint.replies.append(Reply([*text_chunks("Forty", "-two."), usage_chunk(25, 4)]))
    key = uuid.uuid4().hex[:10]
    browser = Browser(openai_server.port)
    assert browser.request("POST", f"/runs/{key}/", {"prompt": "The answer?"}).status == 202
    events = browser.stream(f"/runs/{key}/events/").rest()
    usage = {"input_tokens": 25, "output_tokens": 4, "total_tokens": 29, "model": "fake-model-2024"}
    assert usage_of(events) == [usage] and events[-1].data == {"status": "done"}
    row = ended(key)
    assert (row.status, row.output, row.usage) == ("done", "Forty-two.", usage)
    assert endpoint.requests[-1].body["stream_options"] == {"include_usage": True}


def test_a_stopped_openai_run_keeps_an_estimate_of_its_usage(openai_server, endpoint):
    endpoint.replies.append(
        Reply([chunk(role="assistant", content="Half "), chunk(content="an answer")], ending="hold")
    )
    key = uuid.uuid4().hex[:10]
    browser = Browser(openai_server.port)
    prompt = "Tell me everything"
    assert browser.request("POST", f"/runs/{key}/", {"prompt": prompt}).status == 202
    stream = browser.stream(f"/runs/{key}/events/")
    seen = stream.take(1)
    while text(seen) != "Half an answer":
        seen += stream.take(1)
    assert browser.request("POST", f"/runs/{key}/stop/").json() == {"stopped": True}
    seen += stream.rest()
    estimate = {
        "input_tokens": 5,  # 18 characters sent
        "output_tokens": 4,  # 14 written
        "total_tokens": 9,
        "model": "fake-model",
        "estimated": True,
    }
    assert usage_of(seen) == [estimate] and seen[-1].data == {"status": "stopped"}
    row = ended(key)
    assert (row.status, row.output, row.usage) == ("stopped", "Half an answer", estimate)
    deadline = time.monotonic() + 5
    while endpoint.open_connections:  # the agent hung up on the endpoint
        assert time.monotonic() < deadline
        time.sleep(0.05)

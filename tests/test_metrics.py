"""Step 13, metrics: what `detached_runs.metrics` counts for real runs, who may
read it (staff, a bearer token), the same figures from two worker processes
in prometheus_client's multiprocess mode, and the app without
prometheus_client."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from django.test import AsyncClient

from detached_runs import runs
from detached_runs.models import Run

from .agents import forever, script

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = pytest.mark.django_db(transaction=True)

OWNER = "user:1"
TOKEN = {"Authorization": "Bearer metrics-token-for-the-tests"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(body: bytes) -> Samples:
    """``{(sample name, labels): value}`` of a Prometheus text exposition."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape() -> Samples:
    response = await AsyncClient().get("/metrics", headers=TOKEN)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=")
    return parse(response.content)


async def ended(session: str, timeout: float = 10.0) -> Run:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        row = await Run.objects.filter(session_key=session).afirst()
        if row is not None and row.status not in ("running", "waiting", "queued"):
            return row
        assert asyncio.get_running_loop().time() < deadline, "the run did not end"
        await asyncio.sleep(0.05)


async def test_a_run_is_counted_once_started_and_once_ended_with_its_text_events_and_times():
    before = await scrape()
    items = [
        "añ€😀 ",  # 13 bytes of UTF-8
        {"event": "tool_call", "data": {"id": "1", "name": "search"}},
        {"event": "my_own_event", "data": {}},
        {"event": "usage", "data": {"input_tokens": 3}},
        "end",
    ]
    await runs.start("counted", prompt=script(items), owner=OWNER)
    row = await ended("counted")
    assert row.status == "done"
    after = await scrape()

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("detached_runs_runs_started_total") == 1
    assert grew("detached_runs_runs_ended_total", status="done") == 1
    assert grew("detached_runs_runs_ended_total", status="stopped") == 0
    assert grew("detached_runs_text_bytes_total") == len("añ€😀 end".encode())
    assert grew("detached_runs_events_logged_total", event="start") == 1
    assert grew("detached_runs_events_logged_total", event="done") == 1
    assert grew("detached_runs_events_logged_total", event="tool_call") == 1
    assert grew("detached_runs_events_logged_total", event="usage") == 1
    # An agent's own event name is not a label of its own: labels stay bounded.
    assert grew("detached_runs_events_logged_total", event="other") == 1
    own = frozenset({("event", "my_own_event")})
    assert ("detached_runs_events_logged_total", own) not in after
    assert grew("detached_runs_run_duration_seconds_count") == 1
    assert grew("detached_runs_time_to_first_token_seconds_count") == 1
    duration = grew("detached_runs_run_duration_seconds_sum")
    assert row.finished_at is not None
    assert duration == pytest.approx((row.finished_at - row.started_at).total_seconds())


async def test_a_stop_is_timed_from_its_request_to_the_terminal_event():
    before = await scrape()
    await runs.start("stopped", prompt="forever", owner=OWNER, agent=forever)
    await asyncio.sleep(0.1)
    assert await runs.stop("stopped", owner=OWNER)
    assert (await ended("stopped")).status == "stopped"
    after = await scrape()
    count = "detached_runs_stop_latency_seconds_count"
    assert value(after, count) - value(before, count) == 1
    assert (
        value(after, "detached_runs_runs_ended_total", status="stopped")
        - value(before, "detached_runs_runs_ended_total", status="stopped")
        == 1
    )
    seconds = value(after, "detached_runs_stop_latency_seconds_sum") - value(
        before, "detached_runs_stop_latency_seconds_sum"
    )
    assert 0 <= seconds < 5


async def test_runs_in_flight_and_queued_are_counted_in_the_database():
    assert {
        status: value(await scrape(), "detached_runs_runs", status=status)
        for status in ("running", "waiting", "queued")
    } == {"running": 0, "waiting": 0, "queued": 0}
    await runs.start("gauge", prompt="forever", owner=OWNER, agent=forever)
    await runs.start("gauge", prompt="2", owner=OWNER, multitask="enqueue")
    await runs.start("gauge-ask", prompt=script([{"ask": {"q": "?"}}]), owner=OWNER)
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        samples = await scrape()
        counted = {
            status: value(samples, "detached_runs_runs", status=status)
            for status in ("running", "waiting", "queued")
        }
        if counted == {"running": 1, "waiting": 1, "queued": 1}:
            break
        assert asyncio.get_running_loop().time() < deadline, counted
        await asyncio.sleep(0.05)
    await runs.stop("gauge", owner=OWNER, queued=True)
    await runs.stop("gauge-ask", owner=OWNER)


async def test_subscribers_are_counted_while_they_follow():
    await runs.start("followed", prompt="forever", owner=OWNER, agent=forever)
    before = value(await scrape(), "detached_runs_subscribers")
    subscription = await runs.subscribe("followed", owner=OWNER)
    assert value(await scrape(), "detached_runs_subscribers") == before + 1
    await subscription.aclose()
    assert value(await scrape(), "detached_runs_subscribers") == before
    await runs.stop("followed", owner=OWNER)


@pytest.mark.parametrize(
    ("headers", "staff", "status"),
    [
        ({}, False, 403),
        ({"Authorization": "Bearer wrong"}, False, 403),
        ({"Authorization": "Basic metrics-token-for-the-tests"}, False, 403),
        ({"Authorization": "Bearer metrics-token-for-the-tests"}, False, 200),
        ({}, True, 200),
    ],
    ids=["nobody", "a-wrong-token", "another-scheme", "the-token", "staff"],
)
async def test_only_staff_or_the_token_may_read_them(headers, staff, status):
    from django.contrib.auth.models import User

    client = AsyncClient()
    user = await User.objects.acreate(username=f"u{uuid.uuid4().hex[:8]}", is_staff=staff)
    await client.aforce_login(user)
    response = await client.get("/metrics", headers=headers)
    assert response.status_code == status
    if status != 200:
        assert b"detached_runs" not in response.content  # no figures leak
    assert (await client.post("/metrics", headers=TOKEN)).status_code == 405


@pytest.mark.parametrize("token", ["short", "", 1234567890123456789])
async def test_a_token_the_check_refuses_lets_nobody_in(config, token):
    """daphne and uvicorn run no system checks: a METRICS_TOKEN that E010
    refuses (under 16 characters, not a string) must not open the figures."""
    config(METRICS_TOKEN=token)
    client = AsyncClient()
    for given in (str(token), ""):
        response = await client.get("/metrics", headers={"Authorization": f"Bearer {given}"})
        assert response.status_code == 403


async def test_redis_failures_are_counted(own_redis):
    pytest.importorskip("redis")
    from detached_runs.backends.redis import RedisBackend
    from detached_runs.exceptions import BackendUnavailable

    backend = RedisBackend(redis_url=own_redis.url, redis_prefix="dr-metrics")
    before = value(await scrape(), "detached_runs_redis_errors_total")
    own_redis.kill()
    with pytest.raises(BackendUnavailable):
        await backend.get("nobody")
    assert value(await scrape(), "detached_runs_redis_errors_total") == before + 1
    await backend.shutdown(1)


def test_without_prometheus_client_the_app_works_and_the_url_says_what_to_install():
    """The extra is optional: with prometheus_client missing, runs are counted
    by no-ops, and the metrics URL answers 501 with the pip command."""
    program = """
import sys
sys.modules["prometheus_client"] = None  # not installed
import django
django.setup()
from django.contrib.auth.models import User
from django.test import RequestFactory
from detached_runs import metrics
from detached_runs.metrics.views import metrics as view
assert not metrics.available()
metrics.run_started()
metrics.event_logged("start")
metrics.text_logged(3)
metrics.subscribers.inc()
metrics.stop_latency.observe(0.1)
request = RequestFactory().get("/metrics")
request.user = User(username="staff", is_staff=True, is_active=True)
response = view(request)
print(response.status_code, response.content.decode().strip())
"""
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="tests.settings")
    done = subprocess.run(
        [sys.executable, "-c", program],
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "501 Metrics need prometheus_client: pip install 'prometheus_client>=0.20'."
    )


@pytest.mark.e2e
def test_two_workers_in_multiprocess_mode_serve_the_sum_of_both(start_workers, tmp_path):
    """Two real daphne workers sharing a ``PROMETHEUS_MULTIPROC_DIR``: a run
    on each, and either worker's URL counts both; the database's gauge is
    the same from both."""
    from .conftest import require_redis
    from .http import Browser

    require_redis()
    a, b = start_workers(PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    for server in (a, b):
        key = uuid.uuid4().hex[:10]
        browser = Browser(server.port)
        assert browser.request("POST", f"/runs/{key}/", {"prompt": "5"}).status == 202
        events = browser.stream(f"/runs/{key}/events/").rest()
        assert events[-1].data == {"status": "done"}
    for server in (a, b):
        reply = Browser(server.port).request("GET", "/metrics", headers=TOKEN)
        assert reply.status == 200
        samples = parse(reply.body)
        assert value(samples, "detached_runs_runs_started_total") == 2
        assert value(samples, "detached_runs_runs_ended_total", status="done") == 2
        assert value(samples, "detached_runs_text_bytes_total") == 2 * len("w0 w1 w2 w3 w4 ")
        assert value(samples, "detached_runs_runs", status="running") == 0


@pytest.mark.e2e
def test_a_client_that_leaves_while_waiting_for_the_queued_run_is_no_subscriber_any_more():
    """A client asking for a session's events past the end of its run, with a
    run queued behind it, waits (up to ``QUEUE_WAIT``) for that run to
    start: here it never does, its worker draining. The client leaves
    meanwhile; the run it had bound to is released, and
    ``detached_runs_subscribers`` is back to what it was."""
    import http.client
    import signal
    import time

    from .conftest import server_env, start_server, stop_server
    from .http import Browser

    env = server_env(
        TEST_AGENT_DELAY="0.02",
        TEST_SHUTDOWN_MODE="drain",
        TEST_SHUTDOWN_TIMEOUT="60",
        LOG="INFO",
    )
    server = start_server(env)

    def subscribers() -> float:
        reply = Browser(server.port).request("GET", "/metrics", headers=TOKEN)
        assert reply.status == 200, reply.body
        return value(parse(reply.body), "detached_runs_subscribers")

    browser = Browser(server.port)
    keeper, key = uuid.uuid4().hex[:10], uuid.uuid4().hex[:10]
    try:
        # A long run keeps the drain going; the session's run ends during it,
        # and the run queued behind it is not started by a draining worker.
        assert browser.request("POST", f"/runs/{keeper}/", {"prompt": "5000"}).status == 202
        assert browser.request("POST", f"/runs/{key}/", {"prompt": "30"}).status == 202
        queued = browser.request("POST", f"/runs/{key}/", {"prompt": "3", "multitask": "enqueue"})
        assert queued.json()["status"] == "queued"
        server.process.send_signal(signal.SIGTERM)
        last = browser.stream(f"/runs/{key}/events/").rest()[-1]
        assert last.data == {"status": "done"}
        assert subscribers() == 0
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        headers = {"Last-Event-ID": str(last.id), "Cookie": browser._headers(None)["Cookie"]}
        connection.request("GET", f"/runs/{key}/events/", headers=headers)
        deadline = time.monotonic() + 10
        while subscribers() != 1:  # bound, waiting for the queued run
            assert time.monotonic() < deadline, "the client never waited"
            time.sleep(0.05)
        connection.sock.close()  # it leaves
        connection.close()
        deadline = time.monotonic() + 20
        while (count := subscribers()) != 0:
            assert time.monotonic() < deadline, f"{count} subscribers after every client left"
            time.sleep(0.1)
    finally:
        stop_server(server)  # a second SIGTERM: it leaves without waiting for the keeper


@pytest.mark.e2e
def test_the_figures_are_served_while_the_database_refuses(database_fault):
    """The database is down: just when its failures are worth reading, the
    scrape still answers ``200`` with every figure this process counts
    (``detached_runs_save_failures_total`` growing), to a scraper with the
    token whether or not it sends a session cookie; only
    ``detached_runs_runs``, read from the database, is left out. Staff
    logged in by a session, which needs the database to be known, get a
    ``503``, not a server error."""
    import time

    from .conftest import server_env, start_server, stop_server
    from .http import Browser

    env = database_fault.env(server_env(TEST_AGENT_DELAY="0.02", LOG="INFO"))
    server = start_server(env)
    browser = Browser(server.port)  # its session cookie names the run's owner
    key = uuid.uuid4().hex[:10]
    try:
        assert browser.request("POST", f"/runs/{key}/", {"prompt": "1000"}).status == 202
        database_fault.refuse()
        deadline = time.monotonic() + 30
        while True:
            for scraper in (Browser(server.port), browser):
                reply = scraper.request("GET", "/metrics", headers=TOKEN)
                assert reply.status == 200, reply.body
            samples = parse(reply.body)
            assert ("detached_runs_runs", frozenset({("status", "running")})) not in samples
            if value(samples, "detached_runs_save_failures_total", save="checkpoint") > 0:
                break
            assert time.monotonic() < deadline, "no failed checkpoint counted"
            time.sleep(0.2)
        staff = browser.request("GET", "/metrics")  # no token: its session decides
        assert staff.status == 503, staff.body
        assert staff.headers.get("Retry-After") == "1"
        assert b"detached_runs_" not in staff.body
    finally:
        database_fault.accept()
        browser.request("POST", f"/runs/{key}/stop/")
        stop_server(server)
    assert "Internal Server Error: /metrics" not in server.output(), server.output()


@pytest.mark.e2e
def test_a_dead_workers_subscribers_are_not_counted_in_multiprocess_mode(tmp_path):
    """Two workers sharing a ``PROMETHEUS_MULTIPROC_DIR``; a client follows a
    run on the first, which is killed (``kill -9``: an OOM, an orchestrator
    out of patience). prometheus_client keeps a dead process's file, so its
    live gauge would count that client for ever: the other worker's scrape
    counts no subscriber once the process is gone, and still counts the
    run it started."""
    import time

    from .conftest import server_env, start_server, stop_server
    from .http import Browser

    env = server_env(TEST_AGENT_DELAY="0.02", LOG="INFO", PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    doomed, survivor = start_server(env), start_server(env)

    def scrape_survivor() -> Samples:
        reply = Browser(survivor.port).request("GET", "/metrics", headers=TOKEN)
        assert reply.status == 200, reply.body
        return parse(reply.body)

    try:
        browser = Browser(doomed.port)
        key = uuid.uuid4().hex[:10]
        assert browser.request("POST", f"/runs/{key}/", {"prompt": "5000"}).status == 202
        stream = browser.stream(f"/runs/{key}/events/")
        stream.take(3)
        assert value(scrape_survivor(), "detached_runs_subscribers") == 1
        doomed.process.kill()
        doomed.process.wait()
        stream.close()
        deadline = time.monotonic() + 20
        while (count := value(samples := scrape_survivor(), "detached_runs_subscribers")) != 0:
            assert time.monotonic() < deadline, f"{count} subscribers of a dead worker"
            time.sleep(0.1)
        assert value(samples, "detached_runs_runs_started_total") == 1
    finally:
        stop_server(doomed)
        stop_server(survivor)


@pytest.mark.e2e
def test_a_run_whose_worker_died_is_not_counted_in_flight_for_ever():
    """A worker is killed (``kill -9``) with a run in flight, and nobody asks
    for that session again: its row stays ``running`` until something reads
    it, but the run is in flight nowhere. ``detached_runs_runs`` stops
    counting it once its heartbeat is stale (`workers.stale_after`), as every
    other part of the app does, instead of counting it for ever."""
    import asyncio
    import time

    from detached_runs.workers import stale_after

    from .conftest import server_env, start_server, stop_server
    from .http import Browser

    server = start_server(server_env(TEST_AGENT_DELAY="0.02", LOG="INFO"))
    key = uuid.uuid4().hex[:10]
    try:
        assert Browser(server.port).request("POST", f"/runs/{key}/", {"prompt": "5000"}).status
        assert value(asyncio.run(scrape()), "detached_runs_runs", status="running") == 1
        server.process.kill()
        server.process.wait()
    finally:
        stop_server(server)
    deadline = time.monotonic() + stale_after().total_seconds() + 30
    while (count := value(asyncio.run(scrape()), "detached_runs_runs", status="running")) != 0:
        assert time.monotonic() < deadline, f"{count} runs in flight, with no worker alive"
        time.sleep(0.5)
    assert Run.objects.get(session_key=key).status == "running"  # nobody read it


async def test_the_known_labels_are_there_before_their_first_count():
    """A dashboard shows 0, not "no data", for a failure that has not happened."""
    samples = await scrape()
    for save in ("checkpoint", "final"):
        assert ("detached_runs_save_failures_total", frozenset({("save", save)})) in samples
    for status in ("done", "stopped", "error", "interrupted"):
        assert ("detached_runs_runs_ended_total", frozenset({("status", status)})) in samples

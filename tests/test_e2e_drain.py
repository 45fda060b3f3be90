"""Step 13, ``SHUTDOWN_MODE = "drain"`` with real server processes: a worker
told to stop takes no new runs (503 with Retry-After) but lets its runs end
by themselves within the grace, then interrupts what is left; a rolling
restart of two workers sharing Redis loses no answer that fits in it."""

from __future__ import annotations

import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from detached_runs.models import Run

from .conftest import ended_row, require_redis, server_env, start_server, stop_server
from .http import SSE, Browser, text

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def words(count: int) -> str:
    return "".join(f"w{i} " for i in range(count))


def draining_server(timeout: int, kind: str = "daphne") -> Any:
    """A server with ``SHUTDOWN_MODE = "drain"`` and ``SHUTDOWN_TIMEOUT`` of ``timeout`` s."""
    env = server_env(
        TEST_AGENT_DELAY="0.02",
        TEST_SHUTDOWN_MODE="drain",
        TEST_SHUTDOWN_TIMEOUT=str(timeout),
        LOG="INFO",
    )
    return start_server(env, kind=kind)


def refused_while_draining(server: Any) -> Any:
    """A start sent to ``server`` once its drain began: the first ``503``
    (a fresh session key per try, so that no try changes another)."""
    browser = Browser(server.port)
    for _ in range(200):
        key = uuid.uuid4().hex[:10]
        reply = browser.request("POST", f"/runs/{key}/", {"prompt": "3"})
        if reply.status == 503:
            assert not Run.objects.filter(session_key=key).exists()
            return reply
        assert reply.status == 202, reply.body
        time.sleep(0.02)
    raise AssertionError("the draining server took every start")


@pytest.mark.parametrize("kind", ["daphne", "uvicorn"])
def test_a_draining_server_finishes_its_runs_and_refuses_new_ones(kind):
    """One server (either backend, whichever the pass runs): a 2 s answer
    and a SIGTERM at its start. The answer arrives whole and is saved
    ``done``; starts meanwhile get 503 with ``Retry-After``; the server exits
    once the run is saved, well before its grace is over."""
    server = draining_server(30, kind)
    key = uuid.uuid4().hex[:10]
    browser = Browser(server.port)
    try:
        assert browser.request("POST", f"/runs/{key}/", {"prompt": "100"}).status == 202
        stream = browser.stream(f"/runs/{key}/events/")
        first = stream.take(3)
        began = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        reply = refused_while_draining(server)
        rest = stream.rest()
        server.process.wait(timeout=30)
        took = time.monotonic() - began
    finally:
        stop_server(server)
    log = server.output()
    assert reply.headers.get("Retry-After") == "1"
    assert reply.json() == {"error": "The server is shutting down; try again in a moment."}
    assert rest[-1].data == {"status": "done"}, log
    assert text(first) + text(rest) == words(100)
    row = Run.objects.get(session_key=key)
    assert (row.status, row.output) == ("done", words(100))
    assert took < 25, log  # it left once the run ended, not at the end of its grace
    assert "Traceback" not in log, log


def test_a_run_longer_than_the_grace_streams_through_the_drain_then_is_interrupted():
    """``SHUTDOWN_TIMEOUT`` 6 s: 3 s of drain (the rest is the reserve for
    interrupting), then the 20 s answer ends ``interrupted`` with everything
    its subscriber got saved; its words kept coming during the drain."""
    server = draining_server(6)
    key = uuid.uuid4().hex[:10]
    browser = Browser(server.port)
    try:
        assert browser.request("POST", f"/runs/{key}/", {"prompt": "1000"}).status == 202
        stream = browser.stream(f"/runs/{key}/events/")
        first = stream.take(3)
        began = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        rest = stream.rest()
        ended = time.monotonic() - began
        server.process.wait(timeout=15)
    finally:
        stop_server(server)
    log = server.output()
    assert rest[-1].data == {"status": "interrupted"}, log
    assert ended >= 3 - 0.5, log  # the drain came first
    got = text(first) + text(rest)
    assert words(1000).startswith(got) and len(got) > len(text(first)) + 40, log
    row = Run.objects.get(session_key=key)
    assert (row.status, row.output, row.last_event_id) == ("interrupted", got, rest[-1].id)


def test_a_rolling_restart_of_two_workers_loses_no_answer(start_workers):
    """Two daphne workers sharing Redis, restarted one after the other (A,
    then B once A is back) while answers stream from both. Each answer fits
    in the grace: every client, on either worker, gets it whole, every row
    is ``done``, and starts sent to the draining worker are refused with 503
    and taken by the other one."""
    require_redis()
    a, b = start_workers(TEST_SHUTDOWN_MODE="drain", TEST_SHUTDOWN_TIMEOUT="30")
    pool = ThreadPoolExecutor(max_workers=8)
    follows: list[tuple[str, Any]] = []

    def follow(port: int, key: str, cookies: dict[str, str]) -> list[SSE]:
        """A client as EventSource is: a stream that ends before the run's
        end (its worker stopped and hung up: the run goes on on the other
        one) is resumed with its last id, on whichever worker is up."""
        events: list[SSE] = []
        for _ in range(100):
            resume = {"Last-Event-ID": events[-1].id or ""} if events else {}
            try:
                stream = Browser(port, cookies=dict(cookies)).stream(f"/runs/{key}/events/", resume)
                events += stream.rest()
            except OSError:
                pass  # a worker that is gone, or not up yet
            if events and events[-1].event == "done":
                break
            port = b.port if port == a.port else a.port
            time.sleep(0.1)
        return events

    def run_on(server: Any, *followers: Any) -> str:
        key = uuid.uuid4().hex[:10]
        browser = Browser(server.port)
        assert browser.request("POST", f"/runs/{key}/", {"prompt": "120"}).status == 202
        for other in (server, *followers):
            follows.append((key, pool.submit(follow, other.port, key, browser.cookies)))
        return key

    def restart(old: Any, other: Any) -> Any:
        """SIGTERM ``old`` while it streams a run; a start it refuses goes to
        ``other``; return ``old`` started again."""
        run_on(old, other)
        time.sleep(0.3)  # streaming
        old.process.send_signal(signal.SIGTERM)
        reply = refused_while_draining(old)
        assert reply.headers.get("Retry-After") == "1"
        run_on(other, other)  # the client's retry, balanced to the other worker
        old.process.wait(timeout=30)
        assert "Traceback" not in old.output(), old.output()
        return start_server(old.env)

    try:
        run_on(b, a)
        a = restart(a, b)
        run_on(a, b)
        b = restart(b, a)
        for key, future in follows:
            events = future.result(timeout=60)
            assert events[-1].data == {"status": "done"}, key
            assert text(events) == words(120), key  # resumed with no gap, no repeat
        for key in {key for key, _ in follows}:
            row = ended_row(key, 10, f"run {key} did not end")
            assert (row.status, row.output) == ("done", words(120))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for server in (a, b):
            stop_server(server)


def test_a_run_whose_final_save_fails_during_the_drain_is_saved_while_the_drain_lasts(
    database_fault,
):
    """``SHUTDOWN_TIMEOUT`` 40 s: a short answer ends during the drain while
    the database refuses, for longer than the 5 s reserve but well within
    the drain. The worker keeps trying its save for as long as its drain
    lasts (a run is over once its end is saved, not once it is sent), so
    the row is ``done`` with the whole answer once the database is back."""
    env = database_fault.env(
        server_env(
            TEST_AGENT_DELAY="0.02",
            TEST_SHUTDOWN_MODE="drain",
            TEST_SHUTDOWN_TIMEOUT="40",
            LOG="INFO",
        )
    )
    server = start_server(env)
    key = uuid.uuid4().hex[:10]
    browser = Browser(server.port)
    try:
        assert browser.request("POST", f"/runs/{key}/", {"prompt": "50"}).status == 202
        stream = browser.stream(f"/runs/{key}/events/")
        first = stream.take(3)
        database_fault.refuse()
        server.process.send_signal(signal.SIGTERM)
        rest = stream.rest()
        assert rest[-1].data == {"status": "done", "saved": False}, server.output()
        # Longer than the reserve and the final save's own retries together.
        time.sleep(15)
        database_fault.accept()
        server.process.wait(timeout=60)
    finally:
        database_fault.accept()
        stop_server(server)
    log = server.output()
    row = Run.objects.get(session_key=key)
    assert (row.status, row.output) == ("done", words(50)), log
    assert text(first) + text(rest) == words(50)
    # The app's own line ("Run ... is lost: its end ..."), not psycopg's
    # "the connection is lost" while the database refuses.
    assert f"of session {key} is lost" not in log, log


@pytest.mark.parametrize("kind", ["daphne", "uvicorn"])
def test_a_second_sigterm_during_the_drain_lets_the_server_go_at_once(kind):
    """A drain of up to 295 s for a 100 s answer, and a second SIGTERM once
    it began: the server goes now, not at the end of the drain. uvicorn,
    once told, still waits for its connections to close (it takes a second
    SIGTERM for a first one): the runs are interrupted at once, so that
    their streams end, with their text saved."""
    env = server_env(
        TEST_AGENT_DELAY="0.02",
        TEST_SHUTDOWN_MODE="drain",
        TEST_SHUTDOWN_TIMEOUT="300",
        LOG="INFO",
    )
    server = start_server(env, kind=kind)
    key = uuid.uuid4().hex[:10]
    browser = Browser(server.port)
    try:
        assert browser.request("POST", f"/runs/{key}/", {"prompt": "5000"}).status == 202
        stream = browser.stream(f"/runs/{key}/events/")
        first = stream.take(3)
        server.process.send_signal(signal.SIGTERM)
        refused_while_draining(server)
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while server.process.poll() is None:
            assert time.monotonic() < deadline, f"still draining:\n{server.output()}"
            time.sleep(0.1)
    finally:
        stop_server(server)
    log = server.output()
    assert "Traceback" not in log, log
    if kind == "daphne":
        # The server was handed the signal once the stream had closed (daphne
        # logs it when it does), not while daphne would cancel it mid-way:
        # Django's request handler, cancelled mid-response, leaves a task
        # whose exception nobody retrieves ("Task exception was never
        # retrieved ... RequestAborted", once on CI).
        closed = log.index(f'"GET /runs/{key}/events/" 200')
        assert closed < log.index("pending application instances"), log
    rest = stream.rest()
    row = Run.objects.get(session_key=key)
    assert rest[-1].data == {"status": "interrupted"}, log
    assert (row.status, row.output) == ("interrupted", text(first) + text(rest))


@pytest.mark.parametrize("mode", ["interrupt", "drain"])
@pytest.mark.parametrize("kind", ["daphne", "uvicorn"])
def test_a_worker_that_stops_hangs_up_on_its_followers_of_runs_driven_elsewhere(
    start_workers, kind, mode
):
    """A 20 s answer runs on A; B (which never started a run) serves a
    follower of it and is told to stop. B's stream ends at its shutdown,
    with no terminal event (the run is not B's to end), and B exits: uvicorn
    waits for its connections to close, and a follower of a run that goes on
    elsewhere used to hold it for ever. The client resumes on A from its
    last id, with no gap and no repeat."""
    require_redis()
    a, b = start_workers(kinds=("daphne", kind), TEST_SHUTDOWN_MODE=mode, TEST_SHUTDOWN_TIMEOUT="8")
    key = uuid.uuid4().hex[:10]
    browser = Browser(a.port)
    try:
        assert browser.request("POST", f"/runs/{key}/", {"prompt": "1000"}).status == 202
        browser.port = b.port
        stream = browser.stream(f"/runs/{key}/events/")
        first = stream.take(5)
        began = time.monotonic()
        b.process.send_signal(signal.SIGTERM)
        rest = stream.rest()
        ended = time.monotonic() - began
        b.process.wait(timeout=20)
        exited = time.monotonic() - began
        seen = first + rest
        assert all(event.event != "done" for event in seen), b.output()
        browser.port = a.port
        resumed = browser.stream(f"/runs/{key}/events/", {"Last-Event-ID": seen[-1].id or ""})
        more = resumed.take(3)
        assert more and more[0].event == "delta", a.output()
        assert words(1000).startswith(text(seen) + text(more))
    finally:
        browser.request("POST", f"/runs/{key}/stop/")
        for server in (a, b):
            stop_server(server)
    # Within B's grace (8 s), and what a server then needs to go.
    assert ended < 8 + 2 and exited < 8 + 5, b.output()
    assert "Traceback" not in b.output(), b.output()

"""Shutdown and crash, with real server processes sharing the test database."""

from __future__ import annotations

import os
import signal
import time
import uuid
from typing import Any

import pytest

from detached_runs.events import parse_id
from detached_runs.models import Run

from .agents import script
from .conftest import server_env, start_server, stop_server
from .http import Browser, text

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

ALL_500 = "".join(f"w{i} " for i in range(500))


def launch(kind: str = "daphne", after: Any = None) -> Any:
    """A server; ``after`` another (stopped) one: this one is it restarted,
    with its environment (on the Redis pass, its keys)."""
    env = server_env(TEST_AGENT_DELAY="0.02", TEST_SHUTDOWN_TIMEOUT="5", LOG="INFO")
    return start_server(env if after is None else after.env, kind=kind)


@pytest.mark.parametrize(
    ("kind", "number"),
    [
        ("daphne", signal.SIGTERM),
        ("daphne", signal.SIGINT),
        ("uvicorn", signal.SIGTERM),
        ("uvicorn", signal.SIGINT),
    ],
)
def test_a_signal_ends_running_runs_saves_them_and_tells_subscribers(kind, number):
    server = launch(kind)
    try:
        browser = Browser(server.port)
        keys = [uuid.uuid4().hex[:10] for _ in range(2)]
        for key in keys:
            assert browser.request("POST", f"/runs/{key}/", {"prompt": "500"}).status == 202
        streams = [browser.stream(f"/runs/{key}/events/") for key in keys]
        seen = [stream.take(6) for stream in streams]
        began = time.monotonic()
        server.process.send_signal(number)
        rests = [stream.rest() for stream in streams]
        server.process.wait(timeout=15)
        took = time.monotonic() - began
    finally:
        if server.process.poll() is None:
            server.process.kill()
    log = server.output()
    assert took < 5 + 3, log  # SHUTDOWN_TIMEOUT is 5 s
    for key, first, rest in zip(keys, seen, rests, strict=True):
        assert rest and rest[-1].data == {"status": "interrupted"}, log
        row = Run.objects.get(session_key=key)
        assert row.status == "interrupted"
        assert row.output == text(first) + text(rest)
        assert 0 < len(row.output) < len(ALL_500)
        assert row.last_event_id == rest[-1].id
        if kind == "daphne":
            # daphne got the signal once the stream had closed, not while it
            # would cancel it (as after a second signal: test_e2e_drain.py).
            closed = log.index(f'"GET /runs/{key}/events/" 200')
            assert closed < log.index("pending application instances"), log
    assert "Traceback" not in log, log


def test_after_kill_9_a_restarted_server_shows_the_run_interrupted_with_its_checkpoint():
    first = launch()
    key = uuid.uuid4().hex[:10]
    browser = Browser(first.port)
    try:
        browser.request("POST", f"/runs/{key}/", {"prompt": "500"})
        stream = browser.stream(f"/runs/{key}/events/")
        seen = stream.take(40)  # ~0.8 s of words; checkpoints every 0.2 s
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait(timeout=10)
        stream.close()
    finally:
        stop_server(first)
    row = Run.objects.get(session_key=key)
    assert row.status == "running"  # nobody could save it: that is what kill -9 means

    second = launch(after=first)
    try:
        browser.port = second.port
        status = browser.request("GET", f"/runs/{key}/").json()["run"]
        assert status["status"] == "interrupted"
        saved, shown = status["output"], text(seen)
        # At most CHECKPOINT_EVERY (0.2 s, ~10 words at 0.02 s) of text is lost.
        assert saved
        assert shown.startswith(saved) or saved.startswith(shown)
        assert len(shown.split()) - len(saved.split()) <= 15
        events = browser.stream(f"/runs/{key}/events/").rest()
        assert [e.event for e in events] == ["start", "delta", "done"]
        assert text(events) == saved and events[-1].data == {"status": "interrupted"}
        # The browser that saw more than the checkpoint resumes without a repeat.
        last = [e for e in seen if e.event == "delta"][-1]
        resumed = browser.stream(f"/runs/{key}/events/", {"Last-Event-ID": last.id or ""})
        rest = resumed.rest()
        # (Once seen empty on CI, unexplained: say what the server answered.)
        assert rest, (resumed.status, last.id, events[-1].id, second.output())
        assert rest[-1].event == "done" and not any(e.event == "start" for e in rest)
        assert text(rest) == saved[len(shown) :]
        done = browser.stream(f"/runs/{key}/events/", {"Last-Event-ID": events[-1].id or ""})
        assert done.status == 204
        assert parse_id(events[-1].id or "")[0] == uuid.UUID(status["id"]).hex
    finally:
        stop_server(second)


@pytest.mark.parametrize("kind", ["daphne", "uvicorn"])
def test_a_start_refused_during_shutdown_leaves_no_row(kind):
    """While a shutdown waits for a run's clean-up, new starts get 503, and a
    refused start changes nothing: it used to leave a running row, which
    after the restart was the session's latest run (interrupted)."""
    server = launch(kind)
    browser = Browser(server.port)
    lingering = uuid.uuid4().hex[:10]
    try:
        assert browser.request("POST", f"/runs/{lingering}/", {"prompt": "linger"}).status == 202
        browser.stream(f"/runs/{lingering}/events/").take(2)  # start, and its word
        server.process.send_signal(signal.SIGTERM)
        for _ in range(100):  # the clean-up takes 2 s
            refused = uuid.uuid4().hex[:10]  # a key of its own per try
            reply = browser.request("POST", f"/runs/{refused}/", {"prompt": "3"})
            if reply.status == 503:
                break
            time.sleep(0.02)
        assert reply.status == 503, reply.body
        assert reply.json() == {"error": "The server is shutting down; try again in a moment."}
        server.process.wait(timeout=15)
    finally:
        stop_server(server)
    assert not Run.objects.filter(session_key=refused).exists()
    assert Run.objects.get(session_key=lingering).status == "interrupted"


@pytest.mark.parametrize("kind", ["daphne", "uvicorn"])
def test_a_shutdown_ends_the_run_of_an_agent_that_will_not_let_go(kind):
    """An agent that swallows its cancellation ("stubborn"), followed by a
    client: on SIGTERM its run ends ``interrupted`` STOP_GRACE (5 s) after the
    stop, the client gets the terminal event and the row is saved, though
    the agent goes on ignoring everything (#14 item 8). Under uvicorn the
    connected subscriber used to keep the shutdown waiting for the agent."""
    server = launch(kind)
    try:
        browser = Browser(server.port)
        key = uuid.uuid4().hex[:10]
        assert browser.request("POST", f"/runs/{key}/", {"prompt": "stubborn"}).status == 202
        stream = browser.stream(f"/runs/{key}/events/")
        seen = stream.take(2)
        began = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        seen += stream.rest()
        ended = time.monotonic() - began
    finally:
        stop_server(server)
    assert seen[-1].data == {"status": "interrupted"}
    assert ended < 5 + 3, server.output()  # STOP_GRACE, not the agent's 20 s
    row = Run.objects.get(session_key=key)
    assert (row.status, row.output) == ("interrupted", "stubborn ")
    assert "did not stop within" in server.output()


@pytest.mark.parametrize("ending", ["SIGTERM", "SIGKILL"])
def test_a_waiting_run_whose_server_ends_is_interrupted_and_its_question_refused(ending):
    """What a restart does to a run waiting for the user's answer: a waiting
    agent is a coroutine of one process, so the run ends ``interrupted`` with
    its text, by the shutdown (SIGTERM) or, after kill -9, by the restarted
    server's read of the session; its question is then no longer pending."""
    first = launch()
    key = uuid.uuid4().hex[:10]
    browser = Browser(first.port)
    prompt = script(["said so far ", {"ask": {"question": "Go on?"}}, "never"])
    try:
        assert browser.request("POST", f"/runs/{key}/", {"prompt": prompt}).status == 202
        stream = browser.stream(f"/runs/{key}/events/")
        request = next(e for e in stream.events() if e.event == "input_required").data["request"]
        time.sleep(0.5)  # a checkpoint (every 0.2 s) with the text and the waiting status
        os.kill(first.process.pid, getattr(signal, ending))
        rest = stream.rest()
        first.process.wait(timeout=15)
    finally:
        stop_server(first)
    if ending == "SIGTERM":
        assert rest[-1].data == {"status": "interrupted"}
        assert Run.objects.get(session_key=key).status == "interrupted"
    else:
        assert Run.objects.get(session_key=key).status == "waiting"  # nobody could save it
    second = launch(after=first)
    try:
        browser.port = second.port
        run = browser.request("GET", f"/runs/{key}/").json()["run"]
        assert (run["status"], run["output"]) == ("interrupted", "said so far ")
        assert "input_request" not in run
        reply = browser.request("POST", f"/runs/{key}/input/", {"request": request, "value": 1})
        assert reply.status == 409
    finally:
        stop_server(second)

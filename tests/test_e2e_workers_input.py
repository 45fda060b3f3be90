"""Runs that wait for the user across two real daphne workers sharing Redis
and one database: the answer reaches the run whichever worker it is sent to;
two answers to one request sent to both workers at once: exactly one is
accepted; a waiting run whose worker dies is interrupted, as any other."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from typing import Any

import pytest

from .agents import script
from .conftest import LEASE_BOUND, SHORT_LEASE, ended_row, require_redis
from .http import Browser, Reply

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

redis = pytest.importorskip("redis")

require_redis(module=True)

QUESTION = {"question": "Delete the old files?", "choices": ["yes", "no"]}


@pytest.fixture
def workers(start_workers: Any) -> Any:
    return start_workers(**SHORT_LEASE)


def waiting_request(browser: Browser, key: str) -> str:
    deadline = time.monotonic() + 10
    while True:
        run = browser.request("GET", f"/runs/{key}/").json().get("run", {})
        if run.get("status") == "waiting":
            return str(run["input_request"]["request"])
        assert time.monotonic() < deadline, f"never waiting: {run}"
        time.sleep(0.05)


def answer(browser: Browser, key: str, request: str, value: Any) -> Reply:
    return browser.request("POST", f"/runs/{key}/input/", {"request": request, "value": value})


def test_an_answer_sent_to_the_other_worker_reaches_the_run(workers):
    a, b = workers
    key = uuid.uuid4().hex[:10]
    on_a = Browser(a.port)
    prompt = script(["asking ", {"ask": QUESTION}, "done"])
    assert on_a.request("POST", f"/runs/{key}/", {"prompt": prompt}).status == 202
    on_b = Browser(b.port, cookies=dict(on_a.cookies))  # the same browser, balanced to B
    request = waiting_request(on_b, key)  # B sees the question too
    follower = on_b.stream(f"/runs/{key}/events/")  # a tab on B
    reply = answer(on_b, key, request, "yes")
    assert (reply.status, reply.json()) == (200, {"accepted": True})
    row = ended_row(key, 10, "the run on A never got the answer sent to B")
    assert (row.status, row.output) == ("done", 'asking answer:"yes" done')
    events = [e.event for e in follower.rest() if e.event != "delta"]
    assert events[-3:] == ["input_required", "input_received", "done"]


def race(
    go: threading.Barrier,
    replies: dict[str, Reply],
    name: str,
    browser: Browser,
    key: str,
    request: str,
) -> None:
    """One of two answers sent at once: ``name`` is its value."""
    go.wait()
    replies[name] = answer(browser, key, request, name)


def test_two_answers_to_one_request_at_two_workers_at_once_one_is_accepted(workers):
    a, b = workers
    for round_ in range(3):  # three races: either worker may win each
        key = uuid.uuid4().hex[:10]
        on_a = Browser(a.port)
        prompt = script([{"ask": QUESTION}])
        assert on_a.request("POST", f"/runs/{key}/", {"prompt": prompt}).status == 202
        on_b = Browser(b.port, cookies=dict(on_a.cookies))  # its session cookie too
        request = waiting_request(on_a, key)
        replies: dict[str, Reply] = {}
        go = threading.Barrier(2)
        threads = [
            threading.Thread(target=race, args=(go, replies, name, browser, key, request))
            for name, browser in (("from-a", on_a), ("from-b", on_b))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
        statuses = sorted(reply.status for reply in replies.values())
        assert statuses == [200, 409], (round_, {k: r.body for k, r in replies.items()})
        winner = next(name for name, reply in replies.items() if reply.status == 200)
        row = ended_row(key, 10, "the run did not end after its answer")
        assert row.output == f'answer:"{winner}" '  # the accepted answer, and only it


def test_a_waiting_run_whose_worker_dies_is_interrupted_and_its_question_answered_no_more(
    workers,
):
    a, b = workers
    key = uuid.uuid4().hex[:10]
    on_a = Browser(a.port)
    prompt = script(["so far ", {"ask": QUESTION}, "never"])
    assert on_a.request("POST", f"/runs/{key}/", {"prompt": prompt}).status == 202
    on_b = Browser(b.port, cookies=dict(on_a.cookies))
    request = waiting_request(on_b, key)
    os.kill(a.process.pid, signal.SIGKILL)
    a.process.wait(timeout=10)
    deadline = time.monotonic() + LEASE_BOUND + 5
    while (run := on_b.request("GET", f"/runs/{key}/").json()["run"])["status"] == "waiting":
        assert time.monotonic() < deadline, "the dead worker's waiting run was never reaped"
        time.sleep(0.2)
    assert (run["status"], run["output"]) == ("interrupted", "so far ")
    assert "input_request" not in run
    assert answer(on_b, key, request, "yes").status == 409
    row = ended_row(key, 10, "the row was never saved")
    assert (row.status, row.output) == ("interrupted", "so far ")

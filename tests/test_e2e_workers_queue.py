"""The queue of a session (``multitask="enqueue"``) shared by two real daphne
workers over Redis and one database: a start on B queues behind a run on A;
a queued run is started by whichever worker ends the run before it, so a
worker that dies with runs queued loses none of them (another starts them).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from typing import Any

import pytest

from detached_runs.models import Run

from .agents import numbered
from .conftest import LEASE_BOUND, SHORT_LEASE, require_redis
from .http import Browser, text

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

redis = pytest.importorskip("redis")


require_redis(module=True)


@pytest.fixture
def workers(start_workers: Any) -> Any:
    return start_workers(**SHORT_LEASE)


def rows(key: str) -> list[Run]:
    return list(Run.objects.filter(session_key=key).order_by("started_at", "id"))


def wait_until(check: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _kill(server: Any) -> None:
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=10)


def test_a_start_on_b_queues_behind_a_run_on_a_and_runs_after_it(workers):
    a, b = workers
    key = uuid.uuid4().hex[:10]
    on_a = Browser(a.port)
    # 100 words, 2 s: still in flight when the others are sent, on a loaded machine too.
    first = on_a.request("POST", f"/runs/{key}/", {"prompt": "100", "multitask": "enqueue"})
    assert first.json()["status"] == "running"
    on_b = Browser(b.port, cookies=dict(on_a.cookies))  # the same browser, balanced to B
    second = on_b.request("POST", f"/runs/{key}/", {"prompt": "7", "multitask": "enqueue"})
    third = on_a.request("POST", f"/runs/{key}/", {"prompt": "5", "multitask": "enqueue"})
    assert (second.json()["status"], third.json()["status"]) == ("queued", "queued")
    # A follower on B sees the three runs one after the other.
    stream = on_b.stream(f"/runs/{key}/events/")
    followed = [stream.rest()]
    for _ in range(2):
        last = followed[-1][-1].id or ""
        # A reconnect past a run's end waits a while for the next one; on a
        # loaded machine it may answer 204 first, and the client comes back.
        deadline = time.monotonic() + 30
        while not (events := on_b.stream(f"/runs/{key}/events/", {"Last-Event-ID": last}).rest()):
            assert time.monotonic() < deadline, "the next queued run never started"
        followed.append(events)
    assert [run[0].data["run"] for run in followed] == [
        first.json()["id"],
        second.json()["id"],
        third.json()["id"],
    ]
    assert [text(run) for run in followed] == ["".join(numbered(n)) for n in (100, 7, 5)]
    wait_until(lambda: [r.status for r in rows(key)] == ["done"] * 3, "not all saved", 10)


def test_a_queued_run_whose_sender_worker_died_is_started_by_the_other(workers):
    """B queued the run and dies; A ends the run before it and starts it."""
    a, b = workers
    key = uuid.uuid4().hex[:10]
    on_a = Browser(a.port)
    # 100 words, 2 s: still in flight when B queues behind it, on a loaded machine too.
    on_a.request("POST", f"/runs/{key}/", {"prompt": "100"})
    on_b = Browser(b.port, cookies=dict(on_a.cookies))
    queued = on_b.request("POST", f"/runs/{key}/", {"prompt": "6", "multitask": "enqueue"})
    assert queued.json()["status"] == "queued"
    _kill(b)
    wait_until(
        lambda: Run.objects.get(pk=queued.json()["id"]).status == "done", "never started", 15
    )
    assert Run.objects.get(pk=queued.json()["id"]).output == "".join(numbered(6))
    assert [r.status for r in rows(key)] == ["done", "done"]


def test_when_the_worker_running_the_run_before_dies_the_queue_goes_on_elsewhere(workers):
    """A runs the session's run and dies mid-answer: the run ends
    ``interrupted`` (reaped by B within the lease bound) and B starts the
    queued run after it."""
    a, b = workers
    key = uuid.uuid4().hex[:10]
    on_a = Browser(a.port)
    on_a.request("POST", f"/runs/{key}/", {"prompt": "500"})
    queued = on_a.request("POST", f"/runs/{key}/", {"prompt": "6", "multitask": "enqueue"})
    on_a.stream(f"/runs/{key}/events/").take(10)
    # B has served a request (its backend is up), about another session.
    assert Browser(b.port).request("GET", f"/runs/{key}x/").status == 404
    _kill(a)
    # Nobody asks B anything about the session: its sweep of dead workers'
    # runs ends A's run and starts the next one.
    wait_until(
        lambda: Run.objects.get(pk=queued.json()["id"]).status == "done",
        "the queued run never ran",
        LEASE_BOUND + 10,
    )
    before, after = rows(key)
    assert before.status == "interrupted" and before.output
    assert after.output == "".join(numbered(6))

"""Two real daphne workers on a Redis of the test's own, which the test
restarts empty while a run is in flight (#14 item 6): one run per session must
hold all the same.

What is observable of "one run in flight": the replaced run's row is saved
(ended, ``finished_at``) before the next run's agent yields its first word,
which the test sees arrive on its stream (one host, one clock)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from detached_runs.models import Run

from .conftest import SHORT_LEASE, ended_row
from .http import Browser, text
from .redis_server import RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

pytest.importorskip("redis")


@pytest.fixture
def workers(own_redis: RedisServer, start_workers: Any) -> Any:
    return start_workers(TEST_REDIS_URL=own_redis.url, TEST_EVICT_AFTER="180")


def _start_when_redis_answers(client: Browser, key: str, prompt: str) -> None:
    """POST a start, again while the workers reconnect to Redis (503)."""
    deadline = time.monotonic() + 20
    while (reply := client.request("POST", f"/runs/{key}/", {"prompt": prompt})).status == 503:
        assert time.monotonic() < deadline, "Redis never came back"
        time.sleep(0.05)
    assert reply.status == 202, reply.body


@pytest.mark.parametrize(
    "prompt",
    [
        "500",  # an agent that streams: its writer finds Redis empty at its next append
        "slow",  # one word, then 10 s of silence: only its lease renewal can find out
    ],
)
def test_a_start_after_redis_restarted_empty_still_replaces_the_run_in_flight(
    workers, own_redis, prompt
):
    a, b = workers
    key = uuid.uuid4().hex[:10]
    on_a = Browser(a.port)
    assert on_a.request("POST", f"/runs/{key}/", {"prompt": prompt}).status == 202
    old = on_a.stream(f"/runs/{key}/events/")
    seen = old.take(2)  # start, and a first word
    own_redis.restart_empty()
    on_b = Browser(b.port, cookies=dict(on_a.cookies))
    _start_when_redis_answers(on_b, key, "5")
    new = on_b.stream(f"/runs/{key}/events/")
    first_word_at = None
    for event in new.events():
        if event.event == "delta" and first_word_at is None:
            first_word_at = datetime.now(UTC)
        if event.event == "done":
            break
    seen += old.rest()
    assert seen[-1].data == {"status": "stopped"}
    first, second = Run.objects.filter(session_key=key).order_by("started_at")
    assert (first.status, first.output) == ("stopped", text(seen))
    assert first.finished_at is not None and first_word_at is not None
    assert first.finished_at <= first_word_at, "two runs of the session were in flight"
    assert second.status == "done"


def test_a_run_saved_by_its_worker_whose_log_never_reached_redis_is_served_as_saved(
    own_redis, start_workers
):
    """SIGTERM while Redis pauses the worker's writes: the worker saves the run
    (``interrupted``, all its text) but its log never reaches Redis, and it
    exits. When the lease lapses, another worker reaps the run: with the
    row's end and the text Redis lacks, not a second, different terminal
    event from the shorter log in Redis, for a client that follows the run
    on that worker all along as for one that comes later."""
    a, b = start_workers(
        TEST_REDIS_URL=own_redis.url,
        TEST_EVICT_AFTER="180",
        TEST_SHUTDOWN_TIMEOUT="2",
        **SHORT_LEASE,
    )
    key = uuid.uuid4().hex[:10]
    on_a = Browser(a.port)
    assert on_a.request("POST", f"/runs/{key}/", {"prompt": "2000"}).status == 202
    on_b = Browser(b.port, cookies=dict(on_a.cookies))
    assert on_b.request("GET", f"/runs/{key}/").status == 200  # B sweeps from now on
    stream = on_a.stream(f"/runs/{key}/events/")
    seen = stream.take(20)
    follower = on_b.stream(f"/runs/{key}/events/")
    followed = follower.take(3)
    own_redis.command("CLIENT", "PAUSE", "6000", "WRITE")
    seen += stream.take(30)  # more than Redis will ever get
    a.process.terminate()
    seen += stream.rest()
    a.process.wait(15)
    assert seen[-1].data == {"status": "interrupted"}
    row = ended_row(key, 5, "the worker did not save its run")
    assert (row.status, row.output, row.last_event_id) == (
        "interrupted",
        text(seen),
        seen[-1].id,
    )
    followed += follower.rest()  # the lease lapses; B sweeps
    assert text(followed) == text(seen) and followed[-1].id == seen[-1].id
    assert followed[-1].data == {"status": "interrupted"}
    replay = on_b.stream(f"/runs/{key}/events/").rest()
    assert text(replay) == text(seen) and replay[-1].id == seen[-1].id
    assert on_b.stream(f"/runs/{key}/events/", {"Last-Event-ID": seen[-1].id or ""}).status == 204

"""Two real daphne processes sharing Redis and the database: any worker serves
any subscriber, stops reach the worker running the run, a dead worker's run
ends interrupted with what reached Redis."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from typing import Any

import pytest
from websockets.sync.client import connect
from websockets.typing import Origin

from detached_runs.events import parse_id
from detached_runs.models import Run

from .conftest import LEASE_BOUND, SHORT_LEASE, ended_row, positions_follow, require_redis
from .http import SSE, Browser, text

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

redis = pytest.importorskip("redis")


require_redis(module=True)

ALL_500 = "".join(f"w{i} " for i in range(500))
ALL_400 = "".join(f"w{i} " for i in range(400))


@pytest.fixture
def workers(start_workers: Any) -> Any:
    return start_workers(**SHORT_LEASE)


def test_start_on_one_worker_follow_and_resume_on_the_other_with_its_ids(workers):
    a, b = workers
    key = uuid.uuid4().hex[:10]
    on_a = Browser(a.port)
    assert on_a.request("POST", f"/runs/{key}/", {"prompt": "60"}).status == 202
    first = on_a.stream(f"/runs/{key}/events/").take(12)
    on_b = Browser(b.port, cookies=dict(on_a.cookies))  # the same browser, balanced to B
    rest = on_b.stream(f"/runs/{key}/events/", {"Last-Event-ID": first[-1].id or ""}).rest()
    assert text(first) + text(rest) == "".join(f"w{i} " for i in range(60))
    assert rest[-1].data == {"status": "done"} and rest[0].event != "start"
    replay = on_b.stream(f"/runs/{key}/events/").rest()
    assert [e.event for e in replay] == ["start", "delta", "done"]
    assert on_b.stream(f"/runs/{key}/events/", {"Last-Event-ID": rest[-1].id or ""}).status == 204
    assert on_b.request("GET", f"/runs/{key}/").json()["run"]["status"] == "done"


def test_a_stop_sent_to_the_other_worker_stops_the_run(workers):
    a, b = workers
    key = uuid.uuid4().hex[:10]
    on_a = Browser(a.port)
    on_a.request("POST", f"/runs/{key}/", {"prompt": "500"})
    stream = on_a.stream(f"/runs/{key}/events/")
    seen = stream.take(8)
    on_b = Browser(b.port, cookies=dict(on_a.cookies))
    assert on_b.request("POST", f"/runs/{key}/stop/").json() == {"stopped": True}
    rest = stream.rest()
    assert rest[-1].data == {"status": "stopped"}
    row = Run.objects.get(session_key=key)
    assert row.status == "stopped" and row.output == text(seen) + text(rest)
    stranger = Browser(b.port)
    assert stranger.request("POST", f"/runs/{key}/stop/").status == 404


def test_when_a_worker_dies_the_other_shows_its_run_interrupted_with_the_text(workers):
    a, b = workers
    key = uuid.uuid4().hex[:10]
    on_a = Browser(a.port)
    on_a.request("POST", f"/runs/{key}/", {"prompt": "500"})
    seen = on_a.stream(f"/runs/{key}/events/").take(30)
    os.kill(a.process.pid, signal.SIGKILL)
    a.process.wait(timeout=10)
    on_b = Browser(b.port, cookies=dict(on_a.cookies))
    status = on_b.request("GET", f"/runs/{key}/").json()["run"]
    assert status["status"] == "interrupted"
    saved, shown = status["output"], text(seen)
    # What was shown had reached Redis, but for the last few ms before the kill.
    assert saved.startswith(shown) or (shown.startswith(saved) and len(shown) - len(saved) < 30)
    assert len(saved) < len(ALL_500)
    events = on_b.stream(f"/runs/{key}/events/").rest()
    assert text(events) == saved and events[-1].data == {"status": "interrupted"}
    deadline = time.monotonic() + 5
    while Run.objects.get(session_key=key).status != "interrupted":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert Run.objects.get(session_key=key).output == saved


def _kill(server: Any) -> None:
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=10)


def test_a_subscriber_on_the_other_worker_gets_the_end_of_a_dead_workers_run_unasked(workers):
    """Nobody asks B about the session after A dies: B's subscriber, following
    the run through Redis, still gets its terminal event within the lease
    bound, and the row is saved ``interrupted`` with the text (#14 item 5)."""
    a, b = workers
    key = uuid.uuid4().hex[:10]
    on_a = Browser(a.port)
    on_a.request("POST", f"/runs/{key}/", {"prompt": "500"})
    on_b = Browser(b.port, cookies=dict(on_a.cookies))
    stream = on_b.stream(f"/runs/{key}/events/")
    seen = stream.take(20)
    _kill(a)
    began = time.monotonic()
    seen += stream.rest()
    assert seen[-1].data == {"status": "interrupted"}
    assert time.monotonic() - began < LEASE_BOUND
    row = _ended(key)
    assert (row.status, row.output) == ("interrupted", text(seen))


def _ended(key: str) -> Run:
    """The session's row once a live worker ended it (a sweep, unasked)."""
    row: Run = ended_row(key, LEASE_BOUND, "the dead worker's row was never ended")
    return row


def test_runs_of_a_dead_worker_stop_counting_against_their_owner(start_workers):
    """``MAX_ACTIVE_RUNS_PER_OWNER=2`` and two runs on A, which dies: the owner
    may start runs on B again within the lease bound, though nobody looked at
    the two sessions (their owner's count used to say 2 forever)."""
    a, b = start_workers(TEST_MAX_ACTIVE_RUNS_PER_OWNER="2", **SHORT_LEASE)
    on_a = Browser(a.port)
    first, second, third = (uuid.uuid4().hex[:10] for _ in range(3))
    for key in (first, second):
        assert on_a.request("POST", f"/runs/{key}/", {"prompt": "2000"}).status == 202
    on_b = Browser(b.port, cookies=dict(on_a.cookies))
    assert on_b.request("POST", f"/runs/{third}/", {"prompt": "3"}).status == 429
    _kill(a)
    began = time.monotonic()
    while (reply := on_b.request("POST", f"/runs/{third}/", {"prompt": "3"})).status == 429:
        assert time.monotonic() - began < LEASE_BOUND, "the dead worker's runs still count"
        time.sleep(0.5)
    assert reply.status == 202
    for key in (first, second):
        assert _ended(key).status == "interrupted"


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",  # redis-py's own socket timeout would be 5 s
        "redis://127.0.0.1:6379/0?socket_timeout=1",
    ],
)
def test_following_a_quiet_run_on_the_other_worker_is_not_taken_for_an_outage(start_workers, url):
    """A run that says nothing for a while ("slow": one word, then 10 s),
    followed on B: B's blocking read of a healthy Redis must not time out
    (#14 item 3); it used to log "Redis unreachable" and reconnect every few
    seconds."""
    a, b = start_workers(TEST_REDIS_URL=url)
    key = uuid.uuid4().hex[:10]
    on_a = Browser(a.port)
    assert on_a.request("POST", f"/runs/{key}/", {"prompt": "slow"}).status == 202
    on_b = Browser(b.port, cookies=dict(on_a.cookies))
    events = on_b.stream(f"/runs/{key}/events/").rest()
    assert text(events) == "finally " and events[-1].data == {"status": "done"}
    assert "unreachable" not in b.output()


@pytest.mark.parametrize("resume", ["Last-Event-ID", "WebSocket"])
def test_an_id_that_redis_has_not_seen_yet_resumes_on_the_other_worker(
    own_redis, start_workers, resume
):
    """#14 item 1: a client reads from worker A while Redis holds A's writes
    back (a failover pauses them; here CLIENT PAUSE WRITE, on a Redis of the
    test's own) and comes back on worker B with A's last id, which B has not
    seen. B answered 400 "Unknown event id." (a socket closed 4400), which
    ends an EventSource for good; it waits for the log to catch up instead."""
    a, b = start_workers(TEST_REDIS_URL=own_redis.url)
    key = uuid.uuid4().hex[:10]
    on_a = Browser(a.port)
    assert on_a.request("POST", f"/runs/{key}/", {"prompt": "300"}).status == 202  # 6 s
    stream = on_a.stream(f"/runs/{key}/events/")
    first = stream.take(20)
    admin = redis.Redis.from_url(own_redis.url)
    admin.execute_command("CLIENT", "PAUSE", 4000, "WRITE")
    admin.close()
    first += stream.take(25)  # half a second more of A's words, which Redis holds back
    stream.close()
    on_b = Browser(b.port, cookies=dict(on_a.cookies))
    if resume == "Last-Event-ID":
        reply = on_b.stream(f"/runs/{key}/events/", {"Last-Event-ID": first[-1].id or ""})
        assert reply.status == 200
        rest = reply.rest()
    else:
        cookies = "; ".join(f"{k}={v}" for k, v in on_b.cookies.items())
        with connect(
            f"ws://127.0.0.1:{b.port}/ws/runs/{key}/?after={first[-1].id}",
            additional_headers={"Cookie": cookies},
            origin=Origin(f"http://127.0.0.1:{b.port}"),
        ) as socket:
            rest = []
            while not rest or rest[-1].event != "done":
                frame = json.loads(socket.recv(timeout=20))
                rest.append(SSE(frame["id"], frame["event"], frame["data"]))
    assert text(first) + text(rest) == "".join(f"w{i} " for i in range(300))
    assert rest[-1].data == {"status": "done"}


def test_a_bounded_stream_replays_the_whole_run_on_the_other_worker_with_the_same_ids(
    start_workers,
):
    """#14 item 2: with ``REDIS_STREAM_MAXLEN=5`` a subscriber on worker B got
    no ``start``, text from the middle on, and ids that were not A's."""
    a, b = start_workers(TEST_REDIS_STREAM_MAXLEN="5", TEST_AGENT_DELAY="0.005")
    key = uuid.uuid4().hex[:10]
    on_a = Browser(a.port)
    assert on_a.request("POST", f"/runs/{key}/", {"prompt": "400"}).status == 202
    stream = on_a.stream(f"/runs/{key}/events/")
    first = stream.take(250)  # mid-run, long after the stream's start was compacted
    on_b = Browser(b.port, cookies=dict(on_a.cookies))
    midrun = on_b.stream(f"/runs/{key}/events/").rest()
    on_a_all = first + stream.rest()
    after = on_b.stream(f"/runs/{key}/events/").rest()
    run_id = parse_id(on_a_all[0].id or "")[0]
    for events in (midrun, after):
        assert events[0].event == "start" and events[0].id == on_a_all[0].id
        assert text(events) == ALL_400 and positions_follow(events, run_id)
        assert events[-1].data == {"status": "done"} and events[-1].id == on_a_all[-1].id
    for event in (first[1], first[100], first[-1]):
        resumed = on_b.stream(f"/runs/{key}/events/", {"Last-Event-ID": event.id or ""}).rest()
        assert text(first[: first.index(event) + 1]) + text(resumed) == ALL_400
        assert positions_follow(resumed, run_id, parse_id(event.id or "")[1])

"""End to end: the conversations API (the sessions list, a session's runs, a
delete) over real sockets, under a real daphne and a real uvicorn, on the
memory backend and on Redis; and a delete that reaches a run another worker
drives."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from detached_runs.models import Run

from .conftest import Server, require_redis, server_env, start_server, stop_server
from .http import Browser, text

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def redis_client() -> Any:
    """A client of the machine's Redis, or a skip (a failure with
    ``DETACHED_RUNS_REQUIRE_REDIS=1``) if there is none."""
    redis = pytest.importorskip("redis")
    require_redis()
    return redis.Redis(host="127.0.0.1", port=6379, socket_timeout=2)


@pytest.fixture(
    scope="module",
    params=[("daphne", "memory"), ("daphne", "redis"), ("uvicorn", "memory"), ("uvicorn", "redis")],
    ids=lambda p: "-".join(p),
)
def site(request: Any, django_db_setup: Any, django_db_blocker: Any) -> Iterator[Server]:
    """The test project under each server, on each backend (whatever backend
    the suite runs on): ``site.env["TEST_REDIS_PREFIX"]`` is its Redis prefix."""
    kind, backend = request.param
    client = redis_client() if backend == "redis" else None
    prefix = f"dr-e2e-conv-{uuid.uuid4().hex[:8]}"
    with django_db_blocker.unblock():
        env = server_env(
            TEST_BACKEND=backend,
            TEST_REDIS_PREFIX=prefix,
            TEST_AGENT_DELAY="0.02",
            TEST_EVICT_AFTER="1",
            LOG="DEBUG",
        )
    running = start_server(env, kind=kind)
    yield running
    stop_server(running)
    if client is not None:
        keys = list(client.scan_iter(match=f"*{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


def redis_keys(server: Server, key: str, run_ids: list[str]) -> list[str]:
    """What Redis holds of the session on this server: its keys, and its runs
    in the shared sets (in flight, unsaved, an owner's or an address's)."""
    if server.env["TEST_BACKEND"] != "redis":
        return []
    client = redis_client()
    prefix = server.env["TEST_REDIS_PREFIX"]
    found = [k.decode() for k in client.scan_iter(match=f"{{{prefix}:{key}}}*")]
    for shared in client.scan_iter(match=f"{prefix}:*"):
        if client.type(shared) == b"zset":
            members = [m.decode() for m in client.zrange(shared, 0, -1)]
            found += [
                f"{shared.decode()} {m}"
                for m in members
                if key in m or any(r in m for r in run_ids)
            ]
    client.close()
    return found


def ended(browser: Browser, key: str) -> dict[str, Any]:
    for _ in range(500):
        run: dict[str, Any] = browser.request("GET", f"/runs/{key}/").json()["run"]
        if run["status"] != "running":
            return run
        time.sleep(0.02)
    raise AssertionError("still running")


def test_a_delete_during_a_run_ends_its_stream_and_leaves_no_row_log_or_task(site, key):
    browser = Browser(site.port)
    browser.request("POST", f"/runs/{key}/", {"prompt": "3"})
    first = ended(browser, key)
    started = browser.request("POST", f"/runs/{key}/", {"prompt": "500"}).json()
    stream = browser.stream(f"/runs/{key}/events/")
    seen = stream.take(4)
    run_ids = [uuid.UUID(first["id"]).hex, uuid.UUID(started["id"]).hex]
    assert redis_keys(site, key, run_ids) or site.env["TEST_BACKEND"] == "memory"
    reply = browser.request("DELETE", f"/runs/{key}/")
    assert reply.status == 204 and reply.body == b""
    rest = stream.rest()  # the stream ends: the terminal event, then the close
    assert rest[-1].event == "done" and rest[-1].data == {"status": "stopped"}
    assert 0 < len(text(seen) + text(rest)) < len("".join(f"w{i} " for i in range(500)))
    assert browser.request("GET", f"/runs/{key}/").status == 404
    assert browser.stream(f"/runs/{key}/events/").status == 404
    assert browser.request("GET", f"/runs/{key}/runs/").status == 404
    assert key not in {s["session"] for s in browser.request("GET", "/runs/").json()["sessions"]}
    assert not Run.objects.filter(session_key=key).exists()
    assert redis_keys(site, key, run_ids) == []
    # Later, nothing came back: no checkpoint, final save, writer or lease
    # of the run (checkpoints every 0.2 s, evictions after 1 s here).
    time.sleep(1.5)
    assert not Run.objects.filter(session_key=key).exists()
    assert redis_keys(site, key, run_ids) == []
    log = site.output()
    assert f"Run {run_ids[1]} of session {key} ended: stopped" in log
    assert f"Session {key} deleted: 2 runs" in log
    assert "Traceback" not in log and "writing it again" not in log


def test_the_sessions_list_pages_through_and_a_delete_takes_one_out(site):
    browser = Browser(site.port)
    keys = [uuid.uuid4().hex[:12] for _ in range(3)]
    for index, key in enumerate(keys):
        browser.request("POST", f"/runs/{key}/", {"prompt": f"{index + 1} words, chat {index}"})
        ended(browser, key)
    page = browser.request("GET", "/runs/?limit=2").json()
    assert [s["session"] for s in page["sessions"]] == keys[:0:-1]
    assert page["sessions"][0]["title"] == "3 words, chat 2"
    assert (page["sessions"][0]["status"], page["sessions"][0]["runs"]) == ("done", 1)
    rest = browser.request("GET", f"/runs/?limit=2&cursor={page['next']}").json()
    assert [s["session"] for s in rest["sessions"]] == keys[:1] and rest["next"] is None
    history = browser.request("GET", f"/runs/{keys[2]}/runs/").json()
    assert history["session"] == keys[2] and history["next"] is None
    assert [(r["prompt"], r["output"]) for r in history["runs"]] == [
        ("3 words, chat 2", "w0 w1 w2 ")
    ]
    assert browser.request("DELETE", f"/runs/{keys[1]}/").status == 204
    listed = browser.request("GET", "/runs/").json()
    assert [s["session"] for s in listed["sessions"]] == [keys[2], keys[0]]
    assert "Traceback" not in site.output()


def test_a_sessions_runs_page_backwards_and_show_the_run_in_flight_live(site, key):
    browser = Browser(site.port)
    for words in (1, 2, 3):
        browser.request("POST", f"/runs/{key}/", {"prompt": str(words)})
        ended(browser, key)
    browser.request("POST", f"/runs/{key}/", {"prompt": "500"})
    stream = browser.stream(f"/runs/{key}/events/")
    stream.take(6)
    newest = browser.request("GET", f"/runs/{key}/runs/?limit=2").json()
    assert [r["prompt"] for r in newest["runs"]] == ["3", "500"]
    live = newest["runs"][-1]
    assert live["status"] == "running" and live["output"].startswith("w0 w1 w2 w3 ")
    older = browser.request("GET", f"/runs/{key}/runs/?limit=2&cursor={newest['next']}").json()
    assert [r["output"] for r in older["runs"]] == ["w0 ", "w0 w1 "] and older["next"] is None
    browser.request("POST", f"/runs/{key}/stop/")
    assert stream.rest()[-1].data == {"status": "stopped"}


def test_another_visitor_does_not_see_the_session_and_cannot_read_or_delete_it(site, key):
    owner, stranger = Browser(site.port), Browser(site.port)
    owner.request("POST", f"/runs/{key}/", {"prompt": "300"})
    stream = owner.stream(f"/runs/{key}/events/")
    stream.take(3)
    assert stranger.request("GET", "/runs/").json() == {"sessions": [], "next": None}
    assert stranger.request("GET", f"/runs/{key}/runs/").status == 404
    refused = stranger.request("DELETE", f"/runs/{key}/")
    assert refused.status == 404 and refused.json() == {"error": "No such session."}
    assert owner.request("GET", f"/runs/{key}/").json()["run"]["status"] == "running"
    assert [s["session"] for s in owner.request("GET", "/runs/").json()["sessions"]] == [key]
    assert owner.request("POST", f"/runs/{key}/stop/").json() == {"stopped": True}
    assert stream.rest()[-1].data == {"status": "stopped"}
    assert Run.objects.filter(session_key=key).count() == 1


def test_bad_limits_and_cursors_are_400_json_and_change_nothing(site, key):
    browser = Browser(site.port)
    browser.request("POST", f"/runs/{key}/", {"prompt": "2"})
    ended(browser, key)
    cursor = browser.request("GET", "/runs/?limit=1").json()["next"]
    for path in (
        "/runs/?limit=0",
        "/runs/?limit=101",
        "/runs/?limit=%F0%9F%98%80",
        "/runs/?cursor=nonsense",
        f"/runs/{key}/runs/?cursor=%00%ff",
        f"/runs/{key}/runs/?limit=-5",
    ):
        reply = browser.request("GET", path)
        assert reply.status == 400 and set(reply.json()) == {"error"}, path
    if cursor is not None:  # a cursor of the sessions list is not one of the runs'
        assert browser.request("GET", f"/runs/{key}/runs/?cursor={cursor}").status == 400
    assert browser.request("PATCH", f"/runs/{key}/").status == 405
    assert browser.request("DELETE", f"/runs/{key}/", csrf=False).status == 403
    assert browser.request("GET", f"/runs/{key}/runs/").json()["runs"][0]["output"] == "w0 w1 "
    assert "Traceback" not in site.output()


# -- two workers -----------------------------------------------------------------------


def test_a_delete_on_one_worker_ends_a_run_another_drives_and_its_followers_there(
    start_workers, key
):
    redis_client()
    a, b = start_workers()
    on_b = Browser(b.port)
    started = on_b.request("POST", f"/runs/{key}/", {"prompt": "500"}).json()
    on_a = Browser(a.port, cookies=dict(on_b.cookies))  # the same browser, balanced to A
    following = [on_a.stream(f"/runs/{key}/events/"), on_b.stream(f"/runs/{key}/events/")]
    for stream in following:
        stream.take(3)
    assert on_a.request("DELETE", f"/runs/{key}/").status == 204
    for stream in following:
        assert stream.rest()[-1].data == {"status": "stopped"}
    assert not Run.objects.filter(session_key=key).exists()
    run_id = uuid.UUID(started["id"]).hex
    assert redis_keys(a, key, [run_id]) == []
    for worker in (a, b):
        assert (
            Browser(worker.port, cookies=dict(on_b.cookies)).request("GET", f"/runs/{key}/").status
            == 404
        )
    time.sleep(1)
    assert redis_keys(a, key, [run_id]) == [] and not Run.objects.filter(session_key=key).exists()
    assert "Traceback" not in a.output() + b.output()

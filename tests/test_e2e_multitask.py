"""End to end over real servers (daphne and uvicorn): options sent with a
prompt, and the double-send policies (``multitask``): interrupt, reject,
enqueue, rollback; a stop with ``{"all": true}``; their bad input.

The suite's Redis pass (``TEST_BACKEND=redis``) runs these on the Redis
backend too; `test_e2e_workers_queue.py` has the queue across two workers."""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Any

import pytest

from detached_runs.models import Run

from .agents import numbered
from .http import SSE, Browser, text

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def start(browser: Browser, key: str, prompt: str, **body: Any) -> Any:
    return browser.request("POST", f"/runs/{key}/", {"prompt": prompt, **body})


def rows(key: str) -> list[Run]:
    return list(Run.objects.filter(session_key=key).order_by("started_at", "id"))


def wait_until(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def follow_runs(browser: Browser, key: str, count: int) -> list[list[SSE]]:
    """The session's next ``count`` runs as its events URL gives them, each
    reconnect sending the last id it got (what EventSource does)."""
    runs: list[list[SSE]] = []
    last: str | None = None
    for _ in range(count):
        stream = browser.stream(f"/runs/{key}/events/", {"Last-Event-ID": last} if last else {})
        assert stream.status == 200, f"run {len(runs)} not followed: {stream.status}"
        events = stream.rest()
        assert events[-1].event == "done"
        runs.append(events)
        last = events[-1].id
    return runs


# -- options --------------------------------------------------------------------


def test_options_reach_the_agent_cleaned_by_the_hook_and_are_stored_on_the_run(browser, key):
    options = {"model": "small", "temperature": 0.2, "secret": "dropped by the hook"}
    reply = start(browser, key, "context", options=options)
    assert reply.status == 202
    events = browser.stream(f"/runs/{key}/events/").rest()
    context = next(e for e in events if e.event == "context")
    assert context.data == {"options": {"model": "small", "temperature": 0.2}, "user": None}
    run = browser.request("GET", f"/runs/{key}/").json()["run"]
    assert run["options"] == {"model": "small", "temperature": 0.2}
    assert Run.objects.get(pk=reply.json()["id"]).options == run["options"]


def test_a_form_post_and_a_json_start_without_options_get_empty_options(browser, key):
    reply = browser.request(
        "POST",
        f"/runs/{key}/",
        b"prompt=context",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert reply.status == 202
    events = browser.stream(f"/runs/{key}/events/").rest()
    assert next(e for e in events if e.event == "context").data["options"] == {}
    assert Run.objects.get(pk=reply.json()["id"]).options == {}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"options": ["model", "x"]}, '"options" must be a JSON object.'),
        ({"options": "model=x"}, '"options" must be a JSON object.'),
        ({"options": {"pad": "x" * 20_000}}, '"options" is too large'),
        ({"options": {"model": "forbidden"}}, "You may not use the model forbidden."),
        ({"multitask": "queue"}, '"multitask" must be one of interrupt, reject, enqueue'),
        ({"multitask": ["enqueue"]}, '"multitask" must be one of'),
    ],
)
def test_bad_options_or_multitask_are_400_and_change_nothing(browser, key, body, message):
    first = start(browser, key, "30")
    assert first.status == 202
    reply = start(browser, key, "5", **body)
    assert reply.status == 400
    assert reply.json()["error"].startswith(message)
    # The run in flight was not stopped, and no row was written.
    assert [r.pk for r in rows(key)] == [uuid.UUID(first.json()["id"])]
    events = browser.stream(f"/runs/{key}/events/").rest()
    assert text(events) == "".join(numbered(30)) and events[-1].data == {"status": "done"}


# -- the policies ----------------------------------------------------------------


def test_three_quick_enqueue_sends_run_in_order_with_three_saved_answers(browser, key):
    # The first answers for 0.8 s: the two others are sent while it streams,
    # on a loaded machine too.
    replies = [start(browser, key, f"{n} words", multitask="enqueue") for n in (40, 7, 8)]
    assert [r.status for r in replies] == [202, 202, 202]
    assert [r.json()["status"] for r in replies] == ["running", "queued", "queued"]
    ids = [r.json()["id"] for r in replies]
    # The queued rows exist at once, in the order they were sent.
    assert [str(r.pk) for r in rows(key)] == ids
    assert [r.status for r in rows(key)] == ["running", "queued", "queued"]
    # The events URL follows each run as it starts, one after the other.
    followed = follow_runs(browser, key, 3)
    assert [run[0].data["run"] for run in followed] == ids
    assert [text(run) for run in followed] == ["".join(numbered(n)) for n in (40, 7, 8)]
    assert all(run[-1].data == {"status": "done"} for run in followed)
    wait_until(lambda: all(r.status == "done" for r in rows(key)), "not all saved")
    saved = rows(key)
    assert [r.output for r in saved] == ["".join(numbered(n)) for n in (40, 7, 8)]
    # Each started after the one before it ended.
    for before, after in itertools.pairwise(saved):
        assert after.first_token_at is not None and before.finished_at is not None
        assert after.first_token_at >= before.finished_at
    # Nothing is left to follow.
    ended = {"Last-Event-ID": followed[-1][-1].id or ""}
    assert browser.stream(f"/runs/{key}/events/", ended).status == 204


def test_a_queued_run_survives_its_sender_leaving_and_the_history_shows_it(browser, key, server):
    start(browser, key, "60")
    queued = start(browser, key, "context", multitask="enqueue", options={"n": 1})
    assert queued.json()["status"] == "queued"
    # Nobody follows anything: the queued run still runs, with its options.
    wait_until(lambda: Run.objects.get(pk=queued.json()["id"]).status == "done", "never ran")
    other = Browser(server.port, cookies=dict(browser.cookies))
    events = other.stream(f"/runs/{key}/events/").rest()
    assert events[0].data["run"] == queued.json()["id"]
    assert next(e for e in events if e.event == "context").data["options"] == {"n": 1}


def test_reject_while_running_is_409_and_changes_nothing(browser, key):
    first = start(browser, key, "100")
    stream = browser.stream(f"/runs/{key}/events/")
    head = stream.take(3)
    reply = start(browser, key, "5", multitask="reject")
    assert reply.status == 409
    assert "in flight" in reply.json()["error"]
    rest = stream.rest()
    assert text(head) + text(rest) == "".join(numbered(100))
    assert rest[-1].data == {"status": "done"}
    assert [str(r.pk) for r in rows(key)] == [first.json()["id"]]
    # With nothing in flight, reject starts like any other.
    assert start(browser, key, "3", multitask="reject").status == 202


def test_reject_while_runs_are_queued_is_409_too(browser, key):
    start(browser, key, "100")
    start(browser, key, "3", multitask="enqueue")
    assert start(browser, key, "3", multitask="reject").status == 409
    assert len(rows(key)) == 2


def test_rollback_leaves_no_row_of_the_run_it_replaced(browser, key):
    old = start(browser, key, "40")
    stream = browser.stream(f"/runs/{key}/events/")
    stream.take(4)
    queued = start(browser, key, "3", multitask="enqueue")
    new = start(browser, key, "5", multitask="rollback")
    assert new.status == 202 and new.json()["status"] == "running"
    # The follower of the old run gets its end.
    assert stream.rest()[-1].data["status"] == "stopped"
    events = browser.stream(f"/runs/{key}/events/").rest()
    assert events[0].data["run"] == new.json()["id"]
    wait_until(lambda: rows(key)[0].status == "done", "the new run did not finish")
    time.sleep(0.5)  # the old run's final save came and went
    assert [str(r.pk) for r in rows(key)] == [new.json()["id"]]
    assert not Run.objects.filter(pk__in=[old.json()["id"], queued.json()["id"]]).exists()


def test_interrupt_stops_the_run_in_flight_and_cancels_the_queue(browser, key):
    old = start(browser, key, "40")
    queued = start(browser, key, "3", multitask="enqueue")
    new = start(browser, key, "4", multitask="interrupt")
    assert new.json()["status"] == "running"
    wait_until(lambda: Run.objects.get(pk=new.json()["id"]).status == "done", "new run")
    by_id = {str(r.pk): r for r in rows(key)}
    assert by_id[old.json()["id"]].status == "stopped"
    assert by_id[queued.json()["id"]].status == "stopped"
    assert by_id[queued.json()["id"]].output == ""
    assert by_id[queued.json()["id"]].finished_at is not None


def test_stop_all_cancels_the_queue_and_stop_alone_does_not(browser, key):
    start(browser, key, "40")
    second = start(browser, key, "3", multitask="enqueue")
    third = start(browser, key, "3", multitask="enqueue")
    # A plain stop stops the run in flight; the queue goes on.
    assert browser.request("POST", f"/runs/{key}/stop/").json() == {"stopped": True}
    wait_until(
        lambda: Run.objects.get(pk=third.json()["id"]).status == "done", "queue did not go on"
    )
    assert Run.objects.get(pk=second.json()["id"]).status == "done"
    start(browser, key, "40")
    queued = [start(browser, key, "3", multitask="enqueue").json()["id"] for _ in range(2)]
    reply = browser.request("POST", f"/runs/{key}/stop/", {"all": True})
    assert reply.json() == {"stopped": True}
    time.sleep(0.5)
    for pk in queued:
        run = Run.objects.get(pk=pk)
        assert (run.status, run.output) == ("stopped", "")
    assert all(r.status != "running" for r in rows(key))


def test_a_full_queue_is_429_and_changes_nothing(browser, key):
    # MAX_QUEUED_PER_SESSION is 3 in the test settings.
    start(browser, key, "40")
    for _ in range(3):
        assert start(browser, key, "2", multitask="enqueue").json()["status"] == "queued"
    reply = start(browser, key, "2", multitask="enqueue")
    assert reply.status == 429
    assert "3 runs queued" in reply.json()["error"]
    assert len(rows(key)) == 4
    browser.request("POST", f"/runs/{key}/stop/", {"all": True})


@pytest.mark.parametrize("body", [{"all": "yes"}, ["all"], {"all": 1}])
def test_a_bad_stop_body_is_400_and_stops_nothing(browser, key, body):
    start(browser, key, "200")  # 4 s: in flight throughout
    start(browser, key, "2", multitask="enqueue")
    reply = browser.request("POST", f"/runs/{key}/stop/", body)
    assert reply.status == 400
    assert [r.status for r in rows(key)] == ["running", "queued"]
    browser.request("POST", f"/runs/{key}/stop/", {"all": True})


def test_another_owner_cannot_enqueue_reject_or_cancel_in_a_session_it_does_not_own(
    browser, key, server
):
    start(browser, key, "200")  # 4 s: in flight throughout
    start(browser, key, "2", multitask="enqueue")
    stranger = Browser(server.port)
    for multitask in ("enqueue", "reject", "rollback", "interrupt"):
        assert start(stranger, key, "1", multitask=multitask).status == 404
    assert stranger.request("POST", f"/runs/{key}/stop/", {"all": True}).status == 404
    assert [r.status for r in rows(key)] == ["running", "queued"]
    browser.request("POST", f"/runs/{key}/stop/", {"all": True})


def test_deleting_a_session_with_runs_queued_starts_none_of_them(browser, key):
    start(browser, key, "40")
    for _ in range(2):
        assert start(browser, key, "3", multitask="enqueue").json()["status"] == "queued"
    assert browser.request("DELETE", f"/runs/{key}/").status == 204
    time.sleep(1)  # long enough for a queued run to have started and saved
    assert rows(key) == []
    assert browser.request("GET", f"/runs/{key}/").status == 404

"""Runs that wait for the user, end to end under real daphne and uvicorn
processes (the memory backend, or Redis under ``TEST_BACKEND=redis``): ask,
close every client, answer from a fresh one later; the events URL of a
waiting run; the answer endpoint's refusals; stop and the double-send
policies while waiting. Two workers sharing Redis: `test_e2e_workers_input.py`."""

from __future__ import annotations

import time
import uuid
from typing import Any
from urllib.parse import urlencode

import pytest
from django.utils import timezone

from detached_runs.models import Run
from detached_runs.workers import stale_after

from .agents import script
from .conftest import ended_row
from .http import SSE, Browser, Stream, text
from .test_e2e_anonymous import log_in_through_the_admin, make_user

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

QUESTION = {"question": "Approve this payment?", "choices": ["yes", "no"]}


def new_key() -> str:
    return uuid.uuid4().hex[:12]


def until_question(stream: Stream) -> list[SSE]:
    """The stream's events up to its ``input_required``."""
    seen = []
    for event in stream.events():
        seen.append(event)
        if event.event == "input_required":
            return seen
    raise AssertionError(f"no question in {[e.event for e in seen]}")


def pending(browser: Browser, key: str) -> dict[str, Any]:
    """``GET <key>/``'s run once it is waiting."""
    deadline = time.monotonic() + 10
    while True:
        run = browser.request("GET", f"/runs/{key}/").json()["run"]
        if run["status"] == "waiting":
            return dict(run)
        assert time.monotonic() < deadline, f"never waiting: {run['status']}"
        time.sleep(0.05)


def answer(browser: Browser, key: str, request: str, value: Any) -> Any:
    return browser.request("POST", f"/runs/{key}/input/", {"request": request, "value": value})


def test_ask_close_every_client_and_answer_from_a_fresh_one_ten_seconds_later(server):
    tab, key = Browser(server.port), new_key()
    prompt = script(["Checking the invoice. ", {"ask": QUESTION}, "Paid."])
    assert tab.request("POST", f"/runs/{key}/", {"prompt": prompt}).status == 202
    stream = tab.stream(f"/runs/{key}/events/")
    question = until_question(stream)[-1]
    stream.close()  # every client gone
    assert question.data["question"] == "Approve this payment?"
    time.sleep(10.5)
    # The next morning, another tab of the same browser.
    fresh = Browser(server.port, cookies=dict(tab.cookies))
    run = pending(fresh, key)
    assert run["input_request"] == question.data
    assert run["output"] == "Checking the invoice. "
    row = Run.objects.get(pk=run["id"])
    # Waiting, not taken for dead: its process still beats for it.
    assert row.status == "waiting"
    assert timezone.now() - row.updated_at < stale_after()
    reply = answer(fresh, key, question.data["request"], "yes")
    assert (reply.status, reply.json()) == (200, {"accepted": True})
    row = ended_row(key, 10, "the run did not end after its answer")
    assert (row.status, row.output) == ("done", 'Checking the invoice. answer:"yes" Paid.')
    replay = fresh.stream(f"/runs/{key}/events/").rest()
    assert [e.event for e in replay if e.event != "delta"] == [
        "start",
        "input_required",
        "input_received",
        "done",
    ]
    assert text(replay) == row.output


def test_a_waiting_runs_events_url_keeps_its_keepalives_and_every_tab_sees_the_answer(server):
    tab, key = Browser(server.port), new_key()
    prompt = script(["a ", {"ask": QUESTION}, "b"])
    assert tab.request("POST", f"/runs/{key}/", {"prompt": prompt}).status == 202
    first = tab.stream(f"/runs/{key}/events/")
    second = Browser(server.port, cookies=dict(tab.cookies)).stream(f"/runs/{key}/events/")
    request = until_question(first)[-1].data["request"]
    assert until_question(second)[-1].data["request"] == request
    time.sleep(1.2)  # the test server's keep-alive is 0.3 s
    assert answer(tab, key, request, "yes").status == 200
    for stream in (first, second):
        rest = stream.rest()
        assert [e.event for e in rest if e.event != "delta"] == ["input_received", "done"]
        assert rest[0].data == {"request": request}
    assert len(first.comments) >= 2, first.comments  # the keep-alives of the wait


def test_the_answer_endpoints_refusals_are_json_and_change_nothing(server):
    tab, key = Browser(server.port), new_key()
    assert tab.request("POST", f"/runs/{key}/", {"prompt": script([{"ask": QUESTION}])}).status
    request = pending(tab, key)["input_request"]["request"]
    url = f"/runs/{key}/input/"
    refusals = {
        "not JSON": (tab.request("POST", url, b"{", headers={"Content-Type": "text/plain"}), 400),
        "no value": (tab.request("POST", url, {"request": request}), 400),
        "bad id": (tab.request("POST", url, {"request": "x" * 32, "value": 1}), 400),
        "too large": (answer(tab, key, request, "x" * 20_000), 400),
        "unknown request": (answer(tab, key, uuid.uuid4().hex, "yes"), 409),
        "another owner": (answer(Browser(server.port), key, request, "yes"), 404),
        "no such session": (answer(tab, new_key(), request, "yes"), 404),
        "no CSRF token": (tab.request("POST", url, {"value": 1}, csrf=False), 403),
        "GET": (tab.request("GET", url), 405),
    }
    for what, (reply, status) in refusals.items():
        assert reply.status == status, what
        assert reply.headers["Content-Type"] == "application/json", what
        assert "Traceback" not in reply.json()["error"], what
    assert pending(tab, key)["input_request"]["request"] == request  # changed nothing
    assert answer(tab, key, request, ["yes", 1]).status == 200
    assert answer(tab, key, request, "again").status == 409
    assert ended_row(key, 10, "not ended").output == 'answer:["yes", 1] '


def test_a_stop_while_waiting_saves_what_there_was_as_stopped(server):
    tab, key = Browser(server.port), new_key()
    prompt = script(["partial ", {"ask": QUESTION}, "never"])
    assert tab.request("POST", f"/runs/{key}/", {"prompt": prompt}).status == 202
    request = pending(tab, key)["input_request"]["request"]
    assert tab.request("POST", f"/runs/{key}/stop/").json() == {"stopped": True}
    row = ended_row(key, 10, "the stop did not end the run")
    assert (row.status, row.output) == ("stopped", "partial ")
    assert answer(tab, key, request, "yes").status == 409


def test_the_double_send_policies_treat_a_waiting_run_as_running(server):
    tab, key = Browser(server.port), new_key()
    prompt = script(["first ", {"ask": QUESTION}, "end"])
    assert tab.request("POST", f"/runs/{key}/", {"prompt": prompt}).status == 202
    request = pending(tab, key)["input_request"]["request"]
    reject = tab.request("POST", f"/runs/{key}/", {"prompt": "3", "multitask": "reject"})
    assert reject.status == 409
    queued = tab.request("POST", f"/runs/{key}/", {"prompt": "3", "multitask": "enqueue"})
    assert queued.json()["status"] == "queued"
    assert pending(tab, key)["input_request"]["request"] == request  # still waiting
    assert answer(tab, key, request, "no").status == 200
    deadline = time.monotonic() + 15
    while [r.status for r in Run.objects.filter(session_key=key).order_by("started_at")] != [
        "done",
        "done",
    ]:
        assert time.monotonic() < deadline, "the queued run did not run after the answer"
        time.sleep(0.1)
    # An interrupt stops a waiting run like a running one.
    assert tab.request("POST", f"/runs/{key}/", {"prompt": prompt}).status == 202
    pending(tab, key)
    assert tab.request("POST", f"/runs/{key}/", {"prompt": "2"}).status == 202
    statuses = [r.status for r in Run.objects.filter(session_key=key).order_by("started_at")]
    deadline = time.monotonic() + 15
    while statuses[2:] != ["stopped", "done"]:
        assert time.monotonic() < deadline, statuses
        time.sleep(0.1)
        statuses = [r.status for r in Run.objects.filter(session_key=key).order_by("started_at")]


def test_the_admins_stop_action_stops_a_waiting_run(server):
    staff = make_user(staff=True)
    staff.is_superuser = True  # the action needs the change permission
    staff.save()
    browser, key = Browser(server.port), new_key()
    log_in_through_the_admin(browser, staff)
    prompt = script(["waiting ", {"ask": QUESTION}, "never"])
    assert browser.request("POST", f"/runs/{key}/", {"prompt": prompt}).status == 202
    run_id = pending(browser, key)["id"]
    form = urlencode({"action": "stop_runs", "_selected_action": run_id})
    reply = browser.request(
        "POST",
        "/admin/detached_runs/run/",
        form.encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert reply.status == 302
    row = ended_row(key, 10, "the admin's action did not stop the waiting run")
    assert (row.status, row.output) == ("stopped", "waiting ")

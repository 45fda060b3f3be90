"""Runs that wait for the user (``ctx.ask``), in process, on the backend of
the pass (memory, or Redis under ``TEST_BACKEND=redis``): the question in the
log and in the run's status, the answer, its checks, timeouts, stop, and
``RUN_TIMEOUT`` not counting the wait. Over real servers:
`test_e2e_input.py`."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detached_runs import runs
from detached_runs.exceptions import BadInput, InputNotPending, RunNotFound, TooManyRuns
from detached_runs.models import Run
from detached_runs.runs import get_service
from detached_runs.validation import validate_answer, validate_question

from .agents import script
from .conftest import collect, ended, eventually, text_of
from .test_consumers import connect, cookie_for

pytestmark = pytest.mark.django_db(transaction=True)

QUESTION = {"question": "Run this SQL?", "choices": ["yes", "no"]}


def new_key() -> str:
    return uuid.uuid4().hex[:16]


async def waiting(key: str, owner: Any = None) -> dict[str, Any]:
    """The session's pending request, once its run waits for one."""
    found: dict[str, Any] = {}

    async def check() -> bool:
        run = await runs.status(key, owner=owner)
        if run is not None and run.status == "waiting":
            found.update(run.as_json()["input_request"])
            return True
        return False

    await eventually(check, "the run never waited for an answer")
    return found


async def test_a_question_makes_the_run_waiting_and_its_answer_reaches_the_agent():
    key = new_key()
    await runs.start(key, prompt=script(["before ", {"ask": QUESTION}, "after"]))
    request = await waiting(key)
    assert request["question"] == "Run this SQL?" and request["choices"] == ["yes", "no"]
    assert len(request["request"]) == 32
    await eventually(
        lambda: Run.objects.filter(session_key=key, status="waiting").aexists(),
        "the row never said waiting",
    )
    await runs.answer(key, {"request": request["request"], "value": {"approved": True}})
    row = await ended(key)
    assert row.status == "done"
    assert row.output == 'before answer:{"approved": true} after'
    events = await collect(await runs.subscribe(key))
    kinds = [e.event for e in events if e.event != "delta"]
    assert kinds == ["start", "input_required", "input_received", "done"]
    required = next(e for e in events if e.event == "input_required")
    assert required.data == {**QUESTION, "request": request["request"]}
    received = next(e for e in events if e.event == "input_received")
    assert received.data == {"request": request["request"]}


async def test_a_second_answer_to_the_same_request_is_refused_and_changes_nothing():
    key = new_key()
    await runs.start(key, prompt=script([{"ask": QUESTION}, {"ask": QUESTION}]))
    first = await waiting(key)
    await runs.answer(key, {"request": first["request"], "value": "yes"})
    with pytest.raises(InputNotPending):
        await runs.answer(key, {"request": first["request"], "value": "no"})
    second = await waiting(key)
    assert second["request"] != first["request"]
    with pytest.raises(InputNotPending):  # the first one again, now that the second waits
        await runs.answer(key, {"request": first["request"], "value": "no"})
    await runs.answer(key, {"request": second["request"], "value": 2})
    row = await ended(key)
    assert (row.status, row.output) == ("done", 'answer:"yes" answer:2 ')


@pytest.mark.parametrize(
    "payload",
    [
        None,
        "yes",
        [],
        {"value": "yes"},  # no request
        {"request": "0" * 32},  # no value
        {"request": 5, "value": "yes"},
        {"request": "not-an-id", "value": "yes"},
        {"request": "A" * 32, "value": "yes"},  # ids are lowercase hex
        {"request": "0" * 32, "value": {1, 2}},  # not JSON
    ],
)
async def test_a_malformed_answer_is_a_400_and_changes_nothing(payload):
    key = new_key()
    await runs.start(key, prompt=script([{"ask": QUESTION, "timeout": 5, "catch": True}]))
    request = await waiting(key)
    with pytest.raises(BadInput):
        await runs.answer(key, payload)
    assert (await waiting(key))["request"] == request["request"]
    await runs.stop(key)
    assert (await ended(key)).status == "stopped"


async def test_an_answer_over_the_bound_is_refused(config):
    config(MAX_INPUT_BYTES=40)
    key = new_key()
    await runs.start(key, prompt=script([{"ask": {"q": 1}}]))
    request = (await waiting(key))["request"]
    with pytest.raises(BadInput, match=r"too large \(42 bytes of JSON; the limit is 40\)"):
        await runs.answer(key, {"request": request, "value": "é" * 20})
    await runs.answer(key, {"request": request, "value": "é" * 19})
    assert (await ended(key)).output == f"answer:{json.dumps('é' * 19)} "


async def test_a_foreign_or_unknown_session_is_404_and_an_unknown_request_409():
    key = new_key()
    await runs.start(key, prompt=script([{"ask": QUESTION}]), owner="user:1")
    request = (await waiting(key, owner="user:1"))["request"]
    with pytest.raises(RunNotFound):
        await runs.answer(key, {"request": request, "value": "yes"}, owner="user:2")
    with pytest.raises(RunNotFound):
        await runs.answer(new_key(), {"request": request, "value": "yes"}, owner="user:1")
    with pytest.raises(InputNotPending):
        await runs.answer(key, {"request": uuid.uuid4().hex, "value": "yes"}, owner="user:1")
    # Still waiting, for its owner's answer.
    await runs.answer(key, {"request": request, "value": "yes"}, owner="user:1")
    assert (await ended(key)).output == 'answer:"yes" '


async def test_an_unanswered_question_times_out_in_the_agent():
    key = new_key()
    await runs.start(key, prompt=script([{"ask": QUESTION, "timeout": 0.3}, "never"]))
    request = (await waiting(key))["request"]
    row = await ended(key)
    assert (row.status, row.output) == ("error", "")
    assert row.error == "No answer came within 0.3 seconds."
    with pytest.raises(InputNotPending):
        await runs.answer(key, {"request": request, "value": "late"})
    kinds = [e.event for e in await collect(await runs.subscribe(key))]
    assert kinds == ["start", "input_required", "input_timeout", "done"]


async def test_an_agent_that_catches_the_timeout_goes_on():
    key = new_key()
    await runs.start(
        key, prompt=script([{"ask": QUESTION, "timeout": 0.2, "catch": True}, "went on"])
    )
    row = await ended(key)
    assert (row.status, row.output) == ("done", "timed out went on")


async def test_input_timeout_is_the_default_timeout(config):
    config(INPUT_TIMEOUT=0.2)
    key = new_key()
    await runs.start(key, prompt=script([{"ask": QUESTION, "catch": True}]))
    assert (await ended(key)).output == "timed out "


async def test_a_stop_while_waiting_saves_stopped_and_the_question_is_no_longer_pending():
    key = new_key()
    await runs.start(key, prompt=script(["partial ", {"ask": QUESTION}, "never"]))
    request = (await waiting(key))["request"]
    assert await runs.stop(key) is True
    row = await ended(key)
    assert (row.status, row.output) == ("stopped", "partial ")
    with pytest.raises(InputNotPending):
        await runs.answer(key, {"request": request, "value": "yes"})

    async def shown_stopped() -> bool:
        # The backend holds the run (still waiting) until its terminal event,
        # a moment after its row is saved.
        status = await runs.status(key)
        assert status is not None
        return status.as_json()["status"] == "stopped"

    await eventually(shown_stopped, "the run's status never said stopped")
    status = await runs.status(key)
    assert status is not None and "input_request" not in status.as_json()


async def test_waiting_does_not_count_towards_the_run_timeout(config):
    config(RUN_TIMEOUT=0.6)
    key = new_key()
    await runs.start(key, prompt=script(["a ", {"ask": QUESTION}, "b"]))
    request = (await waiting(key))["request"]
    await asyncio.sleep(1.0)  # longer than RUN_TIMEOUT, all of it waiting
    await runs.answer(key, {"request": request, "value": "yes"})
    row = await ended(key)
    assert (row.status, row.output) == ("done", 'a answer:"yes" b')


async def test_the_run_timeout_still_ends_a_run_that_works_too_long_after_an_answer(config):
    config(RUN_TIMEOUT=0.5)
    key = new_key()
    await runs.start(key, prompt=script([{"ask": QUESTION}, *["w "] * 200]))
    request = (await waiting(key))["request"]
    await runs.answer(key, {"request": request, "value": "yes"})
    row = await ended(key)
    assert (row.status, row.error) == ("error", "The run took too long.")


async def test_a_late_subscriber_replays_the_pending_question():
    key = new_key()
    await runs.start(key, prompt=script(["so far ", {"ask": QUESTION}]))
    request = (await waiting(key))["request"]
    subscription = await runs.subscribe(key)
    batch = await subscription.next_batch()
    while not any(e.event == "input_required" for e in batch):
        batch += await subscription.next_batch()
    assert text_of(batch) == "so far "
    await runs.answer(key, {"request": request, "value": "yes"})
    rest = await collect(subscription)
    assert [e.event for e in rest if e.event != "delta"] == ["input_received", "done"]


async def test_the_agent_cannot_ask_something_that_is_not_a_json_object():
    key = new_key()
    await runs.start(key, prompt=script([{"ask": ["not", "an", "object"]}]))
    row = await ended(key)
    assert (row.status, row.error) == ("error", "The agent failed.")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.one_of(json_values, st.dictionaries(st.text(max_size=10), json_values, max_size=3)))
def test_any_payload_is_an_answer_or_a_bad_input(payload):
    """Lone surrogates, NUL, NaN: what passes is cleaned JSON; nothing else is raised."""
    try:
        request, value = validate_answer(payload)
    except BadInput:
        return
    json.dumps(value, ensure_ascii=False, allow_nan=False).encode()  # storable, encodable
    assert request == payload["request"]


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=40)
@given(st.text())
def test_odd_text_in_a_question_and_an_answer_comes_out_clean(text):
    # As a key, prefixed: the text "request" is the service's own key, refused.
    question = validate_question({"q": text, f"k{text}": 1})
    encoded = json.dumps(question, ensure_ascii=False)
    assert "\x00" not in encoded
    encoded.encode()  # no lone surrogate
    _, value = validate_answer({"request": "0" * 32, "value": text})
    assert "\x00" not in value
    value.encode()


async def test_a_waiting_run_counts_towards_the_owners_limit(config):
    config(MAX_ACTIVE_RUNS_PER_OWNER=1)
    key = new_key()
    await runs.start(key, prompt=script([{"ask": QUESTION}]), owner="user:7")
    request = (await waiting(key, owner="user:7"))["request"]
    with pytest.raises(TooManyRuns):
        await runs.start(new_key(), prompt="1", owner="user:7")
    await runs.answer(key, {"request": request, "value": "yes"}, owner="user:7")
    await ended(key)
    await runs.start(new_key(), prompt="1", owner="user:7")


async def test_a_shutdown_interrupts_a_waiting_run_with_what_it_had():
    key = new_key()
    await runs.start(key, prompt=script(["so far ", {"ask": QUESTION}]))
    await waiting(key)
    await get_service().shutdown(2)
    row = await Run.objects.aget(session_key=key)
    assert (row.status, row.output) == ("interrupted", "so far ")


async def test_a_websocket_input_frame_answers_and_a_bad_one_gets_an_error_frame():
    owner = "anon:0123456789abcdef0123456789abcdef"
    key = new_key()
    await runs.start(key, prompt=script([{"ask": QUESTION}, "end"]), owner=owner)
    communicator = await connect(key, await cookie_for(owner))
    frames: list[dict[str, Any]] = []
    while not frames or frames[-1]["event"] != "input_required":
        frames.append(await communicator.receive_json_from(timeout=5))
    request = frames[-1]["data"]["request"]
    for bad in (
        {"type": "input", "value": "yes"},
        {"type": "input", "request": uuid.uuid4().hex, "value": "yes"},
    ):
        await communicator.send_json_to(bad)
        error = await communicator.receive_json_from(timeout=5)
        assert error["event"] == "error" and error["data"]["error"]
    await communicator.send_json_to({"type": "input", "request": request, "value": "yes"})
    rest: list[dict[str, Any]] = []
    while not rest or rest[-1]["event"] != "done":
        rest.append(await communicator.receive_json_from(timeout=5))
    assert [f["event"] for f in rest if f["event"] != "delta"] == ["input_received", "done"]
    assert (await ended(key)).output == 'answer:"yes" end'
    await communicator.disconnect()

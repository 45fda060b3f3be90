"""Faults of `detached_runs.aisdk` found by a hostile client: each test failed
before its fix. Every response is read by the ``ai`` package's own parser
(`tests.aisdk.parse`); a message is also checked the way ``useChat`` decides
to send it again by itself (``lastAssistantMessageIsCompleteWithApprovalResponses``,
the ``sendAutomaticallyWhen`` of `docs/aisdk.md`)."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from typing import Any

import pytest

from detached_runs.aisdk.protocol import UIMessageStream, encode_all
from detached_runs.events import Event
from detached_runs.models import Run

from .agents import numbered, script
from .aisdk import FRONTEND, ChatStream, new_chat, parse, require_node, send
from .conftest import ended_row
from .http import Browser

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _node() -> None:
    require_node()


def sends_again(message: dict[str, Any]) -> bool:
    """Whether ``useChat`` with the docs' ``sendAutomaticallyWhen`` posts the
    chat again by itself once a response leaves ``message`` so."""
    code = (
        'import {lastAssistantMessageIsCompleteWithApprovalResponses as f} from "ai";'
        'import {readFileSync} from "node:fs";'
        'console.log(JSON.stringify(f({messages: [JSON.parse(readFileSync(0, "utf8"))]})));'
    )
    done = subprocess.run(
        ["node", "--input-type=module", "-e", code],
        input=json.dumps(message).encode(),
        capture_output=True,
        cwd=FRONTEND,
        timeout=60,
        check=True,
    )
    return bool(json.loads(done.stdout))


def approval_part(message: dict[str, Any] | None) -> dict[str, Any]:
    assert message is not None
    return next(p for p in message["parts"] if p.get("state") == "approval-requested")


def approve(message: dict[str, Any], approved: bool) -> dict[str, Any]:
    """``message`` as ``addToolApprovalResponse`` leaves it."""
    part = approval_part(message)
    done = {**part, "state": "approval-responded"}
    done["approval"] = {**part["approval"], "approved": approved}
    return {**message, "parts": [done if p is part else p for p in message["parts"]]}


def continuation(chat: str, message: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": chat,
        "messages": [message],
        "trigger": "submit-message",
        "messageId": message["id"],
    }


def test_a_send_queued_behind_a_streaming_run_streams_its_own_answer(server):
    """``multitask: "enqueue"`` while a run streams: the response followed
    the run in flight, took its ``start`` for a newer run that had replaced
    the queued one, and ended the queued run's message at once as
    ``stopped``, empty, though the run then ran to its end."""
    browser = Browser(server.port)
    chat = new_chat()
    first = send(browser, chat, "15")
    first.chunks(4)
    second = send(browser, chat, "4", multitask="enqueue")
    assert second.status == 200
    parsed = parse(second.rest())
    assert parsed.code == 0, parsed.stderr
    queued = Run.objects.get(session_key=chat, prompt="4")
    assert parsed.message is not None and parsed.message["id"] == str(queued.id)
    assert parsed.chunks[-1]["messageMetadata"] == {"status": "done"}
    assert parsed.text() == "".join(numbered(4))
    earlier = parse(first.rest())
    assert earlier.code == 0, earlier.stderr
    assert earlier.text() == "".join(numbered(15))
    row = ended_row(chat, 10, "the queued run never ended")
    assert (row.id, row.status) == (queued.id, "done")


@pytest.mark.parametrize(
    "messages",
    [
        [{"id": "u1", "role": "user", "parts": 5}],
        [{"id": "u1", "role": "user", "parts": True}],
        [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "3"}], "metadata": [1]}],
        [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "3"}], "metadata": "x"}],
    ],
    ids=["parts-int", "parts-bool", "metadata-list", "metadata-str"],
)
def test_a_message_whose_parts_or_metadata_are_not_what_they_must_be_is_a_400(server, messages):
    """A user message's ``parts`` that are not a list made the view iterate
    a number: ``500 Internal error``; ``metadata`` that is not an object was
    dropped in silence and the run started without its options."""
    browser = Browser(server.port)
    chat = new_chat()
    reply = browser.request("POST", "/api/chat", {"id": chat, "messages": messages})
    assert reply.status == 400, reply.body
    assert "error" in reply.json()
    assert not Run.objects.filter(session_key=chat).exists()


def test_an_answer_whose_parts_are_not_a_list_is_a_400(server):
    browser = Browser(server.port)
    chat = new_chat()
    parse(send(browser, chat, "2").rest())
    row = ended_row(chat, 10, "the run never ended")
    message = {"id": str(row.id), "role": "assistant", "parts": 7}
    reply = browser.request("POST", "/api/chat", continuation(chat, message))
    assert reply.status == 400, reply.body
    assert "error" in reply.json()


PAY = {"event": "tool_call", "data": {"id": "c1", "name": "pay", "arguments": "{}"}}
ASK_PAY = {"ask": {"kind": "tool_approval", "tool_call_id": "c1", "question": "Pay?"}}


def asked(browser: Browser, chat: str, items: list[Any]) -> dict[str, Any]:
    """The assistant message of a response that ends at the run's question."""
    first = parse(send(browser, chat, script(items)).rest())
    assert first.code == 0, first.stderr
    assert first.chunks[-1] == {"type": "finish", "finishReason": "tool-calls"}
    assert first.message is not None
    return first.message


def test_an_approved_tool_whose_result_never_comes_is_not_sent_again_and_again(server):
    """The tool's part stayed ``approval-responded`` to the end of the
    continuation (the agent went on without a ``tool_result``): the docs'
    ``sendAutomaticallyWhen`` is true for such a message, so ``useChat``
    posted the same approval again after each response, for ever."""
    browser = Browser(server.port)
    chat = new_chat()
    message = approve(asked(browser, chat, [PAY, ASK_PAY, "Paid."]), True)
    rest = parse(
        ChatStream(browser, "POST", "/api/chat", continuation(chat, message)).rest(), message
    )
    assert rest.code == 0, rest.stderr
    assert rest.message is not None
    assert 'answer:{"approved": true} Paid.' in rest.text()
    assert not sends_again(rest.message)


def test_an_answer_to_a_stopped_runs_question_is_not_shown_taken_nor_sent_again(server):
    """The run was stopped while its question waited; the page still showed
    the question, and the user answered it: the continuation showed the
    answer as the question's output (the agent never got it), and left an
    approval the client sent again by itself."""
    browser = Browser(server.port)
    chat = new_chat()
    message = asked(browser, chat, ["Checking. ", {"ask": {"question": "Pay?"}}, "Paid."])
    assert browser.request("POST", f"/api/chat/{chat}/stop").status == 200
    ended_row(chat, 10, "the stop did not end the run")
    message = approve(message, True)
    rest = parse(
        ChatStream(browser, "POST", "/api/chat", continuation(chat, message)).rest(), message
    )
    assert rest.code == 0, rest.stderr
    assert rest.message is not None
    part = next(p for p in rest.message["parts"] if p["type"] == "tool-ask_user")
    assert part["state"] != "output-available", part
    assert not sends_again(rest.message)


def test_the_answer_of_the_tab_that_lost_the_race_is_not_shown_as_the_runs(server):
    """Two tabs answer one question, yes and no: exactly one answer is
    taken, but each tab's continuation showed its own answer as the
    question's output, so the tab whose "no" was not taken showed "no"
    while the run went on with "yes"."""
    browser = Browser(server.port)
    chat = new_chat()
    message = asked(browser, chat, ["Checking. ", {"ask": {"question": "Pay?"}}, "Paid."])
    yes = ChatStream(browser, "POST", "/api/chat", continuation(chat, approve(message, True)))
    no = ChatStream(browser, "POST", "/api/chat", continuation(chat, approve(message, False)))
    outputs = []
    for stream, approved in ((yes, True), (no, False)):
        parsed = parse(stream.rest(), approve(message, approved))
        assert parsed.code == 0, parsed.stderr
        assert parsed.message is not None
        part = next(p for p in parsed.message["parts"] if p["type"] == "tool-ask_user")
        outputs.append(part.get("output"))
        assert not sends_again(parsed.message)
    row = ended_row(chat, 10, "the run never ended")
    taken = json.loads(row.output.split("answer:")[1].removesuffix(" Paid."))
    assert taken in outputs  # the tab whose answer was taken shows it
    assert {"approved": not taken["approved"]} not in outputs  # the other does not


def test_an_approval_of_no_question_of_the_run_ends_at_once_and_changes_nothing(server):
    """An approval whose id names no question of the run (a forged or
    garbled id), sent while the run waits for its own question: the
    continuation waited for that question in the log, which never came, and
    stayed open with keep-alives as long as the run waited (the chat
    ``submitted`` for good)."""
    browser = Browser(server.port)
    chat = new_chat()
    message = approve(asked(browser, chat, ["Checking. ", {"ask": {"question": "Pay?"}}]), True)
    part = next(p for p in message["parts"] if p.get("state") == "approval-responded")
    part["approval"]["id"] = "not-a-question"
    stream = ChatStream(browser, "POST", "/api/chat", continuation(chat, message))
    assert stream.status == 200
    stream.connection.sock.settimeout(None)
    deadline = time.monotonic() + 5
    while not stream.raw.endswith(b"data: [DONE]\n\n"):
        assert time.monotonic() < deadline, stream.raw[-300:]
        line = stream.response.readline()
        assert line, "the response ended without [DONE]"
        stream.raw += line
    parsed = parse(stream.raw, message)
    assert parsed.code == 0, parsed.stderr
    assert parsed.message is not None
    assert not sends_again(parsed.message)
    assert Run.objects.get(session_key=chat).status == "waiting"
    assert browser.request("POST", f"/api/chat/{chat}/stop").status == 200


@pytest.mark.parametrize(
    "arguments",
    ['{"a": NaN, "b": -Infinity}', '{"big": 1e999}', '{"text": "\\ud800 and \\u0000"}'],
    ids=["nan", "overflow", "surrogate"],
)
def test_tool_arguments_python_parses_but_json_cannot_carry_do_not_break_the_stream(arguments):
    """A tool call's ``arguments`` (the model's text, a string in the log)
    parsed with Python's ``json.loads``: NaN, Infinity and 1e999 became
    floats the strict encoder refuses (``ValueError``), an escaped lone
    surrogate a string UTF-8 cannot encode: the response broke at that
    chunk, and so did every replay of the run."""
    stream = UIMessageStream(str(uuid.uuid4()))
    events = [
        Event(id="a", event="start", data={"run": stream.message_id}),
        Event(id="b", event="tool_call", data={"id": "c1", "name": "t", "arguments": arguments}),
        Event(id="c", event="done", data={"status": "done"}),
    ]
    chunks = stream.start()
    for event in events:
        chunks += stream.feed(event)
    parsed = parse(encode_all(chunks) + b"data: [DONE]\n\n")
    assert parsed.code == 0, parsed.stderr
    assert parsed.message is not None
    tool = next(p for p in parsed.message["parts"] if p["type"] == "tool-t")
    assert tool["state"] == "input-available"

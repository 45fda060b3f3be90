"""`detached_runs.aisdk` under real daphne and uvicorn processes (the memory
backend, or Redis under ``TEST_BACKEND=redis``), every response read by the
``ai`` package's own parser and message reader (`tests.aisdk.parse`): what
``useChat`` with ``DefaultChatTransport`` makes of it."""

from __future__ import annotations

import time
from typing import Any

import pytest

from detached_runs.models import Run

from .agents import numbered, script
from .aisdk import ChatStream, new_chat, parse, require_node, send, user_message
from .conftest import ended_row
from .http import Browser

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

EVERY_KIND = [
    "Hello ",
    {"event": "reasoning", "data": {"text": "Thinking it over."}},
    "world. ",
    {
        "event": "tool_call",
        "data": {
            "index": 0,
            "id": "call-1",
            "type": "function",
            "name": "weather",
            "arguments": '{"city": "Paris"}',
        },
    },
    {"event": "tool_result", "data": {"id": "call-1", "name": "weather", "ok": True}},
    {"event": "progress", "data": {"percent": 50}},
    {"event": "usage", "data": {"input_tokens": 3, "output_tokens": 5}},
    "Done.",
]


@pytest.fixture(autouse=True)
def _node() -> None:
    require_node()


def test_a_run_streams_as_the_ai_sdk_reads_it(server):
    browser = Browser(server.port)
    chat = new_chat()
    stream = send(browser, chat, script(EVERY_KIND))
    assert stream.status == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["x-vercel-ai-ui-message-stream"] == "v1"
    body = stream.rest()
    assert body.endswith(b"data: [DONE]\n\n")
    parsed = parse(body)
    assert parsed.code == 0, parsed.stderr
    row = Run.objects.get(session_key=chat)
    message = parsed.message
    assert message is not None and message["id"] == str(row.id)
    assert parsed.text() == "Hello world. Done." == row.output
    parts = [part["type"] for part in message["parts"] if part["type"] != "step-start"]
    assert parts == ["text", "reasoning", "text", "tool-weather", "data-progress", "text"]
    tool = next(part for part in message["parts"] if part["type"] == "tool-weather")
    assert (tool["state"], tool["input"]) == ("output-available", {"city": "Paris"})
    assert message["metadata"] == {
        "usage": {"input_tokens": 3, "output_tokens": 5},
        "status": "done",
    }
    assert parsed.chunks[-1] == {
        "type": "finish",
        "finishReason": "stop",
        "messageMetadata": {"status": "done"},
    }


def test_options_go_with_the_prompt_in_the_messages_metadata(server):
    browser = Browser(server.port)
    chat = new_chat()
    parse(send(browser, chat, "context", options={"model": "small"}).rest())
    row = Run.objects.get(session_key=chat)
    assert row.options == {"model": "small"}


def test_an_agent_error_is_an_error_chunk_then_finish(server):
    browser = Browser(server.port)
    chat = new_chat()
    parsed = parse(send(browser, chat, script(["partial ", {"raise": "The model broke."}])).rest())
    assert parsed.code == 0, parsed.stderr
    assert parsed.errors == ["The model broke."]
    assert parsed.types[-2:] == ["error", "finish"]
    assert parsed.chunks[-1]["finishReason"] == "error"
    assert parsed.text() == "partial "


def test_a_reload_mid_answer_resumes_the_whole_message_no_word_twice_or_missing(server):
    """The tab closes mid-answer (the run goes on: it is detached); the page
    reloads and ``useChat({resume: true})`` asks ``GET <chat>/stream``: the
    run's message from its start (the transport takes it as a replay, by
    the message id), then live to its end."""
    browser = Browser(server.port)
    chat = new_chat()
    first = send(browser, chat, "100")
    seen = first.chunks(12)
    assert any(chunk["type"] == "text-delta" for chunk in seen)
    first.close()
    resumed = ChatStream(browser, "GET", f"/api/chat/{chat}/stream")
    assert resumed.status == 200
    parsed = parse(resumed.rest())
    assert parsed.code == 0, parsed.stderr
    row = ended_row(chat, 30, "the run never ended")
    assert (row.status, parsed.text()) == ("done", "".join(numbered(100)))
    assert parsed.message is not None and parsed.message["id"] == str(row.id)
    assert parsed.types[0] == "start" and parsed.chunks[0]["messageId"] == str(row.id)


def test_a_resume_with_no_run_in_flight_is_204_never_a_hang(server):
    browser = Browser(server.port)
    chat = new_chat()
    assert ChatStream(browser, "GET", f"/api/chat/{chat}/stream").status == 204  # a new chat
    parse(send(browser, chat, "3").rest())
    ended_row(chat, 10, "the run never ended")
    assert ChatStream(browser, "GET", f"/api/chat/{chat}/stream").status == 204  # it ended
    other = Browser(server.port)  # not the owner: nothing tells the chat exists
    assert ChatStream(other, "GET", f"/api/chat/{chat}/stream").status == 204


def test_closing_the_response_does_not_stop_the_run_the_stop_endpoint_does(server):
    browser = Browser(server.port)
    chat = new_chat()
    stream = send(browser, chat, "300")
    stream.chunks(6)
    stream.close()  # the fetch aborted: stop() in useChat, a closed tab
    time.sleep(0.5)
    assert Run.objects.get(session_key=chat).status == "running"
    reply = browser.request("POST", f"/api/chat/{chat}/stop")
    assert (reply.status, reply.json()) == (200, {"stopped": True})
    row = ended_row(chat, 10, "the stop did not end the run")
    assert row.status == "stopped" and row.output.startswith("w0 w1 ")
    assert ChatStream(browser, "GET", f"/api/chat/{chat}/stream").status == 204


def question_of(parsed: Any) -> dict[str, Any]:
    message = parsed.message
    return next(part for part in message["parts"] if part.get("state") == "approval-requested")


def answered(message: dict[str, Any], part: dict[str, Any], approved: bool) -> dict[str, Any]:
    """``message`` as ``addToolApprovalResponse`` leaves it."""
    done = {**part, "state": "approval-responded"}
    done["approval"] = {**part["approval"], "approved": approved, "reason": "clicked"}
    return {**message, "parts": [done if p is part else p for p in message["parts"]]}


def test_a_question_is_an_approval_request_answered_after_a_reload(server):
    """The agent asks (``ctx.ask``): the response ends with the question as
    a tool approval request (``finishReason`` ``tool-calls``, so that
    ``sendAutomaticallyWhen`` can send the answer); the page reloads and
    resumes it; the approval goes to the run; the rest of the message
    follows, added to the same message."""
    browser = Browser(server.port)
    chat = new_chat()
    prompt = script(["Checking. ", {"ask": {"question": "Pay 3 invoices?"}}, "Paid."])
    first = parse(send(browser, chat, prompt).rest())
    assert first.code == 0, first.stderr
    assert first.chunks[-1] == {"type": "finish", "finishReason": "tool-calls"}
    part = question_of(first)
    assert (part["type"], part["input"]) == ("tool-ask_user", {"question": "Pay 3 invoices?"})
    assert Run.objects.get(session_key=chat).status == "waiting"
    # A reload: the same question, from the replay.
    resumed = parse(ChatStream(browser, "GET", f"/api/chat/{chat}/stream").rest())
    assert resumed.code == 0, resumed.stderr
    assert question_of(resumed)["approval"]["id"] == part["approval"]["id"]
    assert resumed.message is not None
    message = answered(resumed.message, question_of(resumed), True)
    body = {
        "id": chat,
        "messages": [user_message(prompt), message],
        "trigger": "submit-message",
        "messageId": message["id"],
    }
    rest = parse(ChatStream(browser, "POST", "/api/chat", body).rest(), message)
    assert rest.code == 0, rest.stderr
    assert rest.chunks[0] == {"type": "start", "messageId": message["id"]}
    assert rest.message is not None
    tool = next(p for p in rest.message["parts"] if p["type"] == "tool-ask_user")
    assert tool["state"] == "output-available"
    assert tool["output"] == {"approved": True, "reason": "clicked"}
    answer = 'answer:{"approved": true, "reason": "clicked"} '
    assert rest.text() == f"Checking. {answer}Paid."
    row = ended_row(chat, 10, "the run never ended")
    assert (row.status, row.output) == ("done", f"Checking. {answer}Paid.")


def test_the_chat_endpoints_refuse_what_they_cannot_do_with_json_and_change_nothing(server):
    browser = Browser(server.port)
    chat = new_chat()
    base: dict[str, Any] = {
        "id": chat,
        "messages": [user_message("3")],
        "trigger": "submit-message",
    }
    refused: list[tuple[Any, int]] = [
        (b"not json", 400),
        ({"id": chat}, 400),  # no messages
        ({**base, "id": "no/slashes"}, 400),
        ({**base, "trigger": "regenerate-message"}, 400),
        ({**base, "trigger": "other"}, 400),
        ({**base, "messages": []}, 400),
        ({**base, "messages": [{"role": "assistant", "parts": []}]}, 400),
        ({**base, "messageId": "user-1"}, 400),  # an edit: not a message of the chat
    ]
    for body, status in refused:
        reply = browser.request("POST", "/api/chat", body)
        assert reply.status == status, (body, reply.body)
        assert "error" in reply.json()
    assert not Run.objects.filter(session_key=chat).exists()
    # An assistant message that answers nothing: 409.
    parse(send(browser, chat, "3").rest())
    row = ended_row(chat, 10, "the run never ended")
    message = {"id": str(row.id), "role": "assistant", "parts": []}
    continuation = {**base, "messages": [message], "messageId": str(row.id)}
    assert browser.request("POST", "/api/chat", continuation).status == 409
    # Without the CSRF token: the JSON 403 of every view.
    assert browser.request("POST", "/api/chat", base, csrf=False).status == 403
    assert Run.objects.filter(session_key=chat).count() == 1


def test_the_messages_endpoint_gives_use_chat_its_initial_messages(server):
    browser = Browser(server.port)
    chat = new_chat()
    assert browser.request("GET", f"/api/chat/{chat}/messages").json() == {"messages": []}
    parse(send(browser, chat, "3").rest())
    row = ended_row(chat, 10, "the run never ended")
    messages = browser.request("GET", f"/api/chat/{chat}/messages").json()["messages"]
    assert [(m["role"], m["id"]) for m in messages] == [
        ("user", f"{row.id}-prompt"),
        ("assistant", str(row.id)),
    ]
    assert messages[1]["parts"] == [{"type": "text", "text": "w0 w1 w2 ", "state": "done"}]
    other = Browser(server.port)
    assert other.request("GET", f"/api/chat/{chat}/messages").json() == {"messages": []}

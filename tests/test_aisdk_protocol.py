"""`detached_runs.aisdk.protocol`: a run's events as UI message stream chunks.

What the client requires of a stream is in the ``ai`` package (7.0,
``src/ui/process-ui-message-stream.ts``): a ``text-delta`` or ``text-end``
for a text part that is not open throws ("Received text-delta for missing
text part"), as do reasoning's; a tool's output or approval request needs
its tool part (``tool-input-available``) first ("No tool invocation
found"); ``data`` is required on ``data-*`` chunks, ``input`` and
``output`` on tools'. `check` holds a stream to those rules; the end-to-end
tests (`test_e2e_aisdk.py`) give real streams to the package itself."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from detached_runs.aisdk.protocol import UIMessageStream, encode
from detached_runs.events import Event

RUN = "0b8f5ea2-5a4e-4d3c-9d0b-1c2d3e4f5a6b"


def event(kind: str, data: Any) -> Event:
    return Event(id="x", event=kind, data=data)


def delta(text: str) -> Event:
    return event("delta", {"text": text})


def chunks_of(events: list[Event], pending: str | None = None) -> list[dict[str, Any]]:
    stream = UIMessageStream(RUN)
    out = stream.start()
    for item in events:
        out += stream.feed(item, pending=pending)
        if stream.paused:
            out += stream.pause()
            break
    return out


def check(chunks: list[dict[str, Any]]) -> None:
    """The rules the ``ai`` client holds a stream to (see the module)."""
    assert chunks[0]["type"] == "start" and chunks[-1]["type"] == "finish"
    text: set[str] = set()
    reasoning: set[str] = set()
    tools: set[str] = set()
    for chunk in chunks:
        kind = chunk["type"]
        if kind == "text-start":
            text.add(chunk["id"])
        elif kind in ("text-delta", "text-end"):
            assert chunk["id"] in text, chunk
            if kind == "text-end":
                text.remove(chunk["id"])
        elif kind == "reasoning-start":
            reasoning.add(chunk["id"])
        elif kind in ("reasoning-delta", "reasoning-end"):
            assert chunk["id"] in reasoning, chunk
            if kind == "reasoning-end":
                reasoning.remove(chunk["id"])
        elif kind == "tool-input-available":
            assert "input" in chunk and chunk["toolName"]
            tools.add(chunk["toolCallId"])
        elif kind in ("tool-output-available", "tool-output-denied", "tool-output-error"):
            assert chunk["toolCallId"] in tools, chunk
            assert kind != "tool-output-available" or "output" in chunk
        elif kind == "tool-approval-request":
            assert chunk["toolCallId"] in tools, chunk
        elif kind.startswith("data-"):
            assert "data" in chunk
        elif kind == "message-metadata":
            assert "messageMetadata" in chunk
        elif kind == "error":
            assert isinstance(chunk["errorText"], str)
        elif kind == "finish":
            assert not text and not reasoning, "parts left open"
        else:
            assert kind in ("start", "start-step", "finish-step"), chunk
        encode(chunk)  # strict JSON


def test_every_kind_of_event_maps():
    events = [
        event("start", {"run": RUN, "prompt": "p"}),
        delta("Hel"),
        delta("lo "),
        event("reasoning", {"text": "hmm"}),
        delta("world"),
        event("tool_call", {"id": "c1", "name": "weather", "arguments": '{"city": "Paris"}'}),
        event("tool_result", {"id": "c1", "name": "weather", "ok": True}),
        event("progress", {"percent": 5}),
        event("usage", {"input_tokens": 1}),
        event("finish", {"reason": "length"}),
        event("done", {"status": "done"}),
    ]
    assert chunks_of(events) == [
        {"type": "start", "messageId": RUN},
        {"type": "start-step"},
        {"type": "text-start", "id": "text-1"},
        {"type": "text-delta", "id": "text-1", "delta": "Hel"},
        {"type": "text-delta", "id": "text-1", "delta": "lo "},
        {"type": "text-end", "id": "text-1"},
        {"type": "reasoning-start", "id": "reasoning-2"},
        {"type": "reasoning-delta", "id": "reasoning-2", "delta": "hmm"},
        {"type": "reasoning-end", "id": "reasoning-2"},
        {"type": "text-start", "id": "text-3"},
        {"type": "text-delta", "id": "text-3", "delta": "world"},
        {"type": "text-end", "id": "text-3"},
        {
            "type": "tool-input-available",
            "toolCallId": "c1",
            "toolName": "weather",
            "input": {"city": "Paris"},
        },
        {"type": "tool-output-available", "toolCallId": "c1", "output": {"ok": True}},
        {"type": "data-progress", "data": {"percent": 5}},
        {"type": "message-metadata", "messageMetadata": {"usage": {"input_tokens": 1}}},
        {"type": "message-metadata", "messageMetadata": {"finish": {"reason": "length"}}},
        {"type": "finish-step"},
        {"type": "finish", "finishReason": "length", "messageMetadata": {"status": "done"}},
    ]


def test_a_tools_approval_is_asked_of_its_own_part_and_a_no_denies_it():
    question = {
        "request": "r1",
        "kind": "tool_approval",
        "tool": "pay",
        "arguments": {},
        "tool_call_id": "c1",
    }
    events = [
        event("tool_call", {"id": "c1", "name": "pay", "arguments": "{}"}),
        event("input_required", question),
        event("input_received", {"request": "r1"}),
        event("tool_result", {"id": "c1", "name": "pay", "ok": False, "declined": True}),
        event("done", {"status": "done"}),
    ]
    chunks = chunks_of(events)
    assert {"type": "tool-approval-request", "approvalId": "r1", "toolCallId": "c1"} in chunks
    assert {"type": "tool-output-denied", "toolCallId": "c1"} in chunks
    assert next(c for c in chunks if c["type"] == "tool-input-available")["toolName"] == "pay"
    check(chunks)


def test_a_pending_question_ends_the_response_for_the_client_to_answer():
    events = [delta("a"), event("input_required", {"request": "r1", "question": "?"})]
    chunks = chunks_of(events, pending="r1")
    assert chunks[-4:] == [
        {
            "type": "tool-input-available",
            "toolCallId": "r1",
            "toolName": "ask_user",
            "input": {"question": "?"},
        },
        {"type": "tool-approval-request", "approvalId": "r1", "toolCallId": "r1"},
        {"type": "finish-step"},
        {"type": "finish", "finishReason": "tool-calls"},
    ]
    check(chunks)


def test_a_question_that_timed_out_is_its_parts_error():
    events = [
        event("input_required", {"request": "r1", "question": "?"}),
        event("input_timeout", {"request": "r1"}),
        event("done", {"status": "error", "error": "No answer."}),
    ]
    chunks = chunks_of(events)
    assert {
        "type": "tool-output-error",
        "toolCallId": "r1",
        "errorText": "No answer came in time.",
    } in chunks
    assert chunks[-2:] == [
        {"type": "error", "errorText": "No answer."},
        {"type": "finish", "finishReason": "error", "messageMetadata": {"status": "error"}},
    ]
    check(chunks)


def test_odd_agent_events_are_data_parts_not_broken_tool_parts():
    events = [
        event("tool_call", {"name": "no id"}),
        event("tool_result", {"id": "never called"}),
        event("reasoning", {"not": "text"}),
        event("done", {"status": "stopped"}),
    ]
    chunks = chunks_of(events)
    assert [c["type"] for c in chunks[1:-2]] == [
        "data-tool_call",
        "data-tool_result",
        "data-reasoning",
    ]
    assert chunks[-1]["finishReason"] == "other"
    check(chunks)


texts = st.text(max_size=8)
requests = st.sampled_from(["r1", "r2", "r3"])
calls = st.sampled_from(["c1", "c2"])
events_strategy = st.lists(
    st.one_of(
        texts.map(delta),
        texts.map(lambda t: event("reasoning", {"text": t})),
        calls.map(lambda c: event("tool_call", {"id": c, "name": "t", "arguments": "{"})),
        st.tuples(calls, st.booleans()).map(
            lambda a: event("tool_result", {"id": a[0], "ok": True, "declined": a[1]})
        ),
        st.tuples(requests, st.one_of(st.none(), calls)).map(
            lambda a: event(
                "input_required", {"request": a[0], "kind": "tool_approval", "tool_call_id": a[1]}
            )
        ),
        requests.map(lambda r: event("input_received", {"request": r})),
        requests.map(lambda r: event("input_timeout", {"request": r})),
        st.just(event("usage", {"input_tokens": 1})),
        st.just(event("finish", {"reason": "length"})),
        st.just(event("custom", {"x": 1})),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(events_strategy, st.sampled_from(["done", "stopped", "error", "interrupted"]))
def test_any_run_is_a_stream_the_client_accepts(events, status):
    chunks = chunks_of([event("start", {"run": RUN}), *events, event("done", {"status": status})])
    check(chunks)


@settings(max_examples=200, deadline=None)
@given(events_strategy, requests)
def test_a_continuation_after_any_question_is_one_the_client_accepts(events, request):
    """A continuation (after the client's answer to ``request``) is `start`,
    then what follows the question: the client's message already has the
    parts before it, and every part the continuation opens it closes."""
    stream = UIMessageStream(RUN)
    out: list[dict[str, Any]] | None = None
    for item in [*events, event("input_required", {"request": request}), *events]:
        chunks = stream.feed(item)
        if out is not None:
            out += chunks
        elif item.event == "input_required" and item.data["request"] == request:
            out = stream.start() + stream.answered(request, "yes")
    assert out is not None
    out += stream.feed(event("done", {"status": "done"}))
    tools = [
        {"type": "tool-input-available", "toolCallId": c, "toolName": "t", "input": None}
        for c in ("c1", "c2", "r1", "r2", "r3")
    ]
    check([out[0], *tools, *out[1:]])  # the tool parts are in the client's message

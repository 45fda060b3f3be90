"""A run's events as the AI SDK's UI message stream (``ai`` 7).

The protocol is the one ``useChat`` from ``@ai-sdk/react`` reads: Server-Sent
Events whose ``data`` is one JSON *chunk* each (``{"type": "text-delta",
"id": ..., "delta": ...}``), then ``data: [DONE]``. Its source is the ``ai``
package, version 7.0 (``src/ui-message-stream/ui-message-chunks.ts``: the
chunk schema, ``uiMessageChunkSchema``; ``ui-message-stream-headers.ts``: the
headers); `docs/aisdk.md` says what maps to what.

`UIMessageStream` turns the events of one run, in their order, into chunks:
one assistant message per run, whose id is the run's id. It holds no
connection and does no I/O: `detached_runs.aisdk.views` feeds it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from ..events import (
    DELTA,
    DONE,
    INPUT_RECEIVED,
    INPUT_REQUIRED,
    INPUT_TIMEOUT,
    KEEPALIVE_SSE,
    START,
    USAGE,
    Event,
    dumps,
)
from ..text import clean_json

#: The response headers of a UI message stream (``UI_MESSAGE_STREAM_HEADERS``
#: of ``ai`` 7), besides its content type.
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Vercel-AI-UI-Message-Stream": "v1",
    "X-Accel-Buffering": "no",
}
CONTENT_TYPE = "text/event-stream"
__all__ = ["CONTENT_TYPE", "DONE_SSE", "HEADERS", "KEEPALIVE_SSE", "UIMessageStream", "encode"]
#: The stream's last line (``JsonToSseTransformStream.flush``).
DONE_SSE = b"data: [DONE]\n\n"

#: The tool name of a question that is not a tool call's approval
#: (``ctx.ask`` with data of the agent's own): the UI shows a part
#: ``tool-ask_user`` in the approval-requested state.
ASK_TOOL = "ask_user"

#: The error of a question's part whose answer is not in the stream: it was
#: answered by another request (another tab, or before a reload).
ANSWERED_ELSEWHERE = "Answered in another request: the answer is not shown here."
#: The error of a question's part still open at the run's end: not answered
#: before the run ended, or a tool approved that the run ended without running.
ENDED_FIRST = "The run ended before this was done."
#: The error of the part a late answer was for (the run's log no longer has
#: its question: the run ended).
NOT_WAITING = "The run no longer waits for this answer."
#: A run's end as the ``finish`` chunk's ``finishReason``.
FINISH_REASONS = {
    "done": "stop",
    "stopped": "other",
    "interrupted": "interrupted",
    "error": "error",
}
#: The ``finish`` event of an agent (the model's own reason) as ``finishReason``.
MODEL_FINISH = {"length": "length", "content_filter": "content-filter"}


def encode(chunk: dict[str, Any]) -> bytes:
    """One chunk as an SSE event: ``data: <compact JSON>`` and a blank line."""
    return f"data: {dumps(chunk)}\n\n".encode()


def encode_all(chunks: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(encode(chunk) for chunk in chunks)


class UIMessageStream:
    """The chunks of one run's assistant message (``message_id``: the run's
    id, ``str(Run.id)``), from the run's events in their order.

    `feed` takes the next event and returns its chunks; an ``input_required``
    whose question is still pending ``pauses`` the stream (`paused` is its
    request id): the client answers with a new request, after which the run's
    events go on in another response (`continuation`). ``done`` ends it:
    the parts still open are closed, then ``finish-step``, an ``error`` chunk
    if the run failed, ``finish``.
    """

    def __init__(self, message_id: str) -> None:
        self.message_id = message_id
        self._count = 0
        self._text: str | None = None  # id of the text part open
        self._reasoning: str | None = None
        self._finish_reason: str | None = None
        #: Tool calls the message shows, by id (a question about one needs it).
        self._tool_calls: set[str] = set()
        #: Questions asked, by request id: the tool call id each is shown as.
        self._questions: dict[str, tuple[str, bool]] = {}
        #: Tool calls whose part has its end (an output, a denial, an error):
        #: at the run's end the others a question was about get an error, so
        #: that no part is left ``approval-requested`` (buttons for a run that
        #: is over) or ``approval-responded`` (which ``useChat``'s
        #: ``sendAutomaticallyWhen`` sends again after every response).
        self._settled: set[str] = set()
        self.paused: str | None = None
        self.ended = False

    # -- the stream's edges -------------------------------------------------

    def start(self, metadata: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The ``start`` chunk (and, unless this is a continuation, the first step)."""
        chunk: dict[str, Any] = {"type": "start", "messageId": self.message_id}
        if metadata:
            chunk["messageMetadata"] = metadata
        return [chunk]

    def pause(self) -> list[dict[str, Any]]:
        """The end of a response while the run waits for an answer: the
        client's tool part is ``approval-requested``; ``finishReason``
        ``tool-calls`` lets ``sendAutomaticallyWhen`` send the answer."""
        return [
            *self._close(),
            {"type": "finish-step"},
            {"type": "finish", "finishReason": "tool-calls"},
        ]

    # -- one event ------------------------------------------------------------

    def feed(self, event: Event, *, pending: str | None = None) -> list[dict[str, Any]]:
        """The chunks of ``event``. ``pending``: the request id of the run's
        question still waiting for an answer, if any (an ``input_required``
        of it pauses the stream)."""
        kind, data = event.event, event.data
        if kind == DELTA:
            return self._delta(data.get("text", ""))
        if kind == START:
            return [{"type": "start-step"}]
        if kind == DONE:
            return self._done(data)
        if kind == "reasoning" and isinstance(data, dict) and isinstance(data.get("text"), str):
            return self._reasoning_delta(data["text"])
        chunks = self._close()
        if kind == "tool_call":
            chunks += self._tool_call(data)
        elif kind == "tool_result":
            chunks += self._tool_result(data)
        elif kind == INPUT_REQUIRED:
            chunks += self._question(data)
            if data.get("request") == pending:
                self.paused = pending
        elif kind == INPUT_RECEIVED:
            chunks += self._received(data)
        elif kind == INPUT_TIMEOUT:
            chunks += self._timed_out(data)
        elif kind == USAGE:
            chunks.append({"type": "message-metadata", "messageMetadata": {"usage": data}})
        elif kind == "finish":
            reason = data.get("reason") if isinstance(data, dict) else None
            self._finish_reason = MODEL_FINISH.get(str(reason), "other")
            chunks.append({"type": "message-metadata", "messageMetadata": {"finish": data}})
        else:
            # The agent's own events: data parts (``data-<event>``), in its order.
            chunks.append({"type": f"data-{kind}", "data": data})
        return chunks

    # -- parts -------------------------------------------------------------------

    def _id(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"

    def _delta(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        chunks = self._close_reasoning()
        if self._text is None:
            self._text = self._id("text-")
            chunks.append({"type": "text-start", "id": self._text})
        chunks.append({"type": "text-delta", "id": self._text, "delta": text})
        return chunks

    def _reasoning_delta(self, text: str) -> list[dict[str, Any]]:
        chunks = self._close_text()
        if self._reasoning is None:
            self._reasoning = self._id("reasoning-")
            chunks.append({"type": "reasoning-start", "id": self._reasoning})
        chunks.append({"type": "reasoning-delta", "id": self._reasoning, "delta": text})
        return chunks

    def _close_text(self) -> list[dict[str, Any]]:
        if self._text is None:
            return []
        part, self._text = self._text, None
        return [{"type": "text-end", "id": part}]

    def _close_reasoning(self) -> list[dict[str, Any]]:
        if self._reasoning is None:
            return []
        part, self._reasoning = self._reasoning, None
        return [{"type": "reasoning-end", "id": part}]

    def _close(self) -> list[dict[str, Any]]:
        return self._close_text() + self._close_reasoning()

    def _tool_call(self, data: Any) -> list[dict[str, Any]]:
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            return [{"type": "data-tool_call", "data": data}]
        arguments = data.get("arguments")
        if isinstance(arguments, str):
            try:
                # Cleaned as the log's data is: Python's parser takes NaN,
                # Infinity, 1e999 and escaped lone surrogates, which no
                # chunk can carry (strict JSON, UTF-8).
                arguments = clean_json(json.loads(arguments))
            except (ValueError, RecursionError):
                pass  # shown as the text the model wrote
        self._tool_calls.add(data["id"])
        self._settled.discard(data["id"])
        return [
            {
                "type": "tool-input-available",
                "toolCallId": data["id"],
                "toolName": str(data.get("name") or "tool"),
                "input": arguments,
            }
        ]

    def _tool_result(self, data: Any) -> list[dict[str, Any]]:
        if not isinstance(data, dict) or data.get("id") not in self._tool_calls:
            return [{"type": "data-tool_result", "data": data}]
        self._settled.add(data["id"])
        if data.get("declined"):
            return [{"type": "tool-output-denied", "toolCallId": data["id"]}]
        output = {key: value for key, value in data.items() if key not in ("id", "name")}
        return [{"type": "tool-output-available", "toolCallId": data["id"], "output": output}]

    def _question(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        request = str(data.get("request", ""))
        call = data.get("tool_call_id")
        chunks: list[dict[str, Any]] = []
        if data.get("kind") == "tool_approval" and call in self._tool_calls:
            self._questions[request] = (call, True)
        else:
            # A question of the agent's own: shown as a call of the tool
            # "ask_user" whose input is the question, waiting for approval.
            call = request
            self._questions[request] = (call, False)
            question = {key: value for key, value in data.items() if key != "request"}
            chunks.append(
                {
                    "type": "tool-input-available",
                    "toolCallId": call,
                    "toolName": ASK_TOOL,
                    "input": question,
                }
            )
        self._settled.discard(call)
        chunks.append({"type": "tool-approval-request", "approvalId": request, "toolCallId": call})
        return chunks

    def _received(self, data: Any) -> list[dict[str, Any]]:
        """A question of the agent's own answered: its value is the agent's
        (not in the log), so unless this response carried it (`answered`),
        the part says it was answered elsewhere. A tool's: its result follows."""
        asked = self._asked(data)
        if asked is None or asked[1] or asked[0] in self._settled:
            return []
        return self.resolve(asked[0], ANSWERED_ELSEWHERE)

    def resolve(self, call: str, text: str) -> list[dict[str, Any]]:
        """The end of tool part ``call`` as an error ``text``."""
        self._settled.add(call)
        return [{"type": "tool-output-error", "toolCallId": call, "errorText": text}]

    def _asked(self, data: Any) -> tuple[str, bool] | None:
        """The question an ``input_received`` or ``input_timeout`` event's
        data names: its tool call id, and whether it is a tool's approval."""
        return self._questions.get(str(data.get("request", ""))) if isinstance(data, dict) else None

    def _timed_out(self, data: Any) -> list[dict[str, Any]]:
        asked = self._asked(data)
        if asked is None or asked[1]:
            return []  # a tool's: its result (declined) follows
        return self.resolve(asked[0], "No answer came in time.")

    def answered(self, request: str, value: Any) -> list[dict[str, Any]]:
        """The chunks that show a question of the agent's own answered (its
        ``ask_user`` part's output), in the response that carries the answer."""
        asked = self._questions.get(request)
        if asked is None or asked[1]:
            return []
        self._settled.add(asked[0])
        return [{"type": "tool-output-available", "toolCallId": asked[0], "output": value}]

    def end(self, status: str) -> list[dict[str, Any]]:
        """The chunks of an end with ``status`` that is not in the events
        (the run was replaced, or its log is gone)."""
        return self._done({"status": status})

    def _done(self, data: Any) -> list[dict[str, Any]]:
        self.ended = True
        status = str(data.get("status", "done")) if isinstance(data, dict) else "done"
        chunks = self._close()
        for call, _ in dict.fromkeys(self._questions.values()):
            if call not in self._settled:
                chunks += self.resolve(call, ENDED_FIRST)
        chunks.append({"type": "finish-step"})
        if status == "error":
            chunks.append(
                {"type": "error", "errorText": str(data.get("error") or "The run failed.")}
            )
        reason = self._finish_reason if status == "done" and self._finish_reason else None
        chunks.append(
            {
                "type": "finish",
                "finishReason": reason or FINISH_REASONS.get(status, "other"),
                "messageMetadata": {"status": status},
            }
        )
        return chunks

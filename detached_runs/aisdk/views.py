"""The AI SDK's chat endpoints over the same runs (no run logic: `detached_runs.runs`).

``DefaultChatTransport`` (``ai`` 7, ``src/ui/http-chat-transport.ts``) sends
``POST <api>`` with ``{"id": <chat id>, "messages": [...], "trigger":
"submit-message" | "regenerate-message", "messageId"?: ...}`` and resumes
with ``GET <api>/<chat id>/stream``; both answers are UI message streams
(`detached_runs.aisdk.protocol`). The chat id is the session key. Errors
are JSON ``{"error": ...}`` with the statuses of the other views (the
transport shows the body as the chat's error message).
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    JsonResponse,
    StreamingHttpResponse,
)

from .. import runs
from ..backends.base import ACTIVE, Subscription
from ..conf import get_config
from ..db import run_sync
from ..events import DONE, INPUT_REQUIRED, START
from ..exceptions import BadPrompt, InputNotPending, InvalidInput, RunNotFound
from ..listing import MAX_LIMIT
from ..models import Run
from ..text import loads
from ..validation import validate_session_key
from ..views import Stream, _owner, api
from .protocol import (
    ASK_TOOL,
    CONTENT_TYPE,
    DONE_SSE,
    HEADERS,
    KEEPALIVE_SSE,
    NOT_WAITING,
    UIMessageStream,
    encode_all,
)


@api("POST")
async def chat(request: HttpRequest) -> HttpResponseBase:
    """``POST``: the last user message's text starts a run of the chat (its
    ``metadata`` may hold ``options`` and ``multitask``), streamed from its
    start; or, with ``messageId`` naming the chat's assistant message (a
    run), the answer to the run's question (a tool part approved, denied,
    or given an output) goes to the run and the rest of the run is
    streamed."""
    body = loads(request.body or b"null")
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        raise InvalidInput('Send the chat as JSON: {"id": ..., "messages": [...]}.')
    session_key = validate_session_key(body.get("id"))
    messages = [m for m in body["messages"] if isinstance(m, dict)]
    trigger = body.get("trigger", "submit-message")
    if trigger == "regenerate-message":
        raise InvalidInput("Regenerating an answer is not supported: send the prompt again.")
    if trigger != "submit-message":
        shown = trigger[:40] if isinstance(trigger, str) else type(trigger).__name__
        raise InvalidInput(
            f'Unknown trigger "{shown}": send "submit-message" (what useChat sends).'
        )
    message_id = body.get("messageId")
    if message_id is None:
        return await _start(request, session_key, messages)
    continued = next((m for m in messages if m.get("id") == message_id), None)
    if continued is None or continued.get("role") != "assistant":
        raise InvalidInput("Editing a sent message is not supported: send a new one.")
    return await _continue(request, session_key, continued)


async def _start(
    request: HttpRequest, session_key: str, messages: list[dict[str, Any]]
) -> HttpResponseBase:
    last = messages[-1] if messages else None
    if last is None or last.get("role") != "user":
        raise BadPrompt("The last message must be the user's.")
    prompt = "".join(
        part["text"]
        for part in _parts(last)
        if isinstance(part, dict)
        and part.get("type") == "text"
        and isinstance(part.get("text"), str)
    )
    metadata = last.get("metadata")
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict):
        raise InvalidInput("A message's metadata must be a JSON object.")
    owner = await _owner(request, create=True)
    run = await runs.start(
        session_key,
        prompt=prompt,
        owner=owner,
        options=metadata.get("options"),
        multitask=metadata.get("multitask"),
    )
    subscription = await runs.subscribe(session_key, owner=owner)
    return _response(_follow(subscription, UIMessageStream(str(run.id)), session_key, owner))


async def _continue(
    request: HttpRequest, session_key: str, message: dict[str, Any]
) -> HttpResponseBase:
    """The answer in ``message`` (the run's assistant message) to its
    newest question; then the run's events after that question."""
    answers: list[tuple[Any, Any, Any]] = []
    for part in _parts(message):
        if not isinstance(part, dict):
            continue
        if part.get("state") == "approval-responded" and isinstance(part.get("approval"), dict):
            answers.append(
                (part["approval"].get("id"), _approval(part["approval"]), part.get("toolCallId"))
            )
        elif part.get("state") == "output-available" and part.get("type") == f"tool-{ASK_TOOL}":
            # A question of the agent's own answered with addToolOutput.
            answers.append((part.get("toolCallId"), part.get("output"), part.get("toolCallId")))
    if not answers or not isinstance(answers[-1][0], str):
        raise InputNotPending("The message answers no question of the run.")
    request_id: str = answers[-1][0]
    value = answers[-1][1]
    call = answers[-1][2] if isinstance(answers[-1][2], str) else None
    owner = await _owner(request)
    latest = await runs.status(session_key, owner=owner)
    if latest is None or str(latest.id) != message.get("id"):
        raise InputNotPending("The message is not the chat's current answer.")
    pending = getattr(latest, "input_request", None) or {}
    taken = False
    if pending.get("request") == request_id:
        # Answered here; if another tab answered first, its answer stands
        # (and this one is not shown as the question's output).
        try:
            await runs.answer(session_key, {"request": request_id, "value": value}, owner=owner)
        except InputNotPending:
            pass
        else:
            taken = True
    stream = UIMessageStream(str(latest.id))
    subscription = await runs.subscribe(session_key, owner=owner)
    answer = _Answer(request_id, value, taken, call)
    return _response(_follow(subscription, stream, session_key, owner, after_question=answer))


@dataclass(frozen=True)
class _Answer:
    """The answer a continuation carries: to question ``request``, shown on
    the client's tool part ``call``; ``taken`` if the run took it (else
    another answer was, or the run no longer waited)."""

    request: str
    value: Any
    taken: bool
    call: str | None


def _parts(message: dict[str, Any]) -> list[Any]:
    """A message's ``parts``: a list (absent or null: none)."""
    parts = message.get("parts")
    if parts is None:
        return []
    if not isinstance(parts, list):
        raise InvalidInput("A message's parts must be a JSON array.")
    return parts


def _approval(approval: dict[str, Any]) -> dict[str, Any]:
    """An approval part's answer as the agent gets it: ``{"approved": bool}``
    and its ``reason`` if the user gave one."""
    value: dict[str, Any] = {"approved": approval.get("approved") is True}
    if isinstance(approval.get("reason"), str):
        value["reason"] = approval["reason"]
    return value


@api("GET")
async def stream(request: HttpRequest, session_key: str) -> HttpResponseBase:
    """The chat's run in flight as a UI message stream, from its start (the
    transport takes a resumed stream as a replay of the message), up to its
    pending question if it waits for one; ``204`` if no run is in flight
    (or the chat is not the requester's: nothing tells which)."""
    validate_session_key(session_key)
    owner = await _owner(request)
    latest = await runs.status(session_key, owner=owner)
    if latest is None or latest.status not in ACTIVE:
        return HttpResponse(status=204)
    subscription = await runs.subscribe(session_key, owner=owner)
    return _response(_follow(subscription, UIMessageStream(str(latest.id)), session_key, owner))


@api("GET")
async def messages(request: HttpRequest, session_key: str) -> HttpResponse:
    """The chat as ``useChat``'s ``messages``: ``{"messages": [...]}``, a user
    message and an assistant message (text; its id is the run's) per run,
    oldest first, the newest ``?limit=`` runs (at most `listing.MAX_LIMIT`);
    ``{"messages": []}`` for a chat that has none or is not the requester's."""
    validate_session_key(session_key)
    try:
        page = await runs.session_runs(
            session_key,
            owner=await _owner(request),
            limit=request.GET.get("limit") or MAX_LIMIT,
        )
    except RunNotFound:
        return JsonResponse({"messages": []})
    return JsonResponse({"messages": [m for run in page.runs for m in ui_messages(run)]})


def ui_messages(run: Run) -> list[dict[str, Any]]:
    """One run as a user message (id ``<run id>-prompt``) and an assistant
    message (id: the run's) whose text is its output so far; ``metadata``:
    the run's status, usage and options."""
    metadata: dict[str, Any] = {"status": run.status}
    if run.usage:
        metadata["usage"] = run.usage
    user: dict[str, Any] = {
        "id": f"{run.id}-prompt",
        "role": "user",
        "parts": [{"type": "text", "text": run.prompt}],
    }
    if run.options:
        user["metadata"] = {"options": run.options}
    answer = {
        "id": str(run.id),
        "role": "assistant",
        "parts": [{"type": "text", "text": run.output, "state": "done"}] if run.output else [],
        "metadata": metadata,
    }
    return [user, answer]


def _response(chunks: AsyncIterator[bytes]) -> StreamingHttpResponse:
    response = Stream(chunks, content_type=CONTENT_TYPE)
    for name, value in HEADERS.items():
        response[name] = value
    # Compression middleware leaves it alone (see `detached_runs.views.events`).
    response["Content-Encoding"] = ""
    return response


def _follow(
    subscription: Subscription,
    message: UIMessageStream,
    session_key: str,
    owner: str,
    *,
    after_question: _Answer | None = None,
) -> AsyncIterator[bytes]:
    chunks = _chunks(subscription, message, session_key, owner, after_question)
    # A client gone before Django iterates: release the subscriber all the same.
    weakref.finalize(chunks, subscription.close)
    return chunks


async def _chunks(
    subscription: Subscription,
    message: UIMessageStream,
    session_key: str,
    owner: str,
    after_question: _Answer | None,
) -> AsyncIterator[bytes]:
    """The run's chunks: all of them (``start`` first), or, continuing a
    message after a question, ``start`` and what follows that question.
    Ends at the run's end, or at a question still pending."""
    keepalive = float(get_config()["KEEPALIVE"]) or None
    emitting = after_question is None
    ended: str | None = None  # the run's status, once its end is read
    #: The id of the last event of a run this one waits behind (queued with
    #: ``multitask: "enqueue"``), once one is skipped: then the queue's
    #: next run is followed after that run's end.
    behind: str | None = None
    started = False  # this run's own start is read
    try:
        yield encode_all(message.start()) if emitting else b""
        while True:
            async for batch in subscription.batches(keepalive):
                if not batch:
                    yield KEEPALIVE_SSE
                    continue
                out: list[dict[str, Any]] = []
                for event in batch:
                    if behind is not None:
                        behind = event.id  # the run in front of this one
                        continue
                    if event.event == START and event.data.get("run") != message.message_id:
                        if await _row_status(message.message_id) in (Run.Status.QUEUED, *ACTIVE):
                            # A run in front of this one (it is queued, or
                            # just claimed from the queue): skip it.
                            behind = event.id
                            continue
                        # The chat's run is another now (a newer send replaced it).
                        ended = "stopped"
                        if emitting:
                            out += message.end(ended)
                        break
                    started = started or event.event == START
                    if event.event == DONE:
                        ended = str(event.data.get("status", "done"))
                    pending = None
                    if event.event == INPUT_REQUIRED:
                        pending = await _pending(session_key, owner)
                    chunks = message.feed(event, pending=pending)
                    if emitting:
                        out += chunks
                    elif (
                        event.event == INPUT_REQUIRED
                        and after_question is not None
                        and event.data.get("request") == after_question.request
                    ):
                        emitting = True
                        out += message.start()
                        if after_question.taken:
                            request = after_question.request
                            out += message.answered(request, after_question.value)
                    elif message.paused:
                        # The run waits for a question before which the
                        # answer's is not: it answers no question of the run
                        # (a forged id). Its part ends; nothing else changes.
                        emitting = True
                        out += message.start()
                        if after_question is not None and after_question.call is not None:
                            out += message.resolve(after_question.call, NOT_WAITING)
                    if message.paused or ended:
                        break
                if message.paused and not ended:
                    out += message.pause()
                if out:
                    yield encode_all(out)
                if message.paused or ended:
                    break
            if behind is None or message.paused or ended:
                break
            # The run in front ended: follow the queue (its next run, this
            # one or another in front of it).
            subscription = await runs.subscribe(session_key, after=behind, owner=owner)
            behind = None
        if emitting and not started and not ended:
            # Still queued when the queue's wait gave up: its status says so.
            yield encode_all(message.end(await _row_status(message.message_id) or "stopped"))
        if not emitting:
            # The question is not in what the run's log holds now (it ended,
            # and only its text is kept): its end, no more.
            ending = UIMessageStream(message.message_id)
            out = ending.start()
            if after_question is not None and after_question.call is not None:
                # Its part must not stay answered, waiting: the client would
                # send it again (sendAutomaticallyWhen), for ever.
                out += ending.resolve(after_question.call, NOT_WAITING)
            yield encode_all([*out, *ending.end(ended or "stopped")])
        yield DONE_SSE
    finally:
        await subscription.aclose()


async def _row_status(run_id: str) -> str | None:
    """Run ``run_id``'s status in its row (None: deleted). Queued or in flight
    while another run's events come: that run is in front of it in the
    queue; ended: a newer send replaced it (stopped, or cancelled queued)."""
    statuses = Run.objects.filter(pk=run_id).values_list("status", flat=True)
    return await run_sync(statuses.first)


async def _pending(session_key: str, owner: str) -> str | None:
    """The request id of the question the chat's run waits for, if any."""
    latest = await runs.status(session_key, owner=owner)
    request = getattr(latest, "input_request", None) or {}
    return request.get("request")

"""A fake OpenAI-compatible endpoint for the tests: a real HTTP server on
127.0.0.1 (in the test's event loop) that answers ``POST /v1/chat/completions``
with scripted ``chat.completion.chunk`` objects as Server-Sent Events, records
what it was sent, and notices when a client hangs up mid-stream. `Reply.ending`
scripts how the answer ends, the orderly way or any of the ways a stream is
cut short. A reply may be a function of the request (`Answer`): the model's
next turn after a tool's result can then quote what the agent sent back."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

#: How the fake ends an answer (`Reply.ending`):
#:
#: - ``"done"``: ``data: [DONE]``, then the end of the chunked body (the usual end);
#: - ``"eof"``: the end of the chunked body without ``[DONE]``: a clean close;
#: - ``"truncate"``: close the connection inside the chunked body (no last chunk);
#: - ``"reset"``: a TCP reset after the events;
#: - ``"hold"``: send nothing more, until the client hangs up (a stall, or a stop);
#: - ``"drop"``: close the connection without a byte of an answer (no status line);
#: - ``"silent"``: send not a byte, until the client hangs up (it times out).
Ending = Literal["done", "eof", "truncate", "reset", "hold", "drop", "silent"]


def chunk(finish_reason: str | None = None, **delta: Any) -> dict[str, Any]:
    """One ``chat.completion.chunk`` whose first choice carries ``delta``."""
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "fake-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }


def usage_chunk(prompt_tokens: int, completion_tokens: int, **extra: Any) -> dict[str, Any]:
    """The last chunk an endpoint sends when asked for usage in the stream
    (``stream_options={"include_usage": true}``): no choices, the usage."""
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "fake-model-2024",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            **extra,
        },
    }


def text_chunks(*pieces: str) -> list[dict[str, Any]]:
    """A whole answer as the usual stream: the role, the pieces, the finish."""
    return [
        chunk(role="assistant", content=""),
        *(chunk(content=piece) for piece in pieces),
        chunk(finish_reason="stop"),
    ]


def tool_call_chunks(
    *calls: tuple[str, str, Sequence[str]], content: str | None = None
) -> list[dict[str, Any]]:
    """An answer that calls tools, streamed as servers stream it: each call
    ``(id, name, pieces)`` opens with its id and name, then its arguments'
    JSON arrives in ``pieces`` (one chunk each), then ``finish_reason``
    ``tool_calls``. ``content``: text the model writes before its calls."""
    events = [chunk(role="assistant", content=content)]
    for index, (call_id, name, pieces) in enumerate(calls):
        opening = {"id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        events.append(chunk(tool_calls=[{"index": index, **opening}]))
        events += [
            chunk(tool_calls=[{"index": index, "function": {"arguments": piece}}])
            for piece in pieces
        ]
    events.append(chunk(finish_reason="tool_calls"))
    return events


@dataclass
class Reply:
    """What the fake answers one request with."""

    #: Payloads sent as ``data:`` lines, in order (see `chunk`).
    events: list[dict[str, Any]] = field(default_factory=list)
    #: Not 200: answer with this status and `error` as a JSON body instead.
    status: int = 200
    error: dict[str, Any] | None = None
    #: How the answer ends (see `Ending`).
    ending: Ending = "done"


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: Any

    def tool_messages(self) -> list[dict[str, Any]]:
        """The ``tool`` messages (tools' results) the request carries."""
        return [m for m in self.body["messages"] if m["role"] == "tool"]


#: A reply computed from the request it answers.
Answer: TypeAlias = Callable[[Request], Reply]


class FakeOpenAI:
    """``async with FakeOpenAI() as fake``; queue replies in ``fake.replies``
    (a `Reply`, or an `Answer` to compute one from the request)."""

    def __init__(self) -> None:
        self.replies: list[Reply | Answer] = []
        self.requests: list[Request] = []
        #: Set when a client hung up on a held stream.
        self.disconnected = asyncio.Event()
        self.open_connections = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def __aenter__(self) -> FakeOpenAI:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        self.open_connections += 1
        try:
            await self._answer(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: nothing to answer
        finally:
            self.open_connections -= 1
            self._writers.discard(writer)
            self._handlers.discard(task)
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        request_line, *header_lines = head.split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in header_lines if line)
        }
        raw = await reader.readexactly(int(headers.get("content-length", "0")))
        request = Request(method, path, headers, json.loads(raw) if raw else None)
        self.requests.append(request)

        if (method, path) != ("POST", "/v1/chat/completions"):
            reply = Reply(status=404, error={"message": f"No route {path}", "type": "not_found"})
        else:
            scripted = self.replies.pop(0) if self.replies else Reply(text_chunks("Hello"))
            reply = scripted if isinstance(scripted, Reply) else scripted(request)
        if reply.ending == "drop":
            return  # _handle closes the connection
        if reply.ending == "silent":
            await self._until_hung_up(reader)
            return
        if reply.status != 200:
            body = json.dumps({"error": reply.error or {"message": "failed"}}).encode()
            writer.write(
                f"HTTP/1.1 {reply.status} Error\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            return

        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        for payload in reply.events:
            _write_chunk(writer, f"data: {json.dumps(payload)}\n\n".encode())
            await writer.drain()
        if reply.ending == "hold":
            await self._until_hung_up(reader)
        elif reply.ending == "truncate":
            writer.write(b"2a\r\ndata: {")  # a chunk cut short, and no last chunk
            await writer.drain()
        elif reply.ending == "reset":
            # Let the client read what was sent (it runs in this event loop), then
            # close with SO_LINGER 0: the kernel sends RST instead of FIN.
            await asyncio.sleep(0.05)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            if reply.ending == "done":
                _write_chunk(writer, b"data: [DONE]\n\n")
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    async def _until_hung_up(self, reader: asyncio.StreamReader) -> None:
        """Send nothing more; the client's only move is to hang up (EOF)."""
        while await reader.read(1024):
            pass
        self.disconnected.set()


def _write_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

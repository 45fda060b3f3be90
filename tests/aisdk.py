"""The AI SDK's own client code, for the tests of `detached_runs.aisdk`:
``frontend/parse-ui-stream.mjs`` reads a UI message stream with the ``ai``
package's parser and message reader (the pipeline of
``DefaultChatTransport``), installed by ``npm ci --prefix frontend``."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .http import Browser

FRONTEND = Path(__file__).resolve().parent.parent / "frontend"
PARSER = FRONTEND / "parse-ui-stream.mjs"


def require_node() -> None:
    """Skip unless node and the frontend's packages are installed; fail
    instead under ``DETACHED_RUNS_REQUIRE_NODE=1`` (CI installs them)."""
    missing = None
    if shutil.which("node") is None:
        missing = "node is not installed"
    elif not (FRONTEND / "node_modules" / "ai").is_dir():
        missing = "the frontend's packages are not installed (npm ci --prefix frontend)"
    if missing is None:
        return
    if os.environ.get("DETACHED_RUNS_REQUIRE_NODE") == "1":
        pytest.fail(missing)
    pytest.skip(missing)


@dataclass
class Parsed:
    """What the ``ai`` package made of a stream: its exit code (0 valid, 1
    a chunk its schema refuses, 2 a chunk its message reader refuses), the
    chunks it validated, the message it assembled, the ``error`` chunks'
    texts and its complaint."""

    code: int
    chunks: list[dict[str, Any]]
    message: dict[str, Any] | None
    errors: list[str]
    stderr: str

    @property
    def types(self) -> list[str]:
        return [chunk["type"] for chunk in self.chunks]

    def text(self) -> str:
        return "".join(
            part["text"] for part in (self.message or {}).get("parts", ()) if part["type"] == "text"
        )


def parse(body: bytes, message: dict[str, Any] | None = None) -> Parsed:
    """``body`` (a response's bytes) read by the ``ai`` package, from
    ``message`` (the assistant message a continuation adds to) or nothing."""
    command = ["node", str(PARSER)]
    with tempfile.NamedTemporaryFile("w", suffix=".json") as seed:
        if message is not None:
            json.dump(message, seed)
            seed.flush()
            command += ["--message", seed.name]
        done = subprocess.run(command, input=body, capture_output=True, timeout=60, check=False)
    lines = [json.loads(line) for line in done.stdout.decode().splitlines() if line.strip()]
    return Parsed(
        done.returncode,
        [line["chunk"] for line in lines if line["kind"] == "chunk"],
        next((line["message"] for line in lines if line["kind"] == "message"), None),
        [line["errorText"] for line in lines if line["kind"] == "error-chunk"],
        done.stderr.decode(),
    )


class ChatStream:
    """A response of the chat endpoints read as it comes: its SSE ``data``
    lines, ``[DONE]`` included; `close` drops the connection (a tab closed,
    ``stop()`` in the UI)."""

    def __init__(self, browser: Browser, method: str, path: str, body: Any = None) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", browser.port, timeout=10)
        headers = browser._headers({"X-CSRFToken": browser.csrf})
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        self.connection.request(method, path, body=payload, headers=headers)
        self.response = self.connection.getresponse()
        browser._remember(self.response)
        self.status = self.response.status
        self.headers = {k.lower(): v for k, v in self.response.headers.items()}
        self.raw = b""

    def chunks(self, count: int | None = None) -> list[dict[str, Any]]:
        """The next ``count`` chunks (all, if None: up to the end)."""
        out: list[dict[str, Any]] = []
        while count is None or len(out) < count:
            line = self.response.readline()
            if not line:
                break
            self.raw += line
            if line.startswith(b"data: {"):
                out.append(json.loads(line[6:]))
        return out

    def rest(self) -> bytes:
        """Everything up to the end, with what was read before."""
        self.raw += self.response.read()
        return self.raw

    def close(self) -> None:
        if self.connection.sock is not None:
            self.connection.sock.close()
        self.connection.close()


def user_message(text: str, **metadata: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "id": f"user-{abs(hash(text)) % 10**8}",
        "role": "user",
        "parts": [{"type": "text", "text": text}],
    }
    if metadata:
        message["metadata"] = metadata
    return message


def new_chat() -> str:
    """A chat id (a session key) of the AI SDK's shape: 16 characters."""
    return uuid.uuid4().hex[:16]


def send(browser: Browser, chat: str, text: str, **metadata: Any) -> ChatStream:
    """``sendMessage({text, metadata})`` of ``useChat``: the chat's POST."""
    body = {"id": chat, "messages": [user_message(text, **metadata)], "trigger": "submit-message"}
    return ChatStream(browser, "POST", "/api/chat", body)

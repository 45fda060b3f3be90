"""A small HTTP/SSE client for the end-to-end tests: the standard library's
http.client over a real socket, with cookies and CSRF like a browser's."""

from __future__ import annotations

import http.client
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import Any


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class SSE:
    id: str | None
    event: str
    data: Any


@dataclass
class Browser:
    """One client: its own cookies (so its own Django session, its own owner)."""

    port: int
    cookies: dict[str, str] = field(default_factory=dict)
    #: The server's address (another host's, in `tests.hosts`).
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        self.csrf = secrets.token_hex(16)  # 32 characters: a valid unmasked secret
        self.cookies["csrftoken"] = self.csrf

    def _headers(self, extra: dict[str, str] | None) -> dict[str, str]:
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}
        headers.update(extra or {})
        return headers

    def _remember(self, response: http.client.HTTPResponse) -> None:
        for value in response.headers.get_all("Set-Cookie") or []:
            for name, morsel in SimpleCookie(value).items():
                self.cookies[name] = morsel.value

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        csrf: bool = True,
    ) -> Reply:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
        extra = dict(headers or {})
        payload: bytes | None = None
        if body is not None:
            payload = body if isinstance(body, bytes) else json.dumps(body).encode()
            extra.setdefault("Content-Type", "application/json")
        if csrf and method not in ("GET", "HEAD", "OPTIONS"):
            extra.setdefault("X-CSRFToken", self.csrf)
        try:
            connection.request(method, path, body=payload, headers=self._headers(extra))
            response = connection.getresponse()
            self._remember(response)
            return Reply(response.status, dict(response.headers), response.read())
        finally:
            connection.close()

    def stream(self, path: str, headers: dict[str, str] | None = None) -> Stream:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
        connection.request("GET", path, headers=self._headers(headers))
        response = connection.getresponse()
        self._remember(response)
        return Stream(connection, response)


class Stream:
    """An open SSE response, read event by event; `close` drops the connection."""

    def __init__(
        self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse
    ) -> None:
        self.connection = connection
        self.response = response
        self.status = response.status
        self.headers = dict(response.headers)
        self.comments: list[str] = []

    def events(self) -> Iterator[SSE]:
        fields: dict[str, str] = {}
        while True:
            raw = self.response.readline()
            if not raw:
                return
            line = raw.decode().rstrip("\n")
            if line == "":
                if fields:
                    yield SSE(
                        fields.get("id"),
                        fields.get("event", "message"),
                        json.loads(fields.get("data", "null")),
                    )
                fields = {}
            elif line.startswith(":"):
                self.comments.append(line)
            else:
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")

    def take(self, count: int) -> list[SSE]:
        out = []
        for event in self.events():
            out.append(event)
            if len(out) == count:
                break
        return out

    def rest(self) -> list[SSE]:
        return list(self.events())

    def close(self) -> None:
        self.connection.sock and self.connection.sock.close()
        self.connection.close()


def text(events: list[SSE]) -> str:
    return "".join(e.data["text"] for e in events if e.event == "delta")

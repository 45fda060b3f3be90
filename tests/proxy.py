"""A reverse proxy for fault tests: standard library only, asyncio in a thread
of the test process, in front of a real server.

It forwards each TCP connection as it is (bytes piped both ways), so HTTP,
keep-alive, streamed SSE responses and WebSocket upgrades all pass unchanged.
At any time it can be switched to answer every new connection itself, as a
proxy does while the server behind it restarts (``HTTP/1.1 503 Service
Unavailable``, 502, 429 with a Retry-After...), or to close new connections
without a word; and it can cut the connections open now.

    proxy = Proxy(upstream=server.port)
    proxy.answer(503)      # new connections get a 503
    proxy.cut()            # the open ones are cut mid-stream
    proxy.forward()        # back to normal
    proxy.close()

The mode is chosen when a connection's first bytes arrive, not when it is
accepted: a browser opens spare connections ahead of time, and one opened
during an outage but used after it must reach the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from http import HTTPStatus
from typing import Any, TypeVar

T = TypeVar("T")

#: How the proxy treats a new connection: ("forward",), ("drop",) or ("answer", head).
Mode = tuple[str, bytes]

FORWARD: Mode = ("forward", b"")
DROP: Mode = ("drop", b"")


class Proxy:
    def __init__(
        self,
        upstream: int,
        host: str = "127.0.0.1",
        *,
        server_first: bool = False,
        upstream_host: str | None = None,
    ) -> None:
        """``upstream``: the server's port, at ``upstream_host`` (default:
        ``host``, where the proxy listens)."""
        self.upstream = upstream
        self.host = host
        self.upstream_host = upstream_host or host
        #: The server speaks first (MySQL's greeting): the mode is chosen when a
        #: connection is accepted, since its client sends nothing before.
        self.server_first = server_first
        self._mode: Mode = FORWARD
        #: Every stream writer open now, both sides of forwarded connections.
        self._open: set[asyncio.StreamWriter] = set()
        #: Request lines answered or dropped by the proxy itself, in order.
        self.refused: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._handle, host, 0))
        self.port: int = self._server.sockets[0].getsockname()[1]

    # -- switching, from the test's thread --------------------------------------

    def forward(self) -> None:
        """Forward new connections to the server again."""
        self._mode = FORWARD

    def answer(self, status: int, headers: dict[str, str] | None = None) -> None:
        """Answer every new connection with ``status`` and close it."""
        phrase = HTTPStatus(status).phrase
        body = f"{status} {phrase}\n".encode()
        lines = [
            f"HTTP/1.1 {status} {phrase}",
            "Content-Type: text/plain",
            f"Content-Length: {len(body)}",
            "Connection: close",
            *(f"{name}: {value}" for name, value in (headers or {}).items()),
        ]
        self._mode = ("answer", "\r\n".join(lines).encode() + b"\r\n\r\n" + body)

    def drop(self) -> None:
        """Close every new connection without an answer."""
        self._mode = DROP

    def cut(self) -> None:
        """Cut the connections open now (both sides), as a restart does."""

        async def cut() -> None:
            for writer in list(self._open):
                writer.transport.abort()

        self._call(cut())

    def close(self) -> None:
        async def close() -> None:
            self._server.close()
            for writer in list(self._open):
                writer.transport.abort()
            await self._server.wait_closed()

        self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    # -- per connection, in the proxy's thread ----------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            first = b"" if self.server_first else await reader.read(65536)
            if not first and not self.server_first:
                return
            kind, head = self._mode
            if kind == "forward":
                await self._forward(first, reader, writer)
                return
            self.refused.append(first.split(b"\r\n", 1)[0].decode("latin-1"))
            if kind == "answer":
                await self._read_request(first, reader)
                writer.write(head)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._open.discard(writer)
            writer.close()

    async def _read_request(self, first: bytes, reader: asyncio.StreamReader) -> None:
        """Read the whole request, so that closing after the answer does not reset
        the connection under a browser that still sends (it would lose the answer)."""
        data = first
        while b"\r\n\r\n" not in data:
            more = await reader.read(65536)
            if not more:
                return
            data += more
        head, _, body = data.partition(b"\r\n\r\n")
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                missing = int(value) - len(body)
                if missing > 0:
                    await reader.readexactly(missing)

    async def _forward(
        self, first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            self.upstream_host, self.upstream
        )
        self._open.add(upstream_writer)
        try:
            if first:
                upstream_writer.write(first)
                await upstream_writer.drain()
            await asyncio.gather(
                self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer)
            )
        finally:
            self._open.discard(upstream_writer)
            upstream_writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy until either side ends; then end the other side too."""
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

"""End to end over a real daphne process with a real WebSocket client."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
import websockets
from websockets.typing import Origin

from .http import Browser

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def cookie_header(browser: Browser) -> str:
    return "; ".join(f"{k}={v}" for k, v in browser.cookies.items())


async def until_done(socket: Any) -> list[dict[str, Any]]:
    frames = []
    while True:
        frame = json.loads(await asyncio.wait_for(socket.recv(), 10))
        frames.append(frame)
        if frame.get("event") == "done":
            return frames


def text(frames: list[dict[str, Any]]) -> str:
    return "".join(f["data"]["text"] for f in frames if f["event"] == "delta")


async def start_run(server: Any, prompt: str) -> tuple[Browser, str, str, dict[str, str], Origin]:
    """Start a run as a browser: it, the session key, the socket's URL, and the
    headers and origin that browser connects with."""
    key = uuid.uuid4().hex[:12]
    browser = Browser(server.port)
    await asyncio.to_thread(browser.request, "POST", f"/runs/{key}/", {"prompt": prompt})
    url = f"ws://127.0.0.1:{server.port}/ws/runs/{key}/"
    headers = {"Cookie": cookie_header(browser)}
    return browser, key, url, headers, Origin(f"http://127.0.0.1:{server.port}")


async def test_follow_stop_and_resume_over_a_real_websocket(server):
    _browser, _key, url, headers, origin = await start_run(server, "40")

    async with websockets.connect(url, additional_headers=headers, origin=origin) as socket:
        first = [json.loads(await socket.recv()) for _ in range(6)]
    assert first[0]["event"] == "start"

    # Reconnect from the last id seen: exactly the rest, then the socket stays for more.
    async with websockets.connect(
        f"{url}?after={first[-1]['id']}", additional_headers=headers, origin=origin
    ) as socket:
        rest = await until_done(socket)
        assert text(first) + text(rest) == "".join(f"w{i} " for i in range(40))
        await socket.send(json.dumps({"type": "start", "prompt": "500"}))
        started = json.loads(await socket.recv())
        assert started["event"] == "start" and started["data"]["prompt"] == "500"
        await socket.send(json.dumps({"type": "stop"}))
        stopped = await until_done(socket)
        assert stopped[-1]["data"] == {"status": "stopped"}
        await socket.send("garbage")
        assert json.loads(await socket.recv())["event"] == "error"


async def test_a_stranger_is_closed_with_4404(server):
    _owner, _key, url, _headers, origin = await start_run(server, "5")
    async with websockets.connect(url, origin=origin) as socket:  # without the owner's cookie
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(socket.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404


async def test_a_browser_that_drops_its_socket_mid_answer_is_a_quiet_normal_end(server):
    browser, key, url, headers, origin = await start_run(server, "60")
    for _ in range(20):
        socket = await websockets.connect(url, additional_headers=headers, origin=origin)
        await socket.recv()
        socket.transport.abort()  # gone mid-answer, no closing handshake
    events = await asyncio.to_thread(lambda: browser.stream(f"/runs/{key}/events/").rest())
    assert events[-1].data == {"status": "done"}  # the run went on
    log = server.output()
    assert "Traceback" not in log and "Forwarding session" not in log

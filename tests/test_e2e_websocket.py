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


@pytest.mark.parametrize(
    "frame",
    [
        "[" * 100_000 + "]" * 100_000,  # deeper than Python's parser goes
        '{"type": "start", "prompt": NaN}',  # Python's json takes it; JSON does not
    ],
    ids=["nested", "nan"],
)
async def test_a_frame_that_is_not_json_gets_an_error_frame_and_the_socket_stays(server, frame):
    _browser, _key, url, headers, origin = await start_run(server, "3")
    async with websockets.connect(
        url, additional_headers=headers, origin=origin, max_size=None
    ) as socket:
        await until_done(socket)
        await socket.send(frame)
        reply = json.loads(await asyncio.wait_for(socket.recv(), 10))
        assert reply == {
            "event": "error",
            "data": {"error": "The frame is not valid JSON.", "status": 400},
        }
        await socket.send(json.dumps({"type": "start", "prompt": "2"}))
        assert text(await until_done(socket)) == "w0 w1 "


async def test_a_start_frame_with_a_lone_surrogate_in_its_prompt_starts_the_cleaned_prompt(
    server,
):
    _browser, _key, url, headers, origin = await start_run(server, "1")
    async with websockets.connect(url, additional_headers=headers, origin=origin) as socket:
        await until_done(socket)
        # The JSON escape of a lone surrogate: valid JSON, which JSON.stringify writes.
        await socket.send('{"type": "start", "prompt": "4 \\ud83d and \\u0000"}')
        frames = await until_done(socket)
        assert frames[0]["event"] == "start"
        assert frames[0]["data"]["prompt"] == "4 \ufffd and \ufffd"
        assert text(frames) == "w0 w1 w2 w3 "
        await socket.send("{")  # still open, still answering
        assert json.loads(await asyncio.wait_for(socket.recv(), 10))["event"] == "error"


async def test_a_socket_to_a_new_session_starts_it_with_a_start_frame(server):
    """A WebSocket-only client (a Channels chat that never uses HTTP)."""
    browser, _key, _url, _headers, _origin = await start_run(server, "1")  # a session cookie
    key = uuid.uuid4().hex[:12]
    url = f"ws://127.0.0.1:{server.port}/ws/runs/{key}/"
    origin = Origin(f"http://127.0.0.1:{server.port}")
    headers = {"Cookie": cookie_header(browser)}
    async with websockets.connect(url, additional_headers=headers, origin=origin) as socket:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(socket.recv(), 0.3)  # idle, open
        await socket.send(json.dumps({"type": "start", "prompt": "3"}))
        assert text(await until_done(socket)) == "w0 w1 w2 "
    async with websockets.connect(url, origin=origin) as stranger:  # no cookie: not the owner
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(stranger.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404


async def test_a_start_frame_without_a_session_cookie_is_refused_and_starts_nothing(server):
    """A socket cannot set a cookie: an anonymous id made for it would be lost,
    and the placeholder owner of visitors without one is shared by all."""
    key = uuid.uuid4().hex[:12]
    url = f"ws://127.0.0.1:{server.port}/ws/runs/{key}/"
    origin = Origin(f"http://127.0.0.1:{server.port}")
    async with websockets.connect(url, origin=origin) as socket:
        await socket.send(json.dumps({"type": "start", "prompt": "3"}))
        reply = json.loads(await asyncio.wait_for(socket.recv(), 10))
        assert reply["event"] == "error" and "session cookie" in reply["data"]["error"]
    assert Browser(server.port).request("GET", f"/runs/{key}/").status == 404

"""The demo site, served by a real daphne process: the page, a streamed answer, reload."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import start_server, stop_server
from .http import Browser, text

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def demo(tmp_path_factory: Any) -> Any:
    database = tmp_path_factory.mktemp("demo") / "demo.sqlite3"
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="demo_project.settings",
        DEMO_SQLITE=str(database),
        DEMO_AGENT_DELAY="0.005",
    )
    env.pop("DATABASE_URL", None)
    for name in ("OPENAI_MODEL", "OPENAI_BASE_URL", "OPENAI_API_KEY"):
        env.pop(name, None)  # the canned offline agent, whatever this machine names
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"],
        env=env,
        cwd=root,
        check=True,
        capture_output=True,
    )
    server = start_server(env, app="demo_project.asgi:application")
    yield server
    stop_server(server)


def test_the_chat_page_loads_and_sets_the_csrf_cookie(demo):
    browser = Browser(demo.port)
    browser.cookies.clear()
    page = browser.request("GET", "/")
    assert page.status == 200
    assert b"detached-runs.js" in page.body and b"WebSocket" in page.body
    assert b'id="stop"' in page.body
    assert "csrftoken" in browser.cookies


def test_an_anonymous_client_starts_a_run_with_the_pages_csrf_cookie_and_no_origin(demo):
    """docs/http.md: the demo's `GET /` gives the csrftoken cookie, and over
    plain HTTP no Origin header is needed."""
    browser = Browser(demo.port)
    browser.cookies.clear()
    assert browser.request("GET", "/").status == 200
    token = browser.cookies["csrftoken"]
    reply = browser.request(
        "POST", "/runs/csrf1/", {"prompt": "Hi"}, headers={"X-CSRFToken": token}, csrf=False
    )
    assert reply.status == 202, reply.body


def test_the_demo_agent_streams_an_answer_that_survives_a_reload(demo):
    browser = Browser(demo.port)
    reply = browser.request("POST", "/runs/demo1/", {"prompt": "What is this?"})
    assert reply.status == 202
    first = browser.stream("/runs/demo1/events/")
    seen = first.take(12)
    first.close()  # the page is reloaded mid-answer
    rest = browser.stream("/runs/demo1/events/", {"Last-Event-ID": seen[-1].id or ""}).rest()
    assert rest[-1].data == {"status": "done"}
    answer = text(seen) + text(rest)
    assert answer.startswith("You asked: “What is this?”.")
    assert [e.event for e in seen[:2]] == ["start", "status"]
    turns = browser.request("GET", "/runs/demo1/runs/").json()["runs"]
    assert [t["output"] for t in turns] == [answer]
    assert Browser(demo.port).request("GET", "/runs/demo1/runs/").status == 404
    listed = browser.request("GET", "/runs/").json()["sessions"]
    assert [(s["session"], s["title"]) for s in listed] == [("demo1", "What is this?")]


def test_the_demo_agent_reports_its_words_as_estimated_usage(demo):
    """So that a new user sees usage in the run objects and the admin: input
    and output tokens counted as words, marked estimated, no cost."""
    browser = Browser(demo.port)
    assert browser.request("POST", "/runs/usage1/", {"prompt": "Count  my words"}).status == 202
    events = browser.stream("/runs/usage1/events/").rest()
    words = len(text(events).split())
    reports = [e.data for e in events if e.event == "usage"]
    expected = {"input_tokens": 3, "output_tokens": words, "estimated": True}
    assert reports == [{**expected, "total_tokens": 3 + words}]
    run = browser.request("GET", "/runs/usage1/").json()["run"]
    assert run["status"] == "done" and run["usage"] == reports[0]


def test_a_stopped_demo_run_reports_the_words_it_wrote(demo):
    browser = Browser(demo.port)
    assert browser.request("POST", "/runs/usage2/", {"prompt": "Stop me"}).status == 202
    stream = browser.stream("/runs/usage2/events/")
    stream.take(6)
    assert browser.request("POST", "/runs/usage2/stop/").json() == {"stopped": True}
    stream.rest()
    run = browser.request("GET", "/runs/usage2/").json()["run"]
    assert run["status"] == "stopped"
    assert run["usage"]["output_tokens"] == len(run["output"].split()) > 0
    assert run["usage"]["input_tokens"] == 2 and run["usage"]["estimated"] is True


async def test_the_demo_mounts_the_websocket_route(demo):
    import asyncio
    import json

    import websockets
    from websockets.typing import Origin

    browser = Browser(demo.port)
    await asyncio.to_thread(browser.request, "POST", "/runs/demo2/", {"prompt": "Over a socket"})
    cookies = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
    async with websockets.connect(
        f"ws://127.0.0.1:{demo.port}/ws/runs/demo2/",
        additional_headers={"Cookie": cookies},
        origin=Origin(f"http://127.0.0.1:{demo.port}"),
    ) as socket:
        first = json.loads(await asyncio.wait_for(socket.recv(), 5))
    assert first["event"] == "start" and first["data"]["prompt"] == "Over a socket"


async def test_the_demo_refuses_a_websocket_from_a_foreign_origin(demo):
    import websockets
    from websockets.typing import Origin

    with pytest.raises(websockets.InvalidStatus):
        async with websockets.connect(
            f"ws://127.0.0.1:{demo.port}/ws/runs/demo2/", origin=Origin("http://evil.example")
        ):
            pass


@pytest.mark.parametrize(
    ("runserver_args", "url"),
    [
        ([], "http://127.0.0.1:8000/"),
        (["127.0.0.1:8101"], "http://127.0.0.1:8101/"),
        (["--noreload", "8101"], "http://127.0.0.1:8101/"),
        (["0:9000"], "http://0.0.0.0:9000/"),
        (["--ipv6", "8101"], "http://[::1]:8101/"),
    ],
)
def test_the_demo_prints_the_address_runserver_gets(runserver_args, url):
    # ./dev demo passes its runserver arguments to demo_user, which prints them.
    from demo_project.management.commands.demo_user import runserver_url

    assert runserver_url(runserver_args) == url

"""The installation steps, as a new user follows them: a project fresh from
``startproject``, the snippets of ``docs/snippets/`` applied (the README and
docs/installation.md show those files), migrated, served by a real daphne,
and a run started and followed over HTTP, SSE, a WebSocket and ``curl``.

The project has its own settings and its own SQLite file: nothing of the test
project's settings may make a step work that a user's would not.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Server, start_server, stop_server
from .http import Browser, text

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
SNIPPETS = ROOT / "docs" / "snippets"
USER, PASSWORD = "reader", "a-long-enough-password-1"


def code_blocks(markdown: str) -> list[tuple[str, str]]:
    """The fenced code blocks of ``markdown`` as (language, text), with the
    indentation of a block inside a list item taken off."""
    blocks = []
    for match in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```$", markdown, re.M | re.S):
        indent, language, body = match.groups()
        lines = body.splitlines(keepends=True)
        blocks.append((language, "".join(line.removeprefix(indent) for line in lines)))
    return blocks


def test_the_readme_shows_the_snippet_files_as_they_are() -> None:
    blocks = code_blocks((ROOT / "README.md").read_text())
    for name, language in [
        ("settings.py", "python"),
        ("urls.py", "python"),
        ("asgi.py", "python"),
        ("agents.py", "python"),
        ("first-run.sh", "sh"),
    ]:
        assert (language, (SNIPPETS / name).read_text()) in blocks, f"README.md: {name} differs"


def test_the_chat_pages_python_imports_every_name_it_uses() -> None:
    """docs/chat.md's settings and urls.py, copied as they are, run: ruff finds
    no undefined name (F821) in them."""
    blocks = code_blocks((ROOT / "docs" / "chat.md").read_text())
    sources = [body for language, body in blocks if language == "python"]
    assert sources
    for source in sources:
        ruff = Path(sys.executable).parent / "ruff"
        checked = subprocess.run(
            [str(ruff), "check", "--no-cache", "--select", "F821", "--stdin-filename", "chat.py"],
            input=source,
            capture_output=True,
            text=True,
        )
        assert checked.returncode == 0, checked.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``mysite`` as the installation steps leave it, served by daphne."""
    where = tmp_path_factory.mktemp("fresh")
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE") and not key.startswith("TEST_")
    }
    # The checkout under test, whatever copy of the app the interpreter has installed.
    env.update(
        DJANGO_SETTINGS_MODULE="mysite.settings",
        PYTHONPATH=os.pathsep.join([str(where), str(ROOT)]),
        PYTHONUNBUFFERED="1",
        DJANGO_SUPERUSER_PASSWORD=PASSWORD,
    )

    def run(*args: str) -> None:
        done = subprocess.run(args, cwd=where, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{args}:\n{done.stdout}{done.stderr}"

    run(sys.executable, "-m", "django", "startproject", "mysite", str(where))
    package = where / "mysite"
    with (package / "settings.py").open("a") as settings:
        settings.write("\n" + (SNIPPETS / "settings.py").read_text())
    for name in ("urls.py", "asgi.py", "agents.py"):
        shutil.copy(SNIPPETS / name, package / name)
    run(sys.executable, "manage.py", "migrate", "--noinput")
    run(sys.executable, "manage.py", "check", "--fail-level", "WARNING")
    run(
        sys.executable,
        "manage.py",
        "createsuperuser",
        "--noinput",
        f"--username={USER}",
        "--email=",
    )
    server = start_server(env, app="mysite.asgi:application")
    yield server
    stop_server(server)


def logged_in(port: int) -> Browser:
    """A client with a session, logged in through the admin's login form."""
    browser = Browser(port)
    assert browser.request("GET", "/admin/login/").status == 200
    form = f"username={USER}&password={PASSWORD}&csrfmiddlewaretoken={browser.csrf}"
    reply = browser.request(
        "POST",
        "/admin/login/",
        form.encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert reply.status == 302, reply.body
    # Logging in rotates the CSRF token: later POSTs send the new cookie's value.
    browser.csrf = browser.cookies["csrftoken"]
    return browser


def test_a_logged_in_client_starts_follows_and_resumes_a_run(project: Server) -> None:
    browser = logged_in(project.port)
    reply = browser.request("POST", "/runs/install-1/", {"prompt": "Hello there"})
    assert reply.status == 202, reply.body
    assert reply.json()["events_url"] == "/runs/install-1/events/"

    events = browser.stream("/runs/install-1/events/").rest()
    assert events[0].event == "start" and events[-1].event == "done"
    assert events[-1].data == {"status": "done"}
    assert text(events) == "You asked: Hello there "

    resumed = browser.stream("/runs/install-1/events/", {"Last-Event-ID": events[-1].id or ""})
    assert resumed.status == 204
    resumed.close()


def test_without_the_token_a_post_is_refused_with_what_to_send(project: Server) -> None:
    browser = logged_in(project.port)
    reply = browser.request("POST", "/runs/install-2/", {"prompt": "Hi"}, csrf=False)
    assert reply.status == 403
    assert "X-CSRFToken" in reply.json()["error"]


async def test_the_websocket_client_runs_a_prompt_with_the_session_cookie(
    project: Server,
) -> None:
    spec = importlib.util.spec_from_file_location("ws_client", SNIPPETS / "ws_client.py")
    assert spec is not None and spec.loader is not None
    ws_client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ws_client)

    browser = await asyncio.to_thread(logged_in, project.port)
    host = f"127.0.0.1:{project.port}"
    answer = await ws_client.ask(host, "install-3", "Over a socket", browser.cookies["sessionid"])
    assert answer == "You asked: Over a socket "


async def test_a_websocket_from_another_origin_is_refused(project: Server) -> None:
    import websockets
    from websockets.typing import Origin

    with pytest.raises(websockets.InvalidStatus):
        async with websockets.connect(
            f"ws://127.0.0.1:{project.port}/ws/runs/install-4/",
            origin=Origin("http://elsewhere.example"),
        ):
            pass


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_curl_example_runs_as_shown(project: Server) -> None:
    finished = subprocess.run(
        ["sh", str(SNIPPETS / "first-run.sh")],
        env=dict(
            os.environ, BASE=f"http://127.0.0.1:{project.port}", LOGIN=USER, PASSWORD=PASSWORD
        ),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert finished.returncode == 0, finished.stderr
    started, *stream, status = finished.stdout.strip().split("\n")
    assert json.loads(started)["status"] == "running"
    deltas = [json.loads(line[6:])["text"] for line in stream if line.startswith('data: {"text')]
    assert "".join(deltas) == "You asked: Hello there "
    assert re.search(r'^event: done\ndata: \{"status": ?"done"\}$', "\n".join(stream), re.M)
    assert status == "204"

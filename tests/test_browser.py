"""The demo chat in a real browser: headless Chromium driven by Playwright against
a real daphne serving the demo site and `detached-runs.js`. Streaming, reload and
close mid-answer, Stop, two tabs, no reconnect loop after the end, the agent's
question (ctx.ask) across reloads and tabs, over SSE and
over a WebSocket.

Skipped when Playwright or /usr/bin/chromium is missing, unless
``DETACHED_RUNS_REQUIRE_BROWSER=1`` (CI), which makes that an error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from demo_project.agents import ANSWER, DECLINED

from .conftest import Server, start_server, stop_server

CHROMIUM = "/usr/bin/chromium"


def _missing() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install -e '.[test]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


if (_reason := _missing()) is not None:
    if os.environ.get("DETACHED_RUNS_REQUIRE_BROWSER") == "1":
        pytest.fail(f"DETACHED_RUNS_REQUIRE_BROWSER=1, but {_reason}", pytrace=False)
    pytest.skip(f"browser tests need Playwright and Chromium: {_reason}", allow_module_level=True)

from playwright.sync_api import (  # noqa: E402
    Browser,
    BrowserContext,
    Page,
    Playwright,
    Request,
    expect,
    sync_playwright,
)
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError  # noqa: E402

pytestmark = pytest.mark.e2e

#: Seconds per word of the demo agent: its 154 words take about 1 s.
AGENT_DELAY = "0.006"
TIMEOUT = 15_000  # ms, for whatever waits on a whole answer

#: Records every EventSource and WebSocket the page opens, to check they end closed.
RECORD_CONNECTIONS = """
window.__connections = [];
for (const name of ["EventSource", "WebSocket"]) {
  const Original = window[name];
  window[name] = class extends Original {
    constructor(...args) { super(...args); window.__connections.push(this); }
  };
}
"""


def canned(prompt: str, turns: int = 0) -> str:
    """The demo agent's whole answer, as the page shows it."""
    text = ANSWER.format(prompt=prompt, turns=turns, turn_word="turn" if turns == 1 else "turns")
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in text.split("\n\n"))


# -- fixtures ----------------------------------------------------------------------


def serve_demo(database: Path, agent_delay: str, kind: str = "daphne") -> Server:
    """Migrate a fresh SQLite database and serve the demo site on it under
    ``kind`` (daphne or uvicorn)."""
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="demo_project.settings",
        DJANGO_DEBUG="1",  # the demo serves its static files itself only with DEBUG
        DEMO_SQLITE=str(database),
        DEMO_AGENT_DELAY=agent_delay,
    )
    env.pop("DATABASE_URL", None)
    env.pop("OPENAI_MODEL", None)  # the offline agent, whose answer the tests know
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"],
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        check=True,
        capture_output=True,
    )
    return start_server(env, app="demo_project.asgi:application", kind=kind)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: Any) -> Iterator[Server]:
    server = serve_demo(tmp_path_factory.mktemp("browser") / "demo.sqlite3", AGENT_DELAY)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as running:
        yield running


@pytest.fixture(scope="module")
def chromium(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
    yield browser
    browser.close()


@pytest.fixture(params=["sse", "ws"])
def transport(request: Any) -> str:
    return str(request.param)


def open_context(chromium: Browser, port: int, transport: str) -> BrowserContext:
    """One visitor of the site on ``port``: own cookies (so own Django
    session), own localStorage, the chat set to ``transport``, its
    connections recorded."""
    context = chromium.new_context(base_url=f"http://127.0.0.1:{port}")
    context.set_default_timeout(TIMEOUT)
    context.add_init_script(f"localStorage.setItem('detached_runs.transport', '{transport}');")
    context.add_init_script(RECORD_CONNECTIONS)
    return context


@pytest.fixture
def context(chromium: Browser, demo: Server, transport: str) -> Iterator[BrowserContext]:
    """One visitor: own cookies (so own Django session), own localStorage."""
    context = open_context(chromium, demo.port, transport)
    yield context
    context.close()


class Chat:
    """The chat page in one tab."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.events_requests: list[str] = []
        page.on("request", self._count)

    def _count(self, request: Request) -> None:
        if "/events/" in request.url:
            self.events_requests.append(request.url)

    @classmethod
    def open(cls, context: BrowserContext) -> Chat:
        chat = cls(context.new_page())
        chat.page.goto("/")
        chat.ready()
        return chat

    def ready(self) -> None:
        expect(self.page.locator("#sessions li").first).to_be_visible()
        expect(self.page.locator("#send")).to_be_enabled()

    def send(self, prompt: str) -> None:
        self.page.fill("#prompt", prompt)
        self.watch_answers()
        self.page.click("#send")

    def watch_answers(self) -> None:
        """Record every text an answer shows, from now on (a page loaded
        again forgets it): at each change, not each frame. A renderer starved
        on a loaded machine handles several events between two frames, and a
        check at every frame saw an answer jump from nothing to whole (CI)."""
        self.page.evaluate(
            """() => {
                 if (window.answersSeen) return;
                 window.answersSeen = [];
                 const note = () => {
                   const all = document.querySelectorAll(".answer");
                   if (!all.length) return;
                   const answer = all[all.length - 1];
                   const seen = window.answersSeen;
                   const last = seen[seen.length - 1];
                   if (!last || last.answer !== answer || last.text !== answer.textContent)
                     seen.push({answer, text: answer.textContent});
                 };
                 new MutationObserver(note).observe(
                   document.body, {subtree: true, childList: true, characterData: true});
                 note();
               }"""
        )

    @property
    def answers(self) -> Any:
        return self.page.locator(".answer")

    def answer(self, index: int = -1) -> str:
        return str(self.answers.nth(index).text_content())

    def wait_mid_answer(self, full: str) -> str:
        """Wait until the last answer has begun; return what is there.

        As early as can be (a few words in, as `watch_answers` saw it), so that
        what a test does next lands while the run is still going, even on a
        slow machine. Anything short of the whole answer counts: a loaded
        machine can deliver half of it between two frames, and a window that
        a burst can jump over would wait for ever."""
        self.watch_answers()
        found = self.page.wait_for_function(
            """([low, high]) => {
                 const all = document.querySelectorAll(".answer");
                 const answer = all[all.length - 1];
                 const seen = window.answersSeen.find((e) =>
                   e.answer === answer && e.text.length >= low && e.text.length < high);
                 return seen ? seen.text : false;
               }""",
            arg=[20, len(full)],
        )
        return str(found.json_value())

    def wait_answer(self, full: str, index: int = -1) -> None:
        # wait_for_function checks at every frame; expect() backs off to once a second.
        with contextlib.suppress(PlaywrightTimeoutError):
            self.page.wait_for_function(
                """([index, full]) => {
                     const all = [...document.querySelectorAll(".answer")];
                     return all.at(index)?.textContent === full;
                   }""",
                arg=[index, full],
            )
        assert self.answer(index) == full  # exactly: no repeated or missing word

    def session_key(self) -> str:
        """The key of the chat on screen (the page keeps it for the next visit)."""
        return str(self.page.evaluate("localStorage.getItem('detached_runs.current')"))

    def connections(self) -> list[dict[str, Any]]:
        """The page's EventSources and WebSockets; closed: CLOSED, or a WebSocket CLOSING."""
        return list(
            self.page.evaluate(
                """window.__connections.map((c) => ({
                     kind: c instanceof WebSocket ? "WebSocket" : "EventSource", url: c.url,
                     closed: c.readyState >= 2 }))"""
            )
        )


def start_over_http(context: BrowserContext, key: str, prompt: str) -> None:
    """Start a run as the page would, with the context's cookies and CSRF token."""
    token = next(c["value"] for c in context.cookies() if c["name"] == "csrftoken")
    reply = context.request.post(
        f"/runs/{key}/", data={"prompt": prompt}, headers={"X-CSRFToken": token}
    )
    assert reply.status == 202, reply.text()


def wait_until_finished(context: BrowserContext, key: str) -> dict[str, Any]:
    """Poll the status endpoint (with the context's cookies) until the run ended."""
    deadline = time.monotonic() + TIMEOUT / 1000
    while time.monotonic() < deadline:
        run: dict[str, Any] = context.request.get(f"/runs/{key}/").json()["run"]
        if run["status"] not in ("running", "waiting"):
            return run
        time.sleep(0.05)
    raise AssertionError(f"session {key} is still running")


# -- the chat page -----------------------------------------------------------------


def test_a_prompt_streams_its_answer_word_by_word(context):
    chat = Chat.open(context)
    full = canned("Hello there")
    chat.send("Hello there")
    partial = chat.wait_mid_answer(full)
    assert full.startswith(partial)  # seen while streaming, not all at once
    expect(chat.page.locator("#stop")).to_be_enabled()
    chat.wait_answer(full)
    expect(chat.page.locator("#stop")).to_be_disabled()
    expect(chat.page.locator(".badge")).to_have_count(0)
    expect(chat.page.locator("#sessions li button").first).to_have_text("Hello there")


def test_an_answer_streams_live_past_gzip_middleware(context, transport):
    """The demo has GZipMiddleware, as many projects do, and Chromium accepts
    gzip: the page comes compressed, the events stream does not, or the
    words would wait in the compressor and EventSource would read nothing."""
    if transport == "ws":
        pytest.skip("a WebSocket's frames are not HTTP responses: no middleware sees them")
    chat = Chat.open(context)
    encodings: dict[str, str] = {}
    chat.page.on(
        "response",
        lambda response: encodings.__setitem__(
            response.url, response.headers.get("content-encoding", "")
        ),
    )
    chat.page.reload()
    full = canned("Hello there")
    chat.send("Hello there")
    assert full.startswith(chat.wait_mid_answer(full))
    chat.wait_answer(full)
    page = chat.page.url
    assert encodings[page] == "gzip"  # the middleware is on
    streams = [url for url in encodings if "/events/" in url]
    assert streams and all(encodings[url] == "" for url in streams)


def test_a_reload_mid_answer_continues_without_repeated_or_missing_words(context, transport):
    chat = Chat.open(context)
    full = canned("Reload me")
    chat.send("Reload me")
    chat.wait_mid_answer(full)
    chat.page.reload()
    chat.wait_answer(full)
    expect(chat.answers).to_have_count(1)
    # The reloaded page found the run still going and followed it.
    if transport == "sse":
        assert len(chat.events_requests) == 2
    else:
        assert len(chat.connections()) == 1


def test_closing_the_tab_mid_answer_then_coming_back_shows_the_finished_answer(context):
    chat = Chat.open(context)
    full = canned("Close the tab")
    chat.send("Close the tab")
    chat.wait_mid_answer(full)
    key = chat.session_key()
    chat.page.close()
    run = wait_until_finished(context, key)  # the run went on without the tab
    assert run["status"] == "done" and run["output"] == full
    again = Chat.open(context)
    again.wait_answer(full)
    assert again.events_requests == []  # a finished answer comes from the history


def test_stop_keeps_the_partial_answer_marked_stopped(context):
    chat = Chat.open(context)
    full = canned("Stop me")
    chat.send("Stop me")
    chat.wait_mid_answer(full)
    chat.page.click("#stop")
    expect(chat.page.locator(".badge.stopped")).to_have_text("stopped")
    expect(chat.page.locator("#stop")).to_be_disabled()
    partial = chat.answer()
    assert 0 < len(partial) < len(full) and full.startswith(partial)
    chat.page.reload()  # what was shown is what was saved
    chat.ready()
    expect(chat.answers.last).to_have_text(partial)
    assert chat.answer() == partial
    expect(chat.page.locator(".badge.stopped")).to_have_text("stopped")


def test_two_tabs_on_one_session_show_the_same_text(context):
    first = Chat.open(context)
    full = canned("Two tabs")
    first.send("Two tabs")
    first.wait_mid_answer(full)
    second = Chat.open(context)  # same visitor: the same sessions, the first one shown
    assert second.session_key() == first.session_key()
    second.wait_answer(full)
    first.wait_answer(full)


def test_the_browser_stops_connecting_after_the_end(context, transport):
    chat = Chat.open(context)
    full = canned("Then silence")
    chat.send("Then silence")
    chat.wait_answer(full)
    expect(chat.page.locator("#stop")).to_be_disabled()
    opened = chat.connections()
    # Absence can only be shown by waiting: the WebSocket's first retry would
    # come after 250 ms, EventSource's after about 3 s (but see "closed" below).
    chat.page.wait_for_timeout(400)
    assert chat.connections() == opened
    assert all(c["closed"] for c in opened)  # closed: nothing can reconnect
    if transport == "sse":
        assert len(chat.events_requests) == 1
    else:
        # A new session: the first socket is refused (4404), the run starts over
        # HTTP, a second socket follows it.
        assert [c["kind"] for c in opened] == ["WebSocket", "WebSocket"]
        assert chat.events_requests == []


def test_sending_while_an_answer_streams_saves_the_first_as_stopped(context):
    chat = Chat.open(context)
    first = canned("First")
    chat.send("First")
    chat.wait_mid_answer(first)
    chat.send("Second")
    chat.wait_answer(canned("Second", turns=1))
    expect(chat.answers).to_have_count(2)
    expect(chat.page.locator(".badge")).to_have_count(1)
    expect(chat.page.locator(".turn").first.locator(".badge.stopped")).to_have_text("stopped")
    shown = chat.answer(0)
    assert 0 < len(shown) < len(first) and first.startswith(shown)
    turns = context.request.get(f"/runs/{chat.session_key()}/runs/").json()["runs"]
    assert [(t["output"], t["status"]) for t in turns] == [
        (shown, "stopped"),
        (canned("Second", turns=1), "done"),
    ]


@pytest.mark.parametrize("transport", ["sse"])
def test_a_double_click_on_send_starts_one_run(context):
    chat = Chat.open(context)
    chat.page.fill("#prompt", "Only once")
    chat.page.dblclick("#send")
    chat.wait_answer(canned("Only once"))
    expect(chat.answers).to_have_count(1)
    expect(chat.page.locator(".badge")).to_have_count(0)
    turns = context.request.get(f"/runs/{chat.session_key()}/runs/").json()["runs"]
    assert [t["status"] for t in turns] == ["done"]


@pytest.mark.parametrize("transport", ["sse"])
def test_switching_chats_quickly_shows_only_the_last_one_chosen(context):
    chat = Chat.open(context)
    chats = {uuid.uuid4().hex[:12]: prompt for prompt in ("In chat A", "In chat B")}
    for key, prompt in chats.items():
        start_over_http(context, key, prompt)
    for key in chats:
        wait_until_finished(context, key)
    chat.page.reload()  # the sidebar lists the visitor's chats from the server
    chat.ready()
    # Hold both histories back, then let chat B's through before chat A's.
    held: list[Any] = []
    chat.page.route("**/runs/*/runs/*", lambda route: held.append(route))
    buttons = chat.page.locator("#sessions li button")
    buttons.filter(has_text="In chat A").click()
    buttons.filter(has_text="In chat B").click()
    deadline = time.monotonic() + 5
    while len(held) < 2 and time.monotonic() < deadline:
        chat.page.wait_for_timeout(20)  # lets Playwright hand over the held requests
    assert len(held) == 2
    held[1].continue_()
    expect(chat.page.locator(".prompt")).to_have_text(["In chat B"])
    with chat.page.expect_response("**/runs/*/runs/*"):
        held[0].continue_()  # chat A's history arrives last, for a chat no longer chosen
    expect(chat.page.locator(".prompt")).to_have_text(["In chat B"])
    expect(buttons.filter(has_text="In chat B")).to_have_attribute("aria-current", "true")


@pytest.mark.parametrize("transport", ["sse"])
def test_the_sidebar_lists_the_visitors_chats_and_deleting_one_removes_it(context):
    chat = Chat.open(context)
    keys = {prompt: uuid.uuid4().hex[:12] for prompt in ("Chat A", "Chat B", "Chat C")}
    for prompt, key in keys.items():
        start_over_http(context, key, prompt)
        wait_until_finished(context, key)
    chat.page.reload()  # the chats come from the server: the latest one is shown
    chat.ready()
    titles = chat.page.locator("#sessions li button.open")
    expect(titles).to_have_text(["Chat C", "Chat B", "Chat A"])
    expect(titles.first).to_have_attribute("aria-current", "true")
    expect(chat.page.locator(".prompt")).to_have_text(["Chat C"])
    # Another chat than the one on screen: it goes from the list and the server.
    chat.page.get_by_role("button", name="Delete “Chat A”").click()
    expect(titles).to_have_text(["Chat C", "Chat B"])
    assert context.request.get(f"/runs/{keys['Chat A']}/").status == 404
    # The chat on screen, mid-answer: its run is stopped and the page moves on.
    full = canned("Again", turns=1)
    chat.send("Again")
    chat.wait_mid_answer(full)
    chat.page.get_by_role("button", name="Delete “Chat C”").click()
    expect(titles).to_have_text(["Chat B"])
    expect(titles.first).to_have_attribute("aria-current", "true")
    expect(chat.page.locator(".prompt")).to_have_text(["Chat B"])
    assert context.request.get(f"/runs/{keys['Chat C']}/").status == 404
    listed = context.request.get("/runs/").json()["sessions"]
    assert [s["session"] for s in listed] == [keys["Chat B"]]
    chat.page.reload()
    chat.ready()
    expect(titles).to_have_text(["Chat B"])
    chat.page.wait_for_timeout(300)
    assert all(c["closed"] for c in chat.connections())  # nothing follows the deleted run


# -- the module on its own -------------------------------------------------------

MODULE_SCRIPT = """async ([transport, key]) => {
  const { DetachedRuns, RunError } = await import("/static/detached_runs/detached-runs.js");
  const client = new DetachedRuns({ transport, events: ["status", "usage"] });
  const failure = async (promise) => {
    try { await promise; return null; }
    catch (e) { return [e instanceof RunError, e.status, e.message]; }
  };
  const badKey = await failure(client.start("not a key!", "Hello"));
  const missing = await failure((async () => {
    for await (const _ of client.follow("nosuchsession")) { /* nothing comes */ }
  })());
  const seen = { starts: [], names: [], done: null };
  const run = await client.start(key, "Iterate", {
    onStart: (data) => seen.starts.push(data.prompt),
    onEvent: (name, data) => seen.names.push(name),
    onDone: (status) => { seen.done = status; },
  });
  const events = [];
  for await (const event of run) { events.push(event); }
  const empty = await failure(client.start(key, "   "));
  return {
    badKey, missing, empty, seen, status: run.status, lastEventId: run.lastEventId,
    kinds: [...new Set(events.map((e) => e.event))],
    text: events.filter((e) => e.event === "delta").map((e) => e.data.text).join(""),
  };
}"""


def test_the_module_iterates_a_run_and_reports_json_errors(context, transport):
    chat = Chat.open(context)
    result = chat.page.evaluate(MODULE_SCRIPT, [transport, "module-" + transport])
    assert result["text"] == canned("Iterate")
    assert result["kinds"] == ["start", "status", "delta", "usage", "done"]
    assert result["seen"] == {"starts": ["Iterate"], "names": ["status", "usage"], "done": "done"}
    assert result["status"] == "done" and result["lastEventId"]
    assert result["badKey"][:2] == [True, 400], result["badKey"]
    assert result["missing"] == [True, 404, "No such session."]
    assert result["empty"][:2] == [True, 400] and "prompt" in result["empty"][2].lower()
    assert all(c["closed"] for c in chat.connections())


QUEUE_SCRIPT = """async ([transport, key]) => {
  const { DetachedRuns } = await import("/static/detached_runs/detached-runs.js");
  const client = new DetachedRuns({ transport, events: ["status"] });
  const starts = [[], []];
  const first = await client.start(key, "First", { onStart: (d) => starts[0].push(d.prompt) },
                                   { multitask: "enqueue" });
  const second = await client.start(key, "Second", { onStart: (d) => starts[1].push(d.prompt) },
                                    { multitask: "enqueue", options: { tone: "dry" } });
  const texts = [];
  for (const run of [first, second]) {
    const events = [];
    for await (const event of run) { events.push(event); }
    texts.push(events.filter((e) => e.event === "delta").map((e) => e.data.text).join(""));
  }
  const session = await client.request(client.url(key));
  return { starts, texts, statuses: [first.status, second.status],
           runs: [first.runId, second.runId], latest: session.run };
}"""


def test_the_module_queues_a_run_and_follows_it_after_the_run_before_it(context, transport):
    chat = Chat.open(context)
    result = chat.page.evaluate(QUEUE_SCRIPT, [transport, "queue-" + transport])
    # Each run reports its own events only, the queued one once it starts.
    assert result["starts"] == [["First"], ["Second"]]
    assert result["texts"] == [canned("First"), canned("Second", turns=1)]
    assert result["statuses"] == ["done", "done"]
    assert result["runs"][0] != result["runs"][1] and result["latest"]["id"] == result["runs"][1]
    assert result["latest"]["options"] == {"tone": "dry"}
    assert all(c["closed"] for c in chat.connections())


CONVERSATIONS_SCRIPT = """async (keys) => {
  const { DetachedRuns, RunError } = await import("/static/detached_runs/detached-runs.js");
  const client = new DetachedRuns();
  const failure = async (promise) => {
    try { await promise; return null; }
    catch (e) { return [e instanceof RunError, e.status, e.message]; }
  };
  const first = await client.sessions({ limit: 2 });
  const second = await client.sessions({ limit: 2, cursor: first.next });
  const newest = await client.runs(keys[0], { limit: 1 });
  const oldest = await client.runs(keys[0], { limit: 1, cursor: newest.next });
  const deleted = await client.delete(keys[1]);
  return {
    pages: [first, second].map((p) => [p.sessions.map((s) => s.session), p.next !== null]),
    titles: first.sessions.map((s) => s.title),
    runs: [newest, oldest].map((p) => [p.runs.map((r) => r.prompt), p.next !== null]),
    deleted,
    again: await failure(client.delete(keys[1])),
    gone: await failure(client.runs(keys[1])),
    left: (await client.sessions()).sessions.map((s) => s.session),
    badLimit: await failure(client.sessions({ limit: 0 })),
    badCursor: await failure(client.runs(keys[0], { cursor: first.next })),
  };
}"""


@pytest.mark.parametrize("transport", ["sse"])
def test_the_module_lists_pages_and_deletes_conversations(context):
    chat = Chat.open(context)
    keys = [uuid.uuid4().hex[:12] for _ in range(3)]
    for key, prompt in zip(keys, ("One", "Two", "Three"), strict=True):
        start_over_http(context, key, prompt)
        wait_until_finished(context, key)
    start_over_http(context, keys[0], "One again")
    wait_until_finished(context, keys[0])
    result = chat.page.evaluate(CONVERSATIONS_SCRIPT, keys)
    assert result["pages"] == [[[keys[0], keys[2]], True], [[keys[1]], False]]
    assert result["titles"] == ["One", "Three"]
    assert result["runs"] == [[["One again"], True], [["One"], False]]
    assert result["deleted"] is None
    assert result["again"] == [True, 404, "No such session."]
    assert result["gone"] == [True, 404, "No such session."]
    assert result["left"] == [keys[0], keys[2]]
    assert result["badLimit"][:2] == [True, 400] and "limit" in result["badLimit"][2]
    assert result["badCursor"][:2] == [True, 400] and "cursor" in result["badCursor"][2]


def finished_chat(context: BrowserContext, prompt: str) -> Chat:
    """A tab whose chat has one finished run."""
    chat = Chat.open(context)
    chat.send(prompt)
    chat.wait_answer(canned(prompt))
    return chat


@pytest.mark.parametrize("transport", ["sse"])
def test_following_after_the_end_gets_204_and_does_not_reconnect(context):
    chat = finished_chat(context, "Done already")
    status = chat.page.evaluate(
        """async (key) => {
             const { DetachedRuns } = await import("/static/detached_runs/detached-runs.js");
             const client = new DetachedRuns();
             const run = client.follow(key);
             for await (const _ of run) {}
             return new Promise((resolve) => client.follow(key, {
               onDone: (status) => resolve(status), onError: (e) => resolve(e.message),
             }, { after: run.lastEventId }));
           }""",
        chat.session_key(),
    )
    assert status == "done"
    # The page's stream, the replay above, the resume that got 204, and the
    # one plain request that asked why EventSource gave up: then nothing.
    chat.page.wait_for_timeout(400)
    assert len(chat.events_requests) == 4
    assert all(c["closed"] for c in chat.connections())


@pytest.mark.parametrize("transport", ["ws"])
def test_following_a_websocket_after_the_end_ends_with_the_runs_status(context):
    # After the terminal id a socket gets nothing and stays open for the next
    # start; the module asks the events URL first and ends on its 204.
    chat = finished_chat(context, "Done already")
    sockets = len(chat.connections())
    result = chat.page.evaluate(
        """async (key) => {
             const { DetachedRuns } = await import("/static/detached_runs/detached-runs.js");
             const client = new DetachedRuns({ transport: "ws" });
             const run = client.follow(key);
             for await (const _ of run) {}
             const again = client.follow(key, {}, { after: run.lastEventId });
             const events = [];
             for await (const event of again) { events.push([event.event, event.data]); }
             return { events, status: again.status, last: again.lastEventId === run.lastEventId };
           }""",
        chat.session_key(),
    )
    assert result == {"events": [["done", {"status": "done"}]], "status": "done", "last": True}
    # The replay's socket, and none for the follow after the end.
    assert len(chat.connections()) == sockets + 1
    assert all(c["closed"] for c in chat.connections())


@pytest.mark.parametrize("transport", ["ws"])
def test_a_following_websocket_after_a_mid_run_id_gets_the_rest(context):
    chat = finished_chat(context, "Resume me")
    result = chat.page.evaluate(
        """async (key) => {
             const { DetachedRuns } = await import("/static/detached_runs/detached-runs.js");
             const client = new DetachedRuns({ transport: "ws" });
             const events = [];
             for await (const event of client.follow(key)) { events.push(event); }
             const cut = events.findIndex((e) => e.event === "delta");
             const rest = [];
             for await (const event of client.follow(key, {}, { after: events[cut].id })) {
               rest.push(event.id);
             }
             return { rest, expected: events.slice(cut + 1).map((e) => e.id) };
           }""",
        chat.session_key(),
    )
    assert result["rest"] and result["rest"] == result["expected"]


@pytest.mark.parametrize("transport", ["ws"])
def test_a_dropped_websocket_resumes_in_the_same_turn(context):
    chat = Chat.open(context)
    full = canned("Drop the socket")
    chat.send("Drop the socket")
    chat.wait_mid_answer(full)
    # Close the socket under the page's feet: to the module that is a drop.
    chat.page.evaluate("window.__connections.at(-1).close()")
    chat.wait_answer(full)
    expect(chat.answers).to_have_count(1)
    urls = [c["url"] for c in chat.connections()]
    assert "?after=" in urls[-1]


@pytest.mark.parametrize("transport", ["ws"])
def test_a_websocket_start_refused_by_an_error_frame_rejects_with_its_status(context):
    """A "reject" start while a run is in flight: the server's error frame says
    409, as HTTP would, and the start rejects with it, not with a 400."""
    chat = Chat.open(context)
    result = chat.page.evaluate(
        """async (key) => {
             const { DetachedRuns } = await import("/static/detached_runs/detached-runs.js");
             const client = new DetachedRuns({ transport: "ws" });
             const first = await client.start(key, "First");
             try {
               await client.start(key, "Second", {}, { multitask: "reject" });
               return null;
             } catch (error) {
               return { status: error.status, transient: error.transient,
                        message: error.message };
             } finally { await first.stop(); first.close(); }
           }""",
        "reject-ws",
    )
    assert result is not None
    assert result["status"] == 409 and result["transient"] is False
    assert "in flight" in result["message"]


RUN_ID_SCRIPT = """async ([transport, key]) => {
  const { DetachedRuns } = await import("/static/detached_runs/detached-runs.js");
  const client = new DetachedRuns({ transport });
  const first = await client.start(key, "First");  // a new session
  const ids = [first.runId];  // before any event of it
  const second = await client.start(key, "Second", {}, { multitask: "enqueue" });
  ids.push(second.runId);
  const stopped = await first.stop();
  for (const run of [first, second]) { for await (const _ of run) { /* to the end */ } }
  const late = await second.stop();  // nothing in flight any more
  const page = await client.runs(key);
  return { ids, stopped, late, statuses: [first.status, second.status],
           saved: page.runs.map((r) => r.id), followed: [first.runId, second.runId] };
}"""


def test_a_started_run_has_its_id_at_once_and_stop_says_whether_it_stopped(context, transport):
    chat = Chat.open(context)
    result = chat.page.evaluate(RUN_ID_SCRIPT, [transport, "run-id-" + transport])
    assert result["ids"] == result["saved"] == result["followed"]
    assert None not in result["ids"]
    assert result["stopped"] is True and result["late"] is False
    assert result["statuses"] == ["stopped", "done"]


CANCELLED_QUEUE_SCRIPT = """async ([transport, key, how]) => {
  const { DetachedRuns } = await import("/static/detached_runs/detached-runs.js");
  const client = new DetachedRuns({ transport });
  const seen = [[], [], []];
  const callbacks = (i) => ({
    onStart: (data) => seen[i].push(["start", data.prompt]),
    onDone: (status) => seen[i].push(["done", status]),
    onError: (error) => seen[i].push(["error", error.status, error.message]),
  });
  const first = await client.start(key, "Hello", callbacks(0));
  const queued = await client.start(key, "queued", callbacks(1), { multitask: "enqueue" });
  const third = how === "stop"
    ? (await client.stop(key, { all: true }), null)
    : await client.start(key, "Third", callbacks(2), { multitask: how });
  const events = [];
  const patience = new Promise((resolve) => { setTimeout(() => resolve("timed out"), 10000); });
  const ended = (async () => { for await (const event of queued) { events.push(event); } })();
  const waited = await Promise.race([ended, patience]);
  queued.close();
  for await (const _ of first) { /* to its end */ }
  if (third) { for await (const _ of third) { /* to its end */ } }
  const page = await client.runs(key);
  return {
    waited: waited ?? "ended", seen, status: queued.status, runId: queued.runId,
    events: events.map((e) => [e.event, e.data]),
    rows: page.runs.map((r) => [r.id, r.prompt, r.status, r.output]),
  };
}"""


@pytest.mark.parametrize("how", ["stop", "interrupt", "rollback"])
def test_a_queued_run_cancelled_before_it_started_ends_stopped(context, transport, how):
    """`stop(key, {all: true})`, or a later interrupt or rollback start,
    cancels the queue: the queued run's `Run` ends "stopped" (onDone once),
    without a start, instead of waiting for ever."""
    chat = Chat.open(context)
    key = f"cancelled-{how}-{transport}"
    result = chat.page.evaluate(CANCELLED_QUEUE_SCRIPT, [transport, key, how])
    assert result["waited"] == "ended"
    assert result["seen"][1] == [["done", "stopped"]]
    assert result["status"] == "stopped"
    assert result["events"] == [["done", {"status": "stopped"}]]
    assert result["seen"][0] == [["start", "Hello"], ["done", "stopped"]]
    rows = {row[0]: row[1:] for row in result["rows"]}
    if how == "rollback":  # its row went with the run it replaced
        assert result["runId"] not in rows
        assert [row[1:3] for row in result["rows"]] == [["Third", "done"]]
    else:
        assert rows[result["runId"]] == ["queued", "stopped", ""]


# -- a question of the agent (ctx.ask) ---------------------------------------------
# The demo's offline agent asks whether to go on when the prompt says "approve";
# the page shows the question with buttons, still there after a reload and in
# another tab, and gone everywhere once answered from either.

PROMPT = "Please approve each step"


#: Schedule a click of the question's button ``choice`` at the moment ``at`` (ms
#: since the epoch); ``window.__clicked`` then says whether it was there to click.
CLICK_AT = """([at, choice]) => { setTimeout(() => {
  const button = [...document.querySelectorAll(".question button")]
    .find((b) => b.textContent === choice);
  button?.click();
  window.__clicked = Boolean(button);
}, at - Date.now()); }"""


def question(chat: Chat) -> Any:
    return chat.page.locator(".question")


def first_paragraph(prompt: str) -> str:
    return canned(prompt).split("\n\n")[0]


def test_the_question_survives_a_reload_and_yes_finishes_the_answer(context):
    chat = Chat.open(context)
    chat.send(PROMPT)
    expect(question(chat)).to_have_count(1)
    expect(question(chat).locator("p")).to_have_text("May I go on with the rest of the answer?")
    assert chat.answer().startswith(first_paragraph(PROMPT))
    chat.page.reload()
    chat.ready()
    # The run waited on the server; the replay shows the question again, once.
    expect(question(chat)).to_have_count(1)
    assert chat.answer() == first_paragraph(PROMPT) + "\n\n"
    question(chat).get_by_role("button", name="yes").click()
    expect(question(chat)).to_have_count(0)
    chat.wait_answer(canned(PROMPT))
    run = wait_until_finished(context, chat.session_key())
    assert (run["status"], run["output"]) == ("done", canned(PROMPT))


def test_an_answer_from_another_tab_removes_the_question_in_both(context):
    first = Chat.open(context)
    first.send(PROMPT)
    expect(question(first)).to_have_count(1)
    second = Chat.open(context)  # the same visitor; the page opens the current chat
    expect(question(second)).to_have_count(1)
    second_request = question(second).get_attribute("data-request")
    assert second_request == question(first).get_attribute("data-request")
    second.page.close()
    # A third tab, opened after the second closed, answers "no".
    third = Chat.open(context)
    expect(question(third)).to_have_count(1)
    question(third).get_by_role("button", name="no").click()
    for chat in (first, third):
        expect(question(chat)).to_have_count(0)
        chat.wait_answer(first_paragraph(PROMPT) + "\n\n" + DECLINED)
    run = wait_until_finished(context, first.session_key())
    assert run["output"] == first_paragraph(PROMPT) + "\n\n" + DECLINED


def test_two_tabs_answering_at_once_one_answer_is_taken(context):
    first = Chat.open(context)
    first.send(PROMPT)
    expect(question(first)).to_have_count(1)  # the run exists: the second tab finds it
    second = Chat.open(context)
    expect(question(second)).to_have_count(1)
    # Both click at the same instant, before either hears of the other's answer.
    at = first.page.evaluate("Date.now() + 500")
    for chat, choice in ((first, "yes"), (second, "no")):
        chat.page.evaluate(CLICK_AT, [at, choice])  # scheduled in each tab; returns at once
    for chat in (first, second):
        chat.page.wait_for_function("window.__clicked !== undefined")
        assert chat.page.evaluate("window.__clicked") is True  # both clicked
    run = wait_until_finished(context, first.session_key())
    assert run["output"] in (canned(PROMPT), first_paragraph(PROMPT) + "\n\n" + DECLINED)
    for chat in (first, second):
        expect(question(chat)).to_have_count(0)
        chat.wait_answer(run["output"])
        expect(chat.page.locator("#status")).to_have_text("")  # a 409 is not an error to show


def test_stop_while_the_question_waits_removes_it_and_keeps_the_answer_so_far(context):
    chat = Chat.open(context)
    chat.send(PROMPT)
    expect(question(chat)).to_have_count(1)
    chat.page.click("#stop")
    expect(question(chat)).to_have_count(0)
    expect(chat.page.locator(".badge")).to_have_text("stopped")
    run = wait_until_finished(context, chat.session_key())
    assert (run["status"], run["output"]) == ("stopped", first_paragraph(PROMPT) + "\n\n")

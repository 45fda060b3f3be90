"""The JavaScript client through a proxy that fails for a while, as one in front
of a restarting server does: headless Chromium loads the demo site through
`tests.proxy.Proxy`, in front of a real daphne. Transient answers (502, 503,
429 with a Retry-After, a connection closed without an answer) are retried
with back-off and the run's answer arrives whole; final ones (404, a 429
without Retry-After) end the stream at once. Over SSE and over a WebSocket.

Skipped, or an error under ``DETACHED_RUNS_REQUIRE_BROWSER=1``, like
tests/test_browser.py, whose helpers it uses.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from . import test_browser
from .conftest import Server, stop_server
from .http import Browser as Stranger
from .proxy import Proxy
from .test_browser import (  # first: it skips the module without Playwright and Chromium
    Browser,
    BrowserContext,
    Chat,
    Page,
    canned,
    expect,
    finished_chat,
    open_context,
    serve_demo,
    start_over_http,
    wait_until_finished,
)

# tests/test_browser.py's fixtures: pytest finds a fixture by its name in the module.
playwright = test_browser.playwright
chromium = test_browser.chromium
transport = test_browser.transport

pytestmark = pytest.mark.e2e

#: Seconds per word of the demo agent: its 154 words take about 2.3 s, so a
#: run is still going when the proxy fails and, often, when it is back.
AGENT_DELAY = "0.015"

#: What the proxy does to new connections during an outage.
FAULTS: dict[str, Callable[[Proxy], None]] = {
    "503": lambda proxy: proxy.answer(503),
    "502": lambda proxy: proxy.answer(502),
    "drop": Proxy.drop,
}

#: The module in the page follows a session; resolves with what the callbacks saw.
FOLLOW_SCRIPT = """async ([transport, key, retry, patience]) => {
  const { DetachedRuns } = await import("/static/detached_runs/detached-runs.js");
  const client = new DetachedRuns({ transport, retry });
  const begun = performance.now();
  const seen = { delays: [], statuses: [], text: "", done: null, error: null };
  window.__seen = seen;
  return new Promise((resolve) => {
    const end = () => resolve({ ...seen, elapsed: performance.now() - begun });
    const run = client.follow(key, {
      onDelta: (text) => { seen.text += text; },
      onReconnecting: (retrying) => {
        seen.delays.push(retrying?.delay ?? null);
        seen.statuses.push(retrying?.error.status ?? null);
      },
      onDone: (status) => { seen.done = status; end(); },
      onError: (error) => { seen.error = [error.status, error.message]; end(); },
    });
    setTimeout(() => { run.close(); end(); }, patience);  // neither onDone nor onError came
  });
}"""


def begin(page: Page, script: str, arg: Any) -> None:
    """Run ``script(arg)`` in the page without waiting for its promise; see `outcome`."""
    page.evaluate(f"(arg) => {{ window.__outcome = ({script})(arg); }}", arg)


def outcome(page: Page) -> Any:
    """What the promise of the script `begin` ran resolved to (once it has)."""
    return page.evaluate("window.__outcome")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: Any) -> Iterator[Server]:
    server = serve_demo(tmp_path_factory.mktemp("faults") / "demo.sqlite3", AGENT_DELAY)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def proxy(demo: Server) -> Iterator[Proxy]:
    running = Proxy(upstream=demo.port)
    yield running
    running.close()


@pytest.fixture(autouse=True)
def _forwarding(proxy: Proxy) -> Iterator[None]:
    proxy.forward()
    proxy.refused.clear()
    yield
    proxy.forward()


@pytest.fixture
def context(chromium: Browser, proxy: Proxy, transport: str) -> Iterator[BrowserContext]:
    """One visitor whose every request goes through the proxy."""
    context = open_context(chromium, proxy.port, transport)
    yield context
    context.close()


def refuse(proxy: Proxy, status: int, headers: dict[str, str] | None = None) -> None:
    """From now on the proxy answers ``status``, also to a browser's kept-alive connections."""
    proxy.answer(status, headers)
    proxy.cut()


def outage(page: Page, proxy: Proxy, fault: str, seconds: float) -> None:
    """Cut the open connections and fail new ones for ``seconds``, then forward again.
    Meanwhile the page says it is reconnecting (onReconnecting), not that it failed."""
    begun = time.monotonic()
    FAULTS[fault](proxy)
    proxy.cut()
    expect(page.locator("#status")).to_contain_text("reconnecting", timeout=seconds * 1000)
    page.wait_for_timeout(max(0.0, seconds - (time.monotonic() - begun)) * 1000)
    proxy.forward()


def assert_done(chat: Chat, context: BrowserContext, full: str) -> None:
    """The page shows the whole answer, without a badge or a message; the run is done."""
    chat.wait_answer(full)
    expect(chat.answers).to_have_count(1)
    expect(chat.page.locator(".badge")).to_have_count(0)  # "done" has none
    expect(chat.page.locator("#status")).to_have_text("")
    expect(chat.page.locator("#stop")).to_be_disabled()  # the Run ended
    turns = context.request.get(f"/runs/{chat.session_key()}/runs/").json()["runs"]
    assert [(t["output"], t["status"]) for t in turns] == [(full, "done")]


# -- the chat page through an outage -----------------------------------------------


def test_a_streaming_answer_survives_an_outage_of_503s(context, proxy):
    chat = Chat.open(context)
    full = canned("Through the outage")
    chat.send("Through the outage")
    chat.wait_mid_answer(full)
    outage(chat.page, proxy, "503", seconds=3)
    assert len(proxy.refused) >= 2  # the client knocked again during the outage
    assert_done(chat, context, full)


@pytest.mark.parametrize("fault", ["502", "drop"])
def test_a_502_or_a_connection_closed_without_an_answer_is_retried_too(context, proxy, fault):
    chat = Chat.open(context)
    full = canned(f"Through a {fault}")
    chat.send(f"Through a {fault}")
    chat.wait_mid_answer(full)
    outage(chat.page, proxy, fault, seconds=2)
    assert proxy.refused
    assert_done(chat, context, full)


def test_a_prompt_sent_during_an_outage_starts_once_the_server_is_back(context, proxy):
    # A 503 (over SSE, the POST's; over a WebSocket, the handshake's) proves the
    # prompt reached no server, so sending it again cannot start it twice.
    chat = Chat.open(context)
    full = canned("Sent in the outage")
    refuse(proxy, 503)
    chat.send("Sent in the outage")
    expect(chat.page.locator("#status")).to_contain_text("reconnecting")
    chat.page.wait_for_timeout(2500)
    assert proxy.refused
    proxy.forward()
    assert_done(chat, context, full)


@pytest.mark.parametrize("transport", ["sse"])
@pytest.mark.parametrize("fault", ["502", "drop"])
def test_a_start_that_may_have_reached_the_server_is_not_sent_again(context, proxy, fault):
    # After no answer, or a 502, the POST may have started the run: sending it
    # again could start it twice. The caller gets the error at once.
    chat = Chat.open(context)
    FAULTS[fault](proxy)
    proxy.cut()
    result = chat.page.evaluate(
        """async (key) => {
             const { DetachedRuns } = await import("/static/detached_runs/detached-runs.js");
             let retries = 0;
             const onReconnecting = () => { retries += 1; };
             try {
               await new DetachedRuns().start(key, "Maybe", { onReconnecting });
               return "started";
             } catch (error) {
               return [error.status, error.transient, retries];
             }
           }""",
        uuid.uuid4().hex[:12],
    )
    assert result == [502 if fault == "502" else 0, False, 0]
    assert [line.split()[0] for line in proxy.refused] == ["POST"]


# -- the module on its own ---------------------------------------------------------


@pytest.fixture
def strangers(demo: Server) -> str:
    """The key of another visitor's session: 404 to ours, an answer that cannot change."""
    key = uuid.uuid4().hex[:12]
    reply = Stranger(demo.port).request("POST", f"/runs/{key}/", {"prompt": "Not yours"})
    assert reply.status == 202, reply.body
    return key


def test_a_final_answer_ends_the_stream_at_once_without_retries(context, transport, strangers):
    chat = Chat.open(context)
    result = chat.page.evaluate(FOLLOW_SCRIPT, [transport, strangers, {}, 5000])
    assert result["error"] == [404, "No such session."]
    assert result["delays"] == [] and result["elapsed"] < 1000
    chat.page.wait_for_timeout(300)
    if transport == "sse":
        # EventSource's request, and the one that asked why it failed.
        assert len(chat.events_requests) == 2 and len(chat.connections()) == 1
    else:
        # A WebSocket follow asks the events URL first, and opens no socket on a 404.
        assert len(chat.events_requests) == 1 and chat.connections() == []
    assert all(c["closed"] for c in chat.connections())


def test_a_final_answer_after_an_outage_ends_the_retries(context, proxy, transport, strangers):
    chat = Chat.open(context)
    refuse(proxy, 503)
    begin(chat.page, FOLLOW_SCRIPT, [transport, strangers, {"base": 100, "max": 200}, 8000])
    chat.page.wait_for_timeout(1000)
    proxy.forward()
    seen = outcome(chat.page)
    assert seen["error"] == [404, "No such session."]
    assert len(seen["delays"]) >= 2 and set(seen["statuses"]) == {503}  # retried the 503s...
    settled = len(chat.events_requests)
    chat.page.wait_for_timeout(500)
    assert len(chat.events_requests) == settled  # ...and not the 404
    assert all(c["closed"] for c in chat.connections())


def test_retries_are_bounded(context, proxy, transport):
    chat = Chat.open(context)
    key = uuid.uuid4().hex[:12]
    start_over_http(context, key, "Bounded")
    retry = {"base": 50, "max": 100, "attempts": 3}
    begin(chat.page, FOLLOW_SCRIPT, [transport, key, retry, 8000])
    chat.page.wait_for_function("() => window.__seen?.text")
    refuse(proxy, 503)
    seen = outcome(chat.page)
    # A WebSocket's failed handshake shows no status: only that nothing answered.
    assert seen["error"] and seen["error"][0] == (503 if transport == "sse" else 0), seen
    assert len(seen["delays"]) == 3
    assert all(25 <= delay <= 100 for delay in seen["delays"])  # jittered, capped
    assert all(c["closed"] for c in chat.connections())


@pytest.mark.parametrize("transport", ["sse"])
def test_a_429_is_retried_only_with_a_retry_after_and_not_sooner(context, proxy):
    # A WebSocket handshake's status is hidden from the page: only SSE sees a 429.
    chat = finished_chat(context, "Busy")
    key = chat.session_key()
    quick = {"base": 50, "max": 5000}
    refuse(proxy, 429)
    refused = chat.page.evaluate(FOLLOW_SCRIPT, ["sse", key, quick, 5000])
    assert refused["error"][0] == 429 and refused["delays"] == []
    refuse(proxy, 429, {"Retry-After": "1"})
    begin(chat.page, FOLLOW_SCRIPT, ["sse", key, quick, 8000])
    chat.page.wait_for_timeout(1500)
    proxy.forward()
    seen = outcome(chat.page)
    assert seen["done"] == "done" and seen["text"] == canned("Busy")
    assert seen["delays"] and all(delay >= 1000 for delay in seen["delays"])
    assert seen["elapsed"] >= 1500


@pytest.mark.parametrize("transport", ["sse"])
def test_stop_is_retried_through_an_outage(context, proxy):
    # Stopping is idempotent: asking again after no answer cannot do harm.
    key = uuid.uuid4().hex[:12]
    chat = Chat.open(context)
    chat.page.evaluate(
        """async (key) => {
             const { DetachedRuns } = await import("/static/detached_runs/detached-runs.js");
             await new DetachedRuns().start(key, "Stop me later");
           }""",
        key,
    )
    refuse(proxy, 503)
    begin(
        chat.page,
        """async (key) => {
             const { DetachedRuns } = await import("/static/detached_runs/detached-runs.js");
             return new DetachedRuns({ retry: { base: 100, max: 200 } }).stop(key);
           }""",
        key,
    )
    chat.page.wait_for_timeout(700)
    assert proxy.refused
    proxy.forward()
    assert outcome(chat.page) is True
    assert wait_until_finished(context, key)["status"] == "stopped"


@pytest.mark.parametrize("transport", ["sse"])
def test_a_delete_is_retried_through_an_outage(context, proxy):
    # Deleting twice does no more than once: a retry that finds the session
    # gone (its first attempt did it) resolves as well.
    key = uuid.uuid4().hex[:12]
    chat = Chat.open(context)
    start_over_http(context, key, "Delete me later")
    refuse(proxy, 503)
    begin(
        chat.page,
        """async (key) => {
             const { DetachedRuns } = await import("/static/detached_runs/detached-runs.js");
             const client = new DetachedRuns({ retry: { base: 100, max: 200 } });
             await client.delete(key);
             return "deleted";
           }""",
        key,
    )
    chat.page.wait_for_timeout(700)
    assert proxy.refused and all(line.startswith("DELETE") for line in proxy.refused)
    proxy.forward()
    assert outcome(chat.page) == "deleted"
    assert context.request.get(f"/runs/{key}/").status == 404

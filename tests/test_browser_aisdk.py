"""The demo's React page (``/react/``: ``useChat({resume: true})`` from
``@ai-sdk/react``, built with Vite from ``frontend/``) in headless Chromium
against a real daphne serving the demo with ``detached_runs.aisdk``: send,
reload mid-answer, stop, two quick sends, a question answered after a reload.

Skipped like `test_browser.py` without Playwright and Chromium, and without
the page's build (``./dev test`` makes it), unless CI requires them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from demo_project.agents import QUESTION

from .conftest import Server, stop_server
from .test_browser import (  # noqa: F401 - chromium, playwright: fixtures
    AGENT_DELAY,
    TIMEOUT,
    canned,
    chromium,
    playwright,
    serve_demo,
    wait_until_finished,
)

if not (Path(__file__).resolve().parent.parent / "demo_project/static/react/index.html").is_file():
    if os.environ.get("DETACHED_RUNS_REQUIRE_NODE") == "1":
        pytest.fail("the React page is not built (npm run build --prefix frontend)", pytrace=False)
    pytest.skip("the React page is not built (./dev test builds it)", allow_module_level=True)

from playwright.sync_api import Browser, BrowserContext, Page, expect

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["daphne", "uvicorn"])
def demo(request: Any, tmp_path_factory: Any) -> Iterator[Server]:
    """The demo site under daphne, then under uvicorn."""
    server = serve_demo(
        tmp_path_factory.mktemp("react") / "demo.sqlite3", AGENT_DELAY, kind=request.param
    )
    yield server
    stop_server(server)


@pytest.fixture
def context(chromium: Browser, demo: Server) -> Iterator[BrowserContext]:  # noqa: F811
    context = chromium.new_context(base_url=f"http://127.0.0.1:{demo.port}")
    context.set_default_timeout(TIMEOUT)
    yield context
    context.close()


class ReactChat:
    def __init__(self, page: Page) -> None:
        self.page = page

    @classmethod
    def open(cls, context: BrowserContext, url: str = "/react/") -> ReactChat:
        chat = cls(context.new_page())
        chat.page.goto(url)
        expect(chat.page.locator("#send")).to_be_visible()
        return chat

    @property
    def chat_id(self) -> str:
        return str(self.page.evaluate("new URLSearchParams(location.search).get('chat')"))

    def send(self, prompt: str) -> None:
        self.page.fill("#prompt", prompt)
        self.page.click("#send")

    def answer(self, index: int = -1) -> str:
        """The text of an assistant message (its text parts)."""
        return str(
            self.page.evaluate(
                """(index) => {
                     const all = document.querySelectorAll("li.assistant");
                     const message = all[index < 0 ? all.length + index : index];
                     return message ? [...message.querySelectorAll(".text")]
                       .map((part) => part.textContent).join("") : "";
                   }""",
                index,
            )
        )

    def wait_answer(self, full: str, index: int = -1) -> None:
        self.page.wait_for_function(
            """([full, index]) => {
                 const all = document.querySelectorAll("li.assistant");
                 const message = all[index < 0 ? all.length + index : index];
                 return message && [...message.querySelectorAll(".text")]
                   .map((part) => part.textContent).join("") === full;
               }""",
            arg=[full, index],
        )

    def wait_mid_answer(self, full: str) -> str:
        self.page.wait_for_function(
            """([low, high]) => {
                 const all = document.querySelectorAll("li.assistant .text");
                 const text = [...all].map((part) => part.textContent).join("");
                 return text.length >= low && text.length < high;
               }""",
            arg=[20, len(full) // 2],
        )
        return self.answer()

    def ready(self) -> None:
        expect(self.page.locator("#status")).to_have_attribute("data-status", "ready")


def test_a_prompt_streams_its_answer(context):
    chat = ReactChat.open(context)
    chat.send("hello")
    chat.wait_answer(canned("hello"))
    chat.ready()
    assert wait_until_finished(context, chat.chat_id)["status"] == "done"


def test_a_reload_mid_answer_continues_without_repeated_or_missing_words(context):
    chat = ReactChat.open(context)
    full = canned("reload me")
    chat.send("reload me")
    before = chat.wait_mid_answer(full)
    assert full.startswith(before)
    chat.page.reload()
    chat.wait_answer(full)
    chat.ready()
    assert chat.page.locator("li.assistant").count() == 1
    assert chat.page.locator("li.user").count() == 1


def test_stop_keeps_the_partial_answer(context):
    chat = ReactChat.open(context)
    full = canned("stop me")
    chat.send("stop me")
    chat.wait_mid_answer(full)
    chat.page.click("#stop")
    chat.ready()
    run = wait_until_finished(context, chat.chat_id)
    assert run["status"] == "stopped" and full.startswith(run["output"])
    chat.wait_answer(run["output"])
    chat.page.reload()  # the partial answer is the chat's, after a reload too
    chat.wait_answer(run["output"])


def test_two_quick_sends_end_with_the_second_answer(context):
    chat = ReactChat.open(context)
    chat.send("first")
    chat.wait_mid_answer(canned("first"))
    chat.send("second")
    chat.wait_answer(canned("second", turns=1))
    chat.ready()
    runs = context.request.get(f"/runs/{chat.chat_id}/runs/").json()["runs"]
    assert [(r["prompt"], r["status"]) for r in runs] == [("first", "stopped"), ("second", "done")]


def test_a_question_answered_after_a_reload_finishes_the_answer(context):
    chat = ReactChat.open(context)
    prompt = "please approve"
    chat.send(prompt)
    question = chat.page.locator(".question")
    expect(question).to_contain_text(str(QUESTION["question"]))
    chat.page.reload()
    expect(question).to_contain_text(str(QUESTION["question"]))
    question.locator(".yes").click()
    chat.wait_answer(canned(prompt))
    chat.ready()
    run = wait_until_finished(context, chat.chat_id)
    assert (run["status"], run["output"]) == ("done", canned(prompt))

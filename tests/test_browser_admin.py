"""The admin of runs in a real browser: headless Chromium driven by Playwright
against a real daphne serving the demo site (its static files too), at a
1280x800 screen. A running run's page shows its text growing without a
reload and stops asking once the run ended; the list of runs fits the screen.

Skipped like `test_browser.py` without Playwright and Chromium, unless CI
requires them.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Server, stop_server
from .test_browser import (  # noqa: F401 - chromium, playwright: fixtures
    TIMEOUT,
    chromium,
    playwright,
    serve_demo,
    start_over_http,
)

# isort: split
# Only once test_browser is imported: it skips the module without Playwright.
from playwright.sync_api import Browser, BrowserContext, Page, Request, ViewportSize, expect

pytestmark = pytest.mark.e2e

#: Seconds per word of the demo agent: its 154 words take about 30 s, long
#: enough to watch a run in flight (the test stops it).
AGENT_DELAY = "0.2"
SCREEN: ViewportSize = {"width": 1280, "height": 800}
LIST = "/admin/detached_runs/run/"

#: Runs whose every column is as wide as it gets in practice: a 64-character
#: session key, an anonymous owner, a long prompt of words and one without a
#: space, a million tokens, a cost to six decimals, minutes to a first token.
WIDE_RUNS = """
from datetime import timedelta
from django.utils import timezone
from detached_runs.models import Run
now = timezone.now()
for i in range(20):
    started = now - timedelta(minutes=i + 1)
    Run.objects.create(
        session_key="k" * 64,
        owner="anon:" + "f" * 32,
        prompt=("word " * 600) if i % 2 else "x" * 3000,
        output="y" * 10000,
        status="interrupted",
        started_at=started,
        first_token_at=started + timedelta(seconds=123.45),
        finished_at=now,
        usage={"input_tokens": 1234567, "output_tokens": 123456, "total_tokens": 1358023,
               "cost": 12.345678, "estimated": True},
    )
"""


def manage(server: Server, *args: str) -> None:
    subprocess.run(
        [sys.executable, "manage.py", *args],
        env=server.env,
        cwd=Path(__file__).resolve().parent.parent,
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: Any) -> Iterator[Server]:
    """The demo site, its superuser admin/admin, and `WIDE_RUNS` in its list."""
    server = serve_demo(tmp_path_factory.mktemp("admin") / "demo.sqlite3", AGENT_DELAY)
    try:
        manage(server, "demo_user")
        manage(server, "shell", "-c", WIDE_RUNS)
        yield server
    finally:
        stop_server(server)


def staff(chromium: Browser, port: int, *, nav_sidebar: bool = True) -> BrowserContext:  # noqa: F811
    """A 1280x800 browser logged in to the admin as the demo's superuser, with
    the admin's navigation sidebar open (its default) or collapsed (as its
    « toggle leaves it, for every admin page)."""
    context = chromium.new_context(base_url=f"http://127.0.0.1:{port}", viewport=SCREEN)
    context.set_default_timeout(TIMEOUT)
    if not nav_sidebar:
        context.add_init_script("localStorage.setItem('django.admin.navSidebarIsOpen', 'false');")
    page = context.new_page()
    page.goto("/admin/login/?next=/admin/")
    page.fill("#id_username", "admin")
    page.fill("#id_password", "admin")
    page.click("input[type=submit]")
    page.wait_for_url("**/admin/")
    page.close()
    return context


def output_of(page: Page) -> str:
    return str(page.locator(".field-output_text div.readonly").text_content())


def test_a_running_runs_page_shows_its_text_growing_without_a_reload(chromium, demo):  # noqa: F811
    context = staff(chromium, demo.port)
    try:
        start_over_http(context, "admin-live", "watch me")
        run = context.request.get("/runs/admin-live/").json()["run"]
        page = context.new_page()
        polls: list[str] = []

        def count(request: Request) -> None:
            if request.url.endswith(f"/{run['id']}/live/"):
                polls.append(request.url)

        page.on("request", count)
        page.goto(f"{LIST}{run['id']}/change/")
        expect(page.locator(".field-run_status div.readonly")).to_have_text("running")
        page.evaluate("window.__sameDocument = true")  # gone if the page reloads
        page.wait_for_function(
            "document.querySelector('.field-output_text div.readonly').textContent.length > 20"
        )
        seen = output_of(page)
        page.wait_for_function(
            """(seen) => {
                 const now = document.querySelector('.field-output_text div.readonly').textContent;
                 return now.length > seen.length && now.startsWith(seen);
               }""",
            arg=seen,
        )
        assert page.evaluate("window.__sameDocument") is True
        assert seen.startswith("You asked: “watch me”.")
        expect(page.locator(".detached-runs-events .detached-runs-event-start")).to_be_visible()
        expect(page.locator(".detached-runs-events .detached-runs-event-delta")).to_be_visible()

        token = next(c["value"] for c in context.cookies() if c["name"] == "csrftoken")
        stopped = context.request.post("/runs/admin-live/stop/", headers={"X-CSRFToken": token})
        assert stopped.json() == {"stopped": True}
        expect(page.locator(".field-run_status div.readonly")).to_have_text("stopped")
        expect(page.locator(".detached-runs-live")).to_contain_text("The run ended")
        expect(page.locator(".detached-runs-events .detached-runs-event-done")).to_be_visible()
        saved = context.request.get("/runs/admin-live/").json()["run"]
        assert output_of(page) == saved["output"]
        assert page.evaluate("window.__sameDocument") is True
        # It stopped asking: nothing more in three of its intervals.
        asked = len(polls)
        page.wait_for_timeout(3000)
        assert len(polls) == asked
    finally:
        context.close()


def columns_fit(page: Page) -> dict[str, Any]:
    """The list's widths: the page's, the table's and the box the table
    scrolls in (as wide as the table when nothing is hidden)."""
    widths: dict[str, Any] = page.evaluate(
        """() => {
             const box = document.querySelector('#changelist .results');
             return {page: document.documentElement.scrollWidth, screen: innerWidth,
                     table: document.querySelector('#result_list').scrollWidth,
                     box: box.clientWidth, right: box.getBoundingClientRect().right};
           }"""
    )
    return widths


def test_the_list_of_runs_fits_a_1280_px_screen(chromium, demo):  # noqa: F811
    context = staff(chromium, demo.port, nav_sidebar=False)
    try:
        page = context.new_page()
        page.goto(f"{LIST}?status__exact=interrupted")  # `WIDE_RUNS`
        expect(page.locator("#result_list tbody tr")).to_have_count(20)
        widths = columns_fit(page)
        assert widths["table"] <= widths["box"], widths  # every column in view
        assert widths["right"] <= widths["screen"] and widths["page"] <= widths["screen"], widths
        # Long values are cut short, whole in their title; times to the second.
        prompt = page.locator("#result_list td.field-prompt_excerpt span").first
        assert str(prompt.text_content()).endswith("…")
        assert len(str(prompt.get_attribute("title"))) == 1000
        started = str(page.locator("#result_list .field-started").first.text_content())
        assert time.strptime(started.strip(), "%Y-%m-%d %H:%M:%S")
        # With the navigation sidebar open the table scrolls in its box, the page does not.
        with_sidebar = staff(chromium, demo.port)
        try:
            page = with_sidebar.new_page()
            page.goto(f"{LIST}?status__exact=interrupted")
            widths = columns_fit(page)
            assert widths["page"] <= widths["screen"], widths
        finally:
            with_sidebar.close()
    finally:
        context.close()

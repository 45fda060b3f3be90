"""Take docs/demo.png: the demo chat mid-answer, with a couple of sessions.

Run from the checkout: ``.venv/bin/python docs/screenshot.py`` (needs Playwright
and /usr/bin/chromium, like tests/test_browser.py). It serves the demo under
daphne on a throw-away database; it is not part of the test suite.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "demo.png"


def serve(database: Path) -> tuple[subprocess.Popen[bytes], int]:
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="demo_project.settings",
        DJANGO_DEBUG="1",
        DEMO_SQLITE=str(database),
        DEMO_AGENT_DELAY="0.03",
    )
    env.pop("DATABASE_URL", None)
    env.pop("OPENAI_MODEL", None)  # the offline agent: the same picture every time
    manage = [sys.executable, "manage.py"]
    subprocess.run([*manage, "migrate", "--noinput"], env=env, cwd=ROOT, check=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    daphne = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(
        [*daphne, "demo_project.asgi:application"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server, port
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("daphne did not start") from None
            time.sleep(0.05)


def ask(page: Page, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.click("#send")


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        server, port = serve(Path(scratch) / "demo.sqlite3")
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path="/usr/bin/chromium", headless=True
                )
                page = browser.new_page(
                    viewport={"width": 1100, "height": 700}, base_url=f"http://127.0.0.1:{port}"
                )
                page.goto("/")
                page.wait_for_selector("#send:enabled")
                ask(page, "What is detached_runs for?")
                page.wait_for_function(  # the whole answer
                    "() => document.querySelector('.answer')?.textContent.endsWith('admin.')",
                    timeout=30_000,
                )
                page.click("#new")
                page.wait_for_selector("#send:enabled")
                ask(page, "Does the answer survive a reload?")
                page.wait_for_function(
                    "() => document.querySelector('.answer')?.textContent.length > 150"
                )
                page.reload()  # mid-answer: the picture shows the resumed stream
                page.wait_for_function(
                    "() => document.querySelector('.answer')?.textContent.length > 420"
                )
                page.screenshot(path=str(OUTPUT))
                browser.close()
        finally:
            server.terminate()
            server.wait(10)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

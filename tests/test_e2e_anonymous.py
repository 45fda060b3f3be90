"""End to end, under real daphne and uvicorn processes: anonymous visitors are
limited per client address, and a visitor who logs in keeps their chat.

Every client here connects from 127.0.0.1, so they all share one address, as
visitors behind one NAT do (or one abuser without cookies).
"""

from __future__ import annotations

import time
import uuid
from typing import Any
from urllib.parse import urlencode

import pytest
from django.contrib.auth import get_user_model

from detached_runs.conf import DEFAULTS
from detached_runs.models import Run

from .conftest import server_env, start_server, stop_server
from .http import Browser, text

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

#: The test server runs with the default.
LIMIT = DEFAULTS["MAX_ACTIVE_ANONYMOUS_RUNS_PER_ADDRESS"]
PASSWORD = "correct horse battery staple"


def new_key() -> str:
    return uuid.uuid4().hex[:12]


def make_user(*, staff: bool = False) -> Any:
    name = f"u{uuid.uuid4().hex[:8]}"
    return get_user_model().objects.create_user(name, password=PASSWORD, is_staff=staff)


def log_in(browser: Browser, user: Any) -> None:
    """Through the project's own async login view (``alogin``)."""
    reply = browser.request("POST", "/login/", {"username": user.username, "password": PASSWORD})
    assert reply.status == 200, reply.body
    browser.csrf = browser.cookies["csrftoken"]  # login rotates it, as a browser would see


def log_in_through_the_admin(browser: Browser, user: Any) -> None:
    """Through Django's admin login form (a sync view: ``login()`` in a thread)."""
    form = urlencode({"username": user.username, "password": PASSWORD, "next": "/admin/"})
    reply = browser.request(
        "POST",
        "/admin/login/?next=/admin/",
        form.encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert reply.status == 302, reply.body[:500]
    browser.csrf = browser.cookies["csrftoken"]


def wait_for_end(browser: Browser, key: str) -> dict[str, Any]:
    for _ in range(500):
        run = browser.request("GET", f"/runs/{key}/").json()["run"]
        if run["status"] != "running":
            return run
        time.sleep(0.02)
    raise AssertionError("still running")


@pytest.fixture(params=["daphne", "uvicorn"])
def own_server(request: Any, django_db_blocker: Any) -> Any:
    """A server of this test's own: the shared one also serves other modules'
    anonymous runs from 127.0.0.1, and one of theirs ending in the middle of
    the burst would free a place in the address's limit."""
    with django_db_blocker.unblock():
        env = server_env(TEST_AGENT_DELAY="0.02", TEST_KEEPALIVE="0.3", TEST_EVICT_AFTER="1")
    running = start_server(env, kind=request.param)
    yield running
    stop_server(running)


def test_thirty_cookieless_posts_get_at_most_the_limit_then_a_json_429(own_server):
    server = own_server
    browsers = [Browser(server.port) for _ in range(30)]
    keys = [new_key() for _ in browsers]
    replies = [
        b.request("POST", f"/runs/{k}/", {"prompt": "slow"})
        for b, k in zip(browsers, keys, strict=True)
    ]
    accepted = [i for i, reply in enumerate(replies) if reply.status == 202]
    member, member_key = Browser(server.port), new_key()
    try:
        assert 0 < len(accepted) <= LIMIT
        assert accepted == list(range(len(accepted)))  # the first ones, then none
        for reply in replies[len(accepted) :]:
            assert reply.status == 429
            assert reply.headers["Content-Type"] == "application/json"
            assert "Wait for one of them to finish, or log in." in reply.json()["error"]
        assert Run.objects.filter(session_key__in=keys).count() == len(accepted)
        # A refused visitor leaves no Django session behind either: only the
        # accepted ones got an owner id to keep.
        refused_sessions = [b.cookies.get("sessionid") for b in browsers[len(accepted) :]]
        assert refused_sessions == [None] * (30 - len(accepted))
        # A logged-in user at the same address is not limited by it.
        log_in(member, make_user())
        assert member.request("POST", f"/runs/{member_key}/", {"prompt": "slow"}).status == 202
    finally:
        for index in accepted:
            browsers[index].request("POST", f"/runs/{keys[index]}/stop/")
        member.request("POST", f"/runs/{member_key}/stop/")
    # Stopped, they give their places back.
    fresh = Browser(server.port)
    for _ in range(100):
        reply = fresh.request("POST", f"/runs/{new_key()}/", {"prompt": "1"})
        if reply.status == 202:
            break
        time.sleep(0.05)
    assert reply.status == 202


def test_after_logging_in_through_the_admin_the_anonymous_chat_is_the_users(server):
    browser, key = Browser(server.port), new_key()
    assert browser.request("POST", f"/runs/{key}/", {"prompt": "3"}).status == 202
    assert wait_for_end(browser, key)["output"] == "w0 w1 w2 "
    user = make_user(staff=True)
    log_in_through_the_admin(browser, user)
    reply = browser.request("GET", f"/runs/{key}/")
    assert reply.status == 200 and reply.json()["run"]["output"] == "w0 w1 w2 "
    events = browser.stream(f"/runs/{key}/events/")
    assert events.status == 200 and text(events.rest()) == "w0 w1 w2 "
    assert browser.request("POST", f"/runs/{key}/", {"prompt": "500"}).status == 202
    assert browser.request("POST", f"/runs/{key}/stop/").json() == {"stopped": True}
    assert wait_for_end(browser, key)["status"] == "stopped"
    rows = Run.objects.filter(session_key=key)
    assert {(r.owner, r.user_id) for r in rows} == {(f"user:{user.pk}", user.pk)}
    # Another browser, anonymous, still gets nothing of it.
    assert Browser(server.port).request("GET", f"/runs/{key}/").status == 404


def test_a_run_streaming_at_login_keeps_streaming_and_the_user_can_stop_it(server):
    browser, key = Browser(server.port), new_key()
    assert browser.request("POST", f"/runs/{key}/", {"prompt": "500"}).status == 202
    stream = browser.stream(f"/runs/{key}/events/")
    seen = stream.take(5)
    log_in(browser, make_user())
    seen += stream.take(3)  # the stream opened before the login goes on
    status = browser.request("GET", f"/runs/{key}/")
    assert status.status == 200 and status.json()["run"]["status"] == "running"
    resumed = browser.stream(f"/runs/{key}/events/", {"Last-Event-ID": seen[-1].id or ""})
    assert resumed.status == 200 and resumed.take(1)[0].event == "delta"
    assert browser.request("POST", f"/runs/{key}/stop/").json() == {"stopped": True}
    rest = stream.rest()
    assert rest[-1].data == {"status": "stopped"}
    assert resumed.rest()[-1].data == {"status": "stopped"}
    run = wait_for_end(browser, key)
    assert run["status"] == "stopped" and run["output"] == text(seen) + text(rest)
    assert browser.request("POST", f"/runs/{key}/", {"prompt": "2"}).status == 202
    assert wait_for_end(browser, key)["output"] == "w0 w1 "


def test_after_logout_the_user_keeps_the_chat_and_gets_it_back_at_the_next_login(server):
    browser, key = Browser(server.port), new_key()
    browser.request("POST", f"/runs/{key}/", {"prompt": "2"})
    user = make_user()
    log_in(browser, user)
    assert browser.request("POST", "/logout/").status == 200
    assert browser.request("GET", f"/runs/{key}/").status == 404
    log_in(browser, user)
    assert browser.request("GET", f"/runs/{key}/").status == 200

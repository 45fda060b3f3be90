"""Views in-process with Django's AsyncClient: owners, the error table, the admin."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import HttpCommunicator
from django.contrib.auth import get_user_model
from django.core.asgi import get_asgi_application
from django.db import OperationalError, connection
from django.db.backends.signals import connection_created
from django.http import HttpResponse, HttpResponseForbidden
from django.test import AsyncClient, Client

from detached_runs import runs
from detached_runs.models import Run
from detached_runs.runs import get_service

from .agents import forever

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def client() -> AsyncClient:
    return AsyncClient(enforce_csrf_checks=True)


def with_csrf(client: AsyncClient) -> dict[str, str]:
    client.cookies["csrftoken"] = "a" * 32
    return {"X-CSRFToken": "a" * 32}


async def user(name: str) -> Any:
    return await get_user_model().objects.acreate(username=name)


async def post(client: AsyncClient, path: str, data: Any = None, **kwargs: Any) -> Any:
    body = json.dumps(data) if data is not None else ""
    return await client.post(
        path, body, content_type="application/json", headers=with_csrf(client), **kwargs
    )


async def test_a_logged_in_user_owns_the_sessions_they_start(client, config):
    config(AGENT=forever)
    alice, bob = await user("alice"), await user("bob")
    await client.aforce_login(alice)
    reply = await post(client, "/runs/chat/", {"prompt": "hi"})
    assert reply.status_code == 202
    row = await Run.objects.aget(pk=reply.json()["id"])
    assert row.owner == f"user:{alice.pk}" and row.user_id == alice.pk
    other = AsyncClient(enforce_csrf_checks=True)
    await other.aforce_login(bob)
    assert (await other.get("/runs/chat/")).status_code == 404
    assert (await post(other, "/runs/chat/stop/")).status_code == 404
    assert (await client.get("/runs/chat/")).json()["run"]["status"] == "running"
    assert (await post(client, "/runs/chat/stop/")).json() == {"stopped": True}


async def test_without_allow_anonymous_a_visitor_who_is_not_logged_in_gets_403(client, config):
    config(ALLOW_ANONYMOUS=False)
    reply = await post(client, "/runs/chat/", {"prompt": "hi"})
    assert reply.status_code == 403 and reply.json() == {"error": "Log in first."}
    assert (await client.get("/runs/chat/")).status_code == 403
    assert await Run.objects.acount() == 0


async def test_an_anonymous_visitor_owns_sessions_through_the_django_session(client):
    reply = await post(client, "/runs/chat/", {"prompt": "3"})
    assert reply.status_code == 202
    assert "sessionid" in reply.cookies
    row = await Run.objects.aget(pk=reply.json()["id"])
    assert row.owner.startswith("anon:") and client.cookies["sessionid"].value not in row.owner
    assert (await client.get("/runs/chat/")).status_code == 200
    assert (await AsyncClient().get("/runs/chat/")).status_code == 404


async def test_a_form_post_starts_a_run_too(client):
    reply = await client.post("/runs/chat/", {"prompt": "2"}, headers=with_csrf(client))
    assert reply.status_code == 202
    assert (await Run.objects.aget(pk=reply.json()["id"])).prompt == "2"


async def test_post_without_a_csrf_token_is_403_json_and_starts_nothing(client):
    reply = await client.post(
        "/runs/chat/", json.dumps({"prompt": "x"}), content_type="application/json"
    )
    assert reply.status_code == 403
    assert reply.json()["error"].startswith("CSRF check failed: CSRF cookie not set.")
    assert await Run.objects.acount() == 0


FAILURE_VIEW_CALLS: list[str] = []


def failure_view(request: Any, reason: str = "") -> HttpResponse:
    """A project's CSRF failure view, which reads the database (a template
    with ``user.is_authenticated`` does)."""
    FAILURE_VIEW_CALLS.append(reason)
    return HttpResponseForbidden(f"{get_user_model().objects.count()} users")


async def test_a_csrf_refusal_says_why_and_never_runs_the_projects_failure_view(settings):
    """The project's CSRF_FAILURE_VIEW is sync code: run from this async view
    it made the refusal a 500 (it read the database), and the reason was
    lost. The JSON 403 carries Django's reason; the project's view is not
    called."""
    settings.CSRF_FAILURE_VIEW = "tests.test_views.failure_view"
    FAILURE_VIEW_CALLS.clear()
    client = AsyncClient(enforce_csrf_checks=True, raise_request_exception=False)
    reply = await client.post("/runs/chat/", {"prompt": "hi"})
    assert reply.status_code == 403 and FAILURE_VIEW_CALLS == []
    assert reply.json()["error"].startswith("CSRF check failed: CSRF cookie not set.")
    client.cookies["csrftoken"] = "a" * 32
    reply = await client.post("/runs/chat/", {"prompt": "hi"})
    assert reply.status_code == 403 and FAILURE_VIEW_CALLS == []
    assert reply.json()["error"].startswith("CSRF check failed: CSRF token missing.")


async def test_over_the_per_owner_limit_is_429(client, config):
    config(AGENT=forever, MAX_ACTIVE_RUNS_PER_OWNER=1)
    assert (await post(client, "/runs/a/", {"prompt": "x"})).status_code == 202
    reply = await post(client, "/runs/b/", {"prompt": "x"})
    assert reply.status_code == 429 and "limit is 1" in reply.json()["error"]


async def test_over_the_subscriber_limit_is_429(client, config):
    config(AGENT=forever, MAX_SUBSCRIBERS_PER_RUN=1)
    await post(client, "/runs/a/", {"prompt": "x"})
    first = await client.get("/runs/a/events/")
    assert first.status_code == 200
    second = await client.get("/runs/a/events/")
    assert second.status_code == 429
    await first.streaming_content.aclose()


async def test_a_database_that_refuses_the_start_is_503_and_nothing_runs(client):
    def refuse(execute: Any, sql: str, *args: Any) -> Any:
        if sql.lstrip().upper().startswith("INSERT") and "detached_runs_run" in sql:
            raise OperationalError("no space left on device (injected)")
        return execute(sql, *args)

    await sync_to_async(lambda: connection.execute_wrappers.append(refuse))()
    try:
        reply = await post(client, "/runs/chat/", {"prompt": "x"})
    finally:
        await sync_to_async(lambda: connection.execute_wrappers.remove(refuse))()
    assert reply.status_code == 503 and "database" in reply.json()["error"]
    assert await get_service().backend.get("chat") is None


async def asgi_get(path: str, cookies: dict[str, str]) -> dict[str, Any]:
    """A GET through Django's own ASGI handler, which (unlike AsyncClient's)
    gives each request a thread of its own, as under daphne or uvicorn."""
    cookie = "; ".join(f"{k}={v}" for k, v in cookies.items()).encode()
    communicator = HttpCommunicator(
        get_asgi_application(), "GET", path, headers=[(b"cookie", cookie)]
    )
    return await communicator.get_response(timeout=5)


async def test_requests_query_on_the_apps_database_thread_without_connecting(client, config):
    """A query on the request's own thread would open a database connection
    for that request and close it at its end: most of a resume's first byte."""
    config(AGENT=forever)
    assert (await post(client, "/runs/chat/", {"prompt": "x"})).status_code == 202
    cookies = {"sessionid": client.cookies["sessionid"].value}
    opened: list[str] = []

    def count(sender: Any, connection: Any, **kwargs: Any) -> None:
        opened.append(threading.current_thread().name)

    connection_created.connect(count)
    try:
        for path in ("/runs/chat/", "/runs/unknown/", "/runs/chat/"):
            reply = await asgi_get(path, cookies)  # the owner lookup, a row read
            assert reply["status"] == (404 if "unknown" in path else 200)
    finally:
        connection_created.disconnect(count)
    assert opened == []
    await runs.stop("chat")


async def test_after_the_database_dropped_the_connection_requests_reconnect(client, config):
    """The app's database thread keeps its connection, so nothing recycles it
    when the database restarts: one request may fail, the next must not."""
    config(AGENT=forever)
    assert (await post(client, "/runs/chat/", {"prompt": "x"})).status_code == 202
    subscription = await runs.subscribe("chat")
    await runs.stop("chat")
    assert [e async for e in subscription][-1].data == {"status": "stopped"}  # saved

    def drop() -> None:
        connection.ensure_connection()
        connection.connection.close()  # under Django's back, as a restart does

    await sync_to_async(drop)()
    first = await client.get("/runs/chat/")
    assert first.status_code in (200, 503)
    second = await client.get("/runs/chat/")
    assert second.status_code == 200 and second.json()["run"]["status"] == "stopped"


async def test_an_unset_agent_is_a_clean_500_not_a_traceback(client, config):
    config(AGENT=None)
    reply = await post(client, "/runs/chat/", {"prompt": "x"})
    assert reply.status_code == 500
    assert reply.json() == {"error": "The server is misconfigured."}


async def test_events_without_a_run_is_404_and_malformed_ids_are_400(client):
    assert (await client.get("/runs/none/events/")).status_code == 404
    await post(client, "/runs/chat/", {"prompt": "3"})
    reply = await client.get("/runs/chat/events/", headers={"Last-Event-ID": "x" * 500})
    assert reply.status_code == 400
    assert (await client.get("/runs/chat/events/?after=1-2")).status_code == 400


async def test_status_shows_the_latest_run(client):
    await post(client, "/runs/chat/", {"prompt": "3"})
    await asyncio.sleep(0.3)
    body = (await client.get("/runs/chat/")).json()
    assert body["session"] == "chat"
    assert set(body["run"]) >= {"id", "status", "prompt", "output", "started_at", "finished_at"}
    assert body["run"]["status"] == "done" and body["run"]["output"] == "w0 w1 w2 "


# -- the admin ------------------------------------------------------------------------


async def test_the_admin_lists_runs_and_its_action_stops_running_ones(config):
    config(AGENT=forever)
    admin = await get_user_model().objects.acreate_superuser("admin", "a@example.com", "pw")
    running = await runs.start("live", prompt="x")
    await runs.start("other", prompt="3", agent=None)
    client = Client()
    await sync_to_async(client.force_login)(admin)
    listing = await sync_to_async(client.get)("/admin/detached_runs/run/?status=running")
    assert listing.status_code == 200 and b"live" in listing.content
    detail = await sync_to_async(client.get)(f"/admin/detached_runs/run/{running.pk}/change/")
    assert detail.status_code == 200 and str(running.pk).encode() in detail.content
    reply = await sync_to_async(client.post)(
        "/admin/detached_runs/run/",
        {"action": "stop_runs", "_selected_action": [str(running.pk)]},
        follow=True,
    )
    assert reply.status_code == 200 and b"Stopped 1 run." in reply.content
    events = [e async for e in runs.subscribe("live")]
    assert events[-1].data == {"status": "stopped"}
    assert (await Run.objects.aget(pk=running.pk)).status == "stopped"
    assert (await sync_to_async(client.get)("/admin/detached_runs/run/add/")).status_code == 403


async def test_a_body_over_djangos_upload_limit_is_400_and_starts_nothing(client, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10_000
    reply = await post(client, "/runs/chat/", {"prompt": "x" * 20_000})
    assert reply.status_code == 400 and "too large" in reply.json()["error"]
    form = await client.post("/runs/chat/", {"prompt": "x" * 20_000}, headers=with_csrf(client))
    assert form.status_code == 400 and "too large" in form.json()["error"]
    assert await Run.objects.acount() == 0


async def test_an_unreachable_redis_is_503_with_a_clear_message(client, config, caplog):
    """The client is told to try again; the log says why, for the operator."""
    config(BACKEND="detached_runs.backends.redis.RedisBackend", REDIS_URL="redis://127.0.0.1:1/0")
    with caplog.at_level(logging.WARNING, logger="detached_runs"):
        reply = await post(client, "/runs/chat/", {"prompt": "x"})
    assert reply.status_code == 503 and "Redis" in reply.json()["error"]
    assert "127.0.0.1:1" not in reply.json()["error"]
    said = [r.getMessage() for r in caplog.records if r.name == "detached_runs.exceptions"]
    # The cause, readable: its class and its message (where it connected).
    assert any(
        "unreachable" in line and "cause: ConnectionError: " in line and "127.0.0.1:1" in line
        for line in said
    ), said
    assert (await client.get("/runs/chat/events/")).status_code == 503
    await get_service().backend.redis.aclose()  # type: ignore[attr-defined]


async def test_a_stream_dropped_before_it_was_read_releases_its_subscriber(config):
    import gc

    from detached_runs.views import _stream

    config(AGENT=forever)
    await runs.start("chat", prompt="x")
    log = await get_service().backend.current_log("chat")
    assert log is not None
    stream = _stream(await runs.subscribe("chat"), 15)
    assert log.subscribers == 1
    del stream  # the client vanished before Django read a byte of it
    gc.collect()
    assert log.subscribers == 0


@pytest.mark.parametrize("value", [1, "yes", None])
async def test_a_stop_whose_all_is_not_a_boolean_says_so(client, config, value):
    config(AGENT=forever)
    await post(client, "/runs/chat/", {"prompt": "hi"})
    reply = await post(client, "/runs/chat/stop/", {"all": value})
    assert reply.status_code == 400
    assert reply.json() == {"error": '"all" must be true or false.'}
    assert (await client.get("/runs/chat/")).json()["run"]["status"] == "running"
    reply = await post(client, "/runs/chat/stop/", ["all"])  # not an object
    assert reply.json() == {"error": 'Send nothing, or a JSON object: {"all": true}.'}
    assert (await post(client, "/runs/chat/stop/", {"all": True})).json() == {"stopped": True}

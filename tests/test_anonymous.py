"""Anonymous visitors: their runs are limited per client address (a new
anonymous owner per request must not escape every limit), and logging in
makes what they own the user's, runs in flight included.

In-process: the service, the views through Django's AsyncClient and the
consumer through Channels' WebsocketCommunicator, on the configured backend
(``TEST_BACKEND=redis`` runs them on Redis), plus the backends' own parts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.auth import login as channels_login
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AnonymousUser
from django.contrib.sessions.backends.db import SessionStore
from django.test import AsyncClient, Client

from detached_runs import runs
from detached_runs.backends.memory import MemoryBackend
from detached_runs.checks import check_settings
from detached_runs.conf import DEFAULTS
from detached_runs.exceptions import TooManyRuns
from detached_runs.models import Run
from detached_runs.owners import ANON_SESSION_KEY, address_group, adopt_scope_runs
from detached_runs.runs import get_service
from tests.asgi import application

from .agents import forever
from .conftest import Saves, collect, eventually, new_id

pytestmark = pytest.mark.django_db(transaction=True)

HOME = "203.0.113.7"  # one household's NAT, say


async def running_from(address: str) -> int:
    return await get_service().backend.count_running(address=address_group(address))


def csrf(client: AsyncClient | Client) -> dict[str, str]:
    client.cookies["csrftoken"] = "a" * 32
    return {"X-CSRFToken": "a" * 32}


async def post(client: AsyncClient, path: str, prompt: str | None = None) -> Any:
    body = json.dumps({"prompt": prompt}) if prompt is not None else ""
    return await client.post(path, body, content_type="application/json", headers=csrf(client))


class ClientAt(AsyncClient):
    """An AsyncClient whose requests come from ``address`` (``scope["client"]``)."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.address = address

    def _base_scope(self, **request: Any) -> dict[str, Any]:
        scope = super()._base_scope(**request)  # type: ignore[misc]
        return {**scope, "client": [self.address, 0]}


async def user(name: str) -> Any:
    return await get_user_model().objects.acreate(username=name)


# -- the address limit: the setting --------------------------------------------


def test_the_default_is_ten_and_a_wrong_value_is_a_system_check_error(settings):
    assert DEFAULTS["MAX_ACTIVE_ANONYMOUS_RUNS_PER_ADDRESS"] == 10
    for wrong in (0, -1, 2.5, "10", True):
        settings.DETACHED_RUNS = {
            "AGENT": "tests.agents.words",
            "MAX_ACTIVE_ANONYMOUS_RUNS_PER_ADDRESS": wrong,
        }
        messages = [m for m in check_settings() if m.id == "detached_runs.E004"]
        assert messages and "MAX_ACTIVE_ANONYMOUS_RUNS_PER_ADDRESS" in messages[0].msg
    settings.DETACHED_RUNS = {
        "AGENT": "tests.agents.words",
        "MAX_ACTIVE_ANONYMOUS_RUNS_PER_ADDRESS": None,
    }
    assert check_settings() == []


# -- the address limit: the service --------------------------------------------


@pytest.mark.parametrize(
    ("address", "group"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:DB8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("::1", "::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::ffff:203.0.113.7", "203.0.113.7"),  # IPv4 on a dual-stack socket
        ("203.0.113.7:5678", "203.0.113.7"),
        ("[2001:db8::3]", "2001:db8::/64"),
        ("[2001:db8::3]:443", "2001:db8::/64"),
        ("", None),
        (None, None),
        # Reported, but no address: one group for all, so that a client that
        # makes its address up (a forged proxy header) escapes nothing.
        ("unix:/run/daphne.sock", "unparsed"),
        ("not an address", "unparsed"),
        ("junk1", "unparsed"),
        ("010.000.000.001", "unparsed"),
    ],
)
def test_an_address_counts_as_itself_and_an_ipv6_address_as_its_64(address, group):
    assert address_group(address) == group


async def test_anonymous_runs_are_limited_per_client_address(config):
    config(MAX_ACTIVE_ANONYMOUS_RUNS_PER_ADDRESS=2)
    # A new anonymous owner per start: the per-owner limit never bites.
    for i in range(2):
        await runs.start(f"s{i}", prompt="x", owner=f"anon:{i}", agent=forever, address=HOME)
    with pytest.raises(TooManyRuns) as refused:
        await runs.start("s2", prompt="x", owner="anon:2", agent=forever, address=HOME)
    assert refused.value.status_code == 429
    assert str(refused.value) == (
        "There are 2 runs in flight from your network address without a login; the limit "
        "is 2. Wait for one of them to finish, or log in."
    )
    assert not await Run.objects.filter(session_key="s2").aexists()
    # Another address, a logged-in user at this one, and a trusted caller are not
    # limited by it.
    await runs.start("s3", prompt="x", owner="anon:3", agent=forever, address="203.0.113.8")
    await runs.start("s4", prompt="x", owner="user:1", agent=forever, address=HOME)
    await runs.start("s5", prompt="x", agent=forever)
    # A run that ends gives its place back.
    assert await runs.stop("s0") is True
    await eventually(lambda: _fewer_than(HOME, 2), "the stopped run still counts")
    await runs.start("s2", prompt="x", owner="anon:2", agent=forever, address=HOME)


async def _fewer_than(address: str, count: int) -> bool:
    return await running_from(address) < count


@pytest.mark.parametrize(
    ("first", "second", "shared"),
    [
        ("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:fffe", True),
        ("2001:db8:1:2::1", "2001:db8:1:3::1", False),
        ("::ffff:203.0.113.7", "203.0.113.7", True),
        ("203.0.113.7", "203.0.113.8", False),
    ],
)
async def test_an_ipv6_client_is_limited_per_64_prefix(config, first, second, shared):
    config(MAX_ACTIVE_ANONYMOUS_RUNS_PER_ADDRESS=1)
    await runs.start("a", prompt="x", owner="anon:a", agent=forever, address=first)
    if shared:
        with pytest.raises(TooManyRuns):
            await runs.start("b", prompt="x", owner="anon:b", agent=forever, address=second)
    else:
        await runs.start("b", prompt="x", owner="anon:b", agent=forever, address=second)


async def test_sending_again_in_a_session_replaces_its_run_and_is_not_counted_twice(config):
    config(MAX_ACTIVE_ANONYMOUS_RUNS_PER_ADDRESS=1)
    await runs.start("a", prompt="x", owner="anon:a", agent=forever, address=HOME)
    await runs.start("a", prompt="again", owner="anon:a", agent=forever, address=HOME)
    with pytest.raises(TooManyRuns):
        await runs.start("b", prompt="x", owner="anon:b", agent=forever, address=HOME)


async def test_concurrent_starts_from_one_address_do_not_overshoot_the_limit(config):
    config(MAX_ACTIVE_ANONYMOUS_RUNS_PER_ADDRESS=3)
    results = await asyncio.gather(
        *(
            runs.start(f"c{i}", prompt="x", owner=f"anon:{i}", agent=forever, address=HOME)
            for i in range(12)
        ),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 3
    assert all(isinstance(r, TooManyRuns) for r in results if isinstance(r, BaseException))


async def test_the_address_is_kept_with_the_run_in_the_backend_not_in_the_database(config):
    config(MAX_ACTIVE_ANONYMOUS_RUNS_PER_ADDRESS=5)
    await runs.start("a", prompt="x", owner="anon:a", agent=forever, address="2001:db8::5")
    await runs.start("b", prompt="x", owner="user:1", agent=forever, address="2001:db8::5")
    backend = get_service().backend
    state_a, state_b = await backend.get("a"), await backend.get("b")
    assert state_a is not None and state_a.meta["address"] == "2001:db8::/64"
    assert state_b is not None and "address" not in state_b.meta
    row = await Run.objects.aget(session_key="a")
    assert "2001" not in repr(row.__dict__)


async def test_none_switches_the_address_limit_off_and_keeps_no_address(config):
    config(MAX_ACTIVE_ANONYMOUS_RUNS_PER_ADDRESS=None)
    for i in range(12):
        await runs.start(f"s{i}", prompt="x", owner=f"anon:{i}", agent=forever, address=HOME)
    state = await get_service().backend.get("s0")
    assert state is not None and "address" not in state.meta


# -- the address limit: HTTP and WebSocket -------------------------------------


async def test_cookieless_posts_from_one_address_get_a_json_429_past_the_limit(config):
    config(AGENT=forever, MAX_ACTIVE_ANONYMOUS_RUNS_PER_ADDRESS=2)
    replies = [
        await post(AsyncClient(enforce_csrf_checks=True), f"/runs/s{i}/", "x") for i in range(5)
    ]
    assert [r.status_code for r in replies] == [202, 202, 429, 429, 429]
    assert replies[-1].json() == {
        "error": "There are 2 runs in flight from your network address without a login; "
        "the limit is 2. Wait for one of them to finish, or log in."
    }
    assert await Run.objects.acount() == 2
    # The address went along with the owner key, and stayed out of what is kept.
    state = await get_service().backend.get("s0")
    assert state is not None and state.meta["address"] == "127.0.0.1"
    assert type(state.meta["owner"]) is str
    elsewhere = ClientAt("2001:db8:7::1", enforce_csrf_checks=True)
    assert (await post(elsewhere, "/runs/t0/", "x")).status_code == 202
    neighbour = ClientAt("2001:db8:7::2", enforce_csrf_checks=True)
    assert (await post(neighbour, "/runs/t1/", "x")).status_code == 202
    same_64 = ClientAt("2001:db8:7:0:1::3", enforce_csrf_checks=True)
    assert (await post(same_64, "/runs/t2/", "x")).status_code == 429
    member = AsyncClient(enforce_csrf_checks=True)
    await member.aforce_login(await user("member"))
    assert (await post(member, "/runs/u/", "x")).status_code == 202


async def test_a_websocket_start_frame_over_the_address_limit_gets_an_error_frame(config):
    config(MAX_ACTIVE_ANONYMOUS_RUNS_PER_ADDRESS=1)
    owner = f"anon:{uuid.uuid4().hex}"
    store = SessionStore()
    await store.aset(ANON_SESSION_KEY, owner)
    await store.asave()
    await runs.start("mine", prompt="1", owner=owner)  # ends at once
    [event async for event in runs.subscribe("mine")]
    await runs.start("theirs", prompt="x", owner="anon:neighbour", agent=forever, address=HOME)
    cookie = f"sessionid={store.session_key}".encode()
    communicator = WebsocketCommunicator(
        application, "/ws/runs/mine/", headers=[(b"cookie", cookie)]
    )
    communicator.scope["client"] = [HOME, 50000]
    connected, _ = await communicator.connect()
    assert connected
    while (await communicator.receive_json_from(timeout=5))["event"] != "done":
        pass  # the replay of the finished run
    await communicator.send_json_to({"type": "start", "prompt": "2"})
    reply = await communicator.receive_json_from(timeout=5)
    assert reply["event"] == "error" and "log in" in reply["data"]["error"]
    assert await Run.objects.filter(session_key="mine").acount() == 1
    await communicator.disconnect()


# -- logging in ------------------------------------------------------------------


async def test_on_login_the_visitors_sessions_and_run_in_flight_become_the_users(config):
    config(AGENT=forever, MAX_ACTIVE_ANONYMOUS_RUNS_PER_ADDRESS=1)
    await runs.start("theirs", prompt="x", owner="anon:someone-else", agent=forever)
    client = AsyncClient(enforce_csrf_checks=True)
    assert (await post(client, "/runs/chat/", "x")).status_code == 202
    anon = (await Run.objects.aget(session_key="chat")).owner
    alice = await user("alice")
    await client.aforce_login(alice)  # alogin: user_logged_in
    assert (await Run.objects.aget(session_key="theirs")).owner == "anon:someone-else"
    row = await Run.objects.aget(session_key="chat")
    assert (row.owner, row.user_id) == (f"user:{alice.pk}", alice.pk)
    backend = get_service().backend
    state = await backend.get("chat")
    assert state is not None and state.meta["owner"] == f"user:{alice.pk}"
    assert "address" not in state.meta
    assert await backend.count_running(owner=f"user:{alice.pk}") == 1
    assert await backend.count_running(owner=anon) == 0
    assert await running_from("127.0.0.1") == 0  # no longer an anonymous run
    reply = await client.get("/runs/chat/")
    assert reply.status_code == 200 and reply.json()["run"]["status"] == "running"
    events: Any = await client.get("/runs/chat/events/")
    assert events.status_code == 200
    await events.streaming_content.aclose()
    assert (await post(client, "/runs/chat/stop/")).json() == {"stopped": True}
    assert (await post(client, "/runs/chat/", "again")).status_code == 202
    assert await (await client.asession()).aget(ANON_SESSION_KEY) is None
    assert await Run.objects.filter(owner=anon).acount() == 0


async def test_a_sync_login_in_a_thread_adopts_through_the_servers_loop(config):
    config(AGENT=forever)
    client = Client(enforce_csrf_checks=True)
    anonymous = AsyncClient(enforce_csrf_checks=True)
    assert (await post(anonymous, "/runs/chat/", "x")).status_code == 202
    client.cookies = anonymous.cookies
    bob = await user("bob")
    await sync_to_async(client.force_login)(bob)  # login(): a sync receiver in a thread
    state = await get_service().backend.get("chat")
    assert state is not None and state.meta["owner"] == f"user:{bob.pk}"
    assert await runs.stop("chat", owner=bob) is True


def test_a_login_in_a_process_without_an_event_loop_adopts_the_rows(caplog):
    # A WSGI process, a management command: no loop of this process holds runs
    # (the memory backend has none here; a backend of its own reaches Redis).
    owner = f"anon:{uuid.uuid4().hex}"
    Run.objects.create(session_key="chat", owner=owner, prompt="x", status="done")
    store = SessionStore()
    store[ANON_SESSION_KEY] = owner
    store.save()
    client = Client()
    client.cookies["sessionid"] = str(store.session_key)
    gina = get_user_model().objects.create(username="gina")
    with caplog.at_level(logging.WARNING, logger="detached_runs"):
        client.force_login(gina)  # login(): user_logged_in, in this very thread
    assert Run.objects.get().owner == f"user:{gina.pk}"
    assert not caplog.records


async def test_a_finished_run_in_its_grace_period_is_adopted_too(config):
    client = AsyncClient(enforce_csrf_checks=True)
    assert (await post(client, "/runs/chat/", "3")).status_code == 202
    anon = (await Run.objects.aget()).owner
    [event async for event in runs.subscribe("chat", owner=anon)]
    carol = await user("carol")
    await client.aforce_login(carol)
    reply = await client.get("/runs/chat/")
    assert reply.status_code == 200 and reply.json()["run"]["output"] == "w0 w1 w2 "
    assert (await client.get("/runs/chat/events/")).status_code == 200
    assert (await post(client, "/runs/chat/", "2")).status_code == 202


async def test_after_logout_the_user_keeps_the_sessions_and_a_new_visitor_id_starts(config):
    client = AsyncClient(enforce_csrf_checks=True)
    await post(client, "/runs/chat/", "2")
    dave = await user("dave")
    await client.aforce_login(dave)
    await client.alogout()  # the session is flushed
    assert (await client.get("/runs/chat/")).status_code == 404
    assert (await post(client, "/runs/other/", "2")).status_code == 202
    owners = {r.session_key: r.owner async for r in Run.objects.all()}
    assert owners["chat"] == f"user:{dave.pk}" and owners["other"].startswith("anon:")
    await client.aforce_login(dave)
    assert (await client.get("/runs/other/")).status_code == 200
    assert (await client.get("/runs/chat/")).status_code == 200


async def test_logging_in_over_a_websocket_scope_adopts_with_adopt_scope_runs(config):
    store = SessionStore()
    owner = f"anon:{uuid.uuid4().hex}"
    await store.aset(ANON_SESSION_KEY, owner)
    await store.asave()
    await runs.start("chat", prompt="x", owner=owner, agent=forever)
    erin = await user("erin")
    scope: dict[str, Any] = {"session": store, "user": AnonymousUser()}
    await channels_login(scope, erin, backend="django.contrib.auth.backends.ModelBackend")
    assert await adopt_scope_runs(scope) == 1
    assert (await Run.objects.aget()).owner == f"user:{erin.pk}"
    assert await runs.stop("chat", owner=erin) is True
    saved = SessionStore(session_key=store.session_key)
    assert await saved.aget(ANON_SESSION_KEY) is None
    assert await adopt_scope_runs(scope) == 0  # nothing left to adopt


# -- the backends' part ------------------------------------------------------------


async def test_memory_backend_counts_by_address_and_adopt_moves_its_runs(saves: Saves):
    backend = MemoryBackend(evict_after=0.2)
    gate = asyncio.Event()

    async def waiting() -> AsyncIterator[str]:
        await gate.wait()
        yield "x"

    meta = {"owner": "anon:a", "address": "203.0.113.7"}
    await backend.start("s", new_id(), waiting(), start_data={}, meta=meta, finalize=saves)
    await backend.start(
        "t", new_id(), waiting(), start_data={}, meta={"owner": "anon:b"}, finalize=saves
    )
    assert await backend.count_running(address="203.0.113.7") == 1
    assert await backend.count_running("anon:a") == 1  # positional owner, as before
    with pytest.raises(TypeError):
        await backend.count_running()
    assert await backend.adopt("anon:a", "user:1", ["s"]) == 1
    state = await backend.get("s")
    assert state is not None and state.meta == {"owner": "user:1"}
    assert await backend.count_running(owner="user:1") == 1
    assert await backend.count_running(owner="anon:a") == 0
    assert await backend.count_running(address="203.0.113.7") == 0
    gate.set()
    await collect(await backend.subscribe("s"))
    assert await backend.count_running(owner="user:1") == 0
    await backend.shutdown(1)

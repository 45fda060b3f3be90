"""The WebSocket consumer, through Channels' own WebsocketCommunicator and the
project's real ASGI stack (origin check, auth and session middleware)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.contrib.sessions.backends.db import SessionStore
from django.test import Client

from detached_runs import runs
from detached_runs.models import Run
from detached_runs.owners import ANON_SESSION_KEY
from detached_runs.runs import get_service
from tests.asgi import application

from .agents import forever

pytestmark = pytest.mark.django_db(transaction=True)

OWNER = "anon:0123456789abcdef0123456789abcdef"


async def cookie_for(owner: str) -> str:
    store = SessionStore()
    await store.aset(ANON_SESSION_KEY, owner)
    await store.asave()
    return f"sessionid={store.session_key}"


async def connect(key: str, cookie: str | None = None, query: str = "") -> WebsocketCommunicator:
    headers = [(b"cookie", cookie.encode())] if cookie else []
    communicator = WebsocketCommunicator(application, f"/ws/runs/{key}/{query}", headers=headers)
    connected, _ = await communicator.connect()
    assert connected
    return communicator


async def frames_until_done(communicator: WebsocketCommunicator) -> list[dict[str, Any]]:
    frames = []
    while True:
        frame = await communicator.receive_json_from(timeout=5)
        frames.append(frame)
        if frame.get("event") == "done":
            return frames


async def closed_with(communicator: WebsocketCommunicator) -> int:
    message = await communicator.receive_output(timeout=5)
    assert message["type"] == "websocket.close"
    return int(message["code"])


def text(frames: list[dict[str, Any]]) -> str:
    return "".join(f["data"]["text"] for f in frames if f["event"] == "delta")


WORDS_20 = "".join(f"w{i} " for i in range(20))


async def test_connect_replays_then_follows_the_run_live():
    cookie = await cookie_for(OWNER)
    run = await runs.start("chat", prompt="20", owner=OWNER)
    await asyncio.sleep(0.05)  # some words exist before the socket connects
    communicator = await connect("chat", cookie)
    frames = await frames_until_done(communicator)
    assert frames[0] == {
        "id": frames[0]["id"],
        "event": "start",
        "data": {"run": str(run.id), "prompt": "20"},
    }
    assert text(frames) == WORDS_20
    assert frames[-1]["data"] == {"status": "done"}
    assert set(frames[1]) == {"id", "event", "data"}
    assert await communicator.receive_nothing(timeout=0.1)  # stays open after done
    await communicator.disconnect()


async def test_a_finished_run_replays_compactly():
    cookie = await cookie_for(OWNER)
    await runs.start("chat", prompt="200", owner=OWNER)
    [e async for e in runs.subscribe("chat")]
    communicator = await connect("chat", cookie)
    frames = await frames_until_done(communicator)
    assert [f["event"] for f in frames] == ["start", "delta", "done"]
    await communicator.disconnect()


@pytest.mark.parametrize("owner", [None, "anon:someone-else"])
async def test_a_foreign_session_closes_with_4404(owner):
    await runs.start("taken", prompt="x", owner=OWNER, agent=forever)
    cookie = await cookie_for(owner) if owner else None
    communicator = await connect("taken", cookie)
    assert await closed_with(communicator) == 4404


@pytest.mark.parametrize("owner", [None, "anon:someone-else"])
async def test_a_session_finished_and_saved_by_another_owner_closes_with_4404(owner):
    await Run.objects.acreate(session_key="saved", owner=OWNER, prompt="x", status="done")
    cookie = await cookie_for(owner) if owner else None
    communicator = await connect("saved", cookie)
    assert await closed_with(communicator) == 4404


async def test_a_socket_for_a_new_session_waits_idle_and_its_start_frame_creates_it():
    cookie = await cookie_for(OWNER)
    communicator = await connect("brand-new", cookie)
    assert await communicator.receive_nothing(timeout=0.2)  # open, idle: no close
    await communicator.send_json_to({"type": "start", "prompt": "3"})
    frames = await frames_until_done(communicator)
    assert frames[0]["event"] == "start"
    assert text(frames) == "w0 w1 w2 "
    row = await Run.objects.aget(session_key="brand-new")
    assert (row.owner, row.status, row.output) == (OWNER, "done", "w0 w1 w2 ")
    # Now it is this owner's: a stranger's socket is refused.
    stranger = await connect("brand-new", await cookie_for("anon:someone-else"))
    assert await closed_with(stranger) == 4404
    await communicator.disconnect()


async def test_an_idle_socket_answers_stop_and_resume_with_an_error_frame_and_stays_open():
    communicator = await connect("brand-new", await cookie_for(OWNER))
    for frame in ({"type": "stop"}, {"type": "resume", "after": None}):
        await communicator.send_json_to(frame)
        reply = await communicator.receive_json_from(timeout=5)
        assert reply == {"event": "error", "data": {"error": "No such session.", "status": 404}}
    assert await communicator.receive_nothing(timeout=0.1)
    await communicator.disconnect()


async def test_a_start_frame_on_a_session_taken_meanwhile_by_another_owner_is_an_error():
    communicator = await connect("contested", await cookie_for(OWNER))
    assert await communicator.receive_nothing(timeout=0.2)  # connected, idle
    await runs.start("contested", prompt="x", owner="anon:someone-else", agent=forever)
    await communicator.send_json_to({"type": "start", "prompt": "mine"})
    reply = await communicator.receive_json_from(timeout=5)
    assert reply == {"event": "error", "data": {"error": "No such session.", "status": 404}}
    await communicator.disconnect()


async def test_a_bad_session_key_closes_with_4400():
    communicator = await connect("bad%20key")
    assert await closed_with(communicator) == 4400


async def test_not_logged_in_without_allow_anonymous_closes_with_4403(config):
    config(ALLOW_ANONYMOUS=False)
    communicator = await connect("chat")
    assert await closed_with(communicator) == 4403


async def test_a_logged_in_user_follows_their_own_session():
    user = await get_user_model().objects.acreate(username="alice")
    client = Client()
    await sync_to_async(client.force_login)(user)
    await runs.start("mine", prompt="3", owner=user)
    communicator = await connect("mine", f"sessionid={client.cookies['sessionid'].value}")
    assert text(await frames_until_done(communicator)) == "w0 w1 w2 "
    await communicator.disconnect()


async def test_a_start_frame_starts_a_run_and_the_socket_follows_it():
    cookie = await cookie_for(OWNER)
    await runs.start("chat", prompt="2", owner=OWNER)
    communicator = await connect("chat", cookie)
    first = await frames_until_done(communicator)
    await communicator.send_json_to({"type": "start", "prompt": "3"})
    second = await frames_until_done(communicator)
    assert second[0]["event"] == "start" and second[0]["data"]["prompt"] == "3"
    assert second[0]["data"]["run"] != first[0]["data"]["run"]
    assert text(second) == "w0 w1 w2 "
    assert await Run.objects.filter(session_key="chat").acount() == 2
    await communicator.disconnect()


async def test_a_start_frame_during_a_run_stops_it_and_follows_the_new_one():
    cookie = await cookie_for(OWNER)
    old = await runs.start("chat", prompt="x", owner=OWNER, agent=forever)
    communicator = await connect("chat", cookie)
    assert (await communicator.receive_json_from())["event"] == "start"
    await communicator.send_json_to({"type": "start", "prompt": "2"})
    frames: list[dict[str, Any]] = []
    while not frames or frames[-1]["event"] != "done" or frames[-1]["data"] != {"status": "done"}:
        frames.append(await communicator.receive_json_from(timeout=5))
    new_start = [f for f in frames if f["event"] == "start"][-1]
    assert new_start["data"]["prompt"] == "2"
    assert (await Run.objects.aget(pk=old.pk)).status == "stopped"
    await communicator.disconnect()


async def frames_until_done_of(
    communicator: WebsocketCommunicator, run_id: str
) -> list[dict[str, Any]]:
    """Frames up to the ``done`` of the run whose uuid is ``run_id``."""
    run_hex = run_id.replace("-", "")
    frames = []
    while True:
        frame = await communicator.receive_json_from(timeout=5)
        frames.append(frame)
        if frame["event"] == "done" and frame["id"].startswith(run_hex + ":"):
            return frames


async def rows_of(session_key: str, count: int) -> list[Run]:
    """The session's rows, oldest first, once there are ``count`` (a start frame's
    run is created while the test goes on)."""
    for _ in range(500):
        rows = [r async for r in Run.objects.filter(session_key=session_key).order_by("started_at")]
        if len(rows) >= count:
            return rows
        await asyncio.sleep(0.01)
    raise AssertionError(f"session {session_key} did not get {count} runs")


def by_run(frames: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The event types each run's frames carried, per run, in order of arrival
    (consecutive deltas counted as one: how text is batched depends on timing)."""
    runs_seen: dict[str, list[str]] = {}
    for frame in frames:
        kinds = runs_seen.setdefault(frame["id"].partition(":")[0], [])
        if not (frame["event"] == "delta" and kinds and kinds[-1] == "delta"):
            kinds.append(frame["event"])
    return runs_seen


async def test_a_start_frame_during_a_run_delivers_the_old_runs_end_before_the_new_run():
    cookie = await cookie_for(OWNER)
    old = await runs.start("chat", prompt="x", owner=OWNER, agent=forever)
    communicator = await connect("chat", cookie)
    seen = [await communicator.receive_json_from(), await communicator.receive_json_from()]
    assert [f["event"] for f in seen] == ["start", "delta"]  # "thinking "
    await communicator.send_json_to({"type": "start", "prompt": "2"})
    new = (await rows_of("chat", 2))[1]
    frames = seen + await frames_until_done_of(communicator, str(new.id))
    # The old run's end reaches the socket, then the whole new run: in order,
    # each run's frames contiguous, no id twice, one done each.
    assert by_run(frames) == {
        old.id.hex: ["start", "delta", "done"],
        new.id.hex: ["start", "delta", "done"],
    }
    order = [f["id"].partition(":")[0] for f in frames]
    assert order == [old.id.hex] * 3 + [new.id.hex] * (len(frames) - 3)
    assert frames[2]["data"] == {"status": "stopped"}
    assert frames[3]["data"] == {"run": str(new.id), "prompt": "2"}
    assert text(frames[3:]) == "w0 w1 "
    assert frames[-1]["data"] == {"status": "done"}
    assert len({f["id"] for f in frames}) == len(frames)
    assert await communicator.receive_nothing(timeout=0.1)
    await communicator.disconnect()


async def test_rapid_start_frames_deliver_every_runs_end_in_order():
    cookie = await cookie_for(OWNER)
    first = await runs.start("chat", prompt="x", owner=OWNER, agent=forever)
    communicator = await connect("chat", cookie)
    assert (await communicator.receive_json_from())["event"] == "start"
    for prompt in ("x second", "3"):
        await communicator.send_json_to({"type": "start", "prompt": prompt})
    rows = await rows_of("chat", 3)
    assert rows[0].pk == first.pk
    frames = await frames_until_done_of(communicator, str(rows[2].id))
    order = [f["id"].partition(":")[0] for f in frames]
    assert order == sorted(order, key=[r.id.hex for r in rows].index)  # run after run
    dones = [f for f in frames if f["event"] == "done"]
    assert [d["data"]["status"] for d in dones] == ["stopped", "stopped", "done"]
    assert [d["id"].partition(":")[0] for d in dones] == [r.id.hex for r in rows]
    assert len({f["id"] for f in frames}) == len(frames)
    await communicator.disconnect()


async def test_a_stop_frame_stops_the_run_and_its_done_event_follows():
    cookie = await cookie_for(OWNER)
    run = await runs.start("chat", prompt="x", owner=OWNER, agent=forever)
    communicator = await connect("chat", cookie)
    await communicator.receive_json_from()  # start
    await communicator.receive_json_from()  # "thinking "
    await communicator.send_json_to({"type": "stop"})
    frames = await frames_until_done(communicator)
    assert frames[-1]["data"] == {"status": "stopped"}
    row = await Run.objects.aget(pk=run.pk)
    assert row.status == "stopped" and row.output == "thinking "
    await communicator.disconnect()


async def test_a_runs_log_lines_name_it_one_way_so_one_grep_finds_them(caplog):
    caplog.set_level(logging.INFO, logger="detached_runs")
    cookie = await cookie_for(OWNER)
    run = await runs.start("chat", prompt="x", owner=OWNER, agent=forever)
    communicator = await connect("chat", cookie)
    await communicator.receive_json_from()  # start
    await communicator.send_json_to({"type": "stop"})
    await frames_until_done(communicator)
    await communicator.disconnect()
    story = [r.getMessage() for r in caplog.records if run.id.hex in r.getMessage()]
    assert [m.split(": ")[0].rsplit(" ", 1)[-1] for m in story] == ["started", "stopping", "ended"]
    assert not [r for r in caplog.records if str(run.id) in r.getMessage()]


async def test_a_resume_frame_gets_only_what_follows_its_id():
    cookie = await cookie_for(OWNER)
    await runs.start("chat", prompt="20", owner=OWNER)
    communicator = await connect("chat", cookie)
    frames = await frames_until_done(communicator)
    middle = [f for f in frames if f["event"] == "delta"][5]
    await communicator.send_json_to({"type": "resume", "after": middle["id"]})
    rest = await frames_until_done(communicator)
    seen = frames[: frames.index(middle) + 1]
    assert text(seen) + text(rest) == WORDS_20
    assert rest[0]["event"] == "delta"
    await communicator.disconnect()


async def test_after_in_the_query_resumes_on_connect():
    cookie = await cookie_for(OWNER)
    await runs.start("chat", prompt="20", owner=OWNER)
    events = [e async for e in runs.subscribe("chat")]
    communicator = await connect("chat", cookie, query=f"?after={events[3].id}")
    rest = await frames_until_done(communicator)
    assert "".join(e.data.get("text", "") for e in events[:4]) + text(rest) == WORDS_20
    await communicator.disconnect()


async def test_bad_frames_get_an_error_event_the_socket_stays_open_and_nothing_changes():
    cookie = await cookie_for(OWNER)
    run = await runs.start("chat", prompt="x", owner=OWNER, agent=forever)
    communicator = await connect("chat", cookie)
    await communicator.receive_json_from()  # start
    await communicator.receive_json_from()  # "thinking "
    bad: list[Any] = [
        "not json {",
        json.dumps([1, 2]),
        json.dumps({"type": "explode"}),
        json.dumps({"no": "type"}),
        json.dumps({"type": "start"}),
        json.dumps({"type": "start", "prompt": 42}),
        json.dumps({"type": "start", "prompt": ""}),
        json.dumps({"type": "start", "prompt": "x" * 40_000}),
        json.dumps({"type": "resume", "after": "forged"}),
        json.dumps({"type": "resume", "after": 12}),
    ]
    for frame in bad:
        await communicator.send_to(text_data=frame)
        reply = await communicator.receive_json_from(timeout=5)
        assert reply["event"] == "error" and isinstance(reply["data"]["error"], str), frame
        assert set(reply) == {"event", "data"}
    await communicator.send_to(bytes_data=b"\x00\x01")
    assert (await communicator.receive_json_from(timeout=5))["event"] == "error"
    assert await Run.objects.acount() == 1
    live = await runs.status("chat")
    assert live is not None and live.status == "running" and live.id == run.id
    await communicator.send_json_to({"type": "stop"})  # still listening
    assert (await frames_until_done(communicator))[-1]["data"] == {"status": "stopped"}
    await communicator.disconnect()


async def test_an_error_frame_carries_the_status_an_http_request_would_get(config):
    config(MAX_QUEUED_PER_SESSION=1)
    cookie = await cookie_for(OWNER)
    await runs.start("chat", prompt="x", owner=OWNER, agent=forever)
    await runs.start("chat", prompt="y", owner=OWNER, multitask="enqueue")
    communicator = await connect("chat", cookie)
    await communicator.receive_json_from()  # start
    await communicator.receive_json_from()  # "thinking "
    replies = []
    for frame in (
        {"type": "start", "prompt": "x", "multitask": "reject"},  # a run in flight
        {"type": "start", "prompt": "x", "multitask": "enqueue"},  # the queue is full
        {"type": "explode"},
    ):
        await communicator.send_json_to(frame)
        replies.append((await communicator.receive_json_from(timeout=5))["data"])
    assert [reply["status"] for reply in replies] == [409, 429, 400]
    assert "in flight" in replies[0]["error"] and "queued" in replies[1]["error"]
    await communicator.disconnect()


async def test_an_over_long_prompt_gets_the_prompt_limit_message_as_over_http(config):
    config(MAX_PROMPT_CHARS=100, MAX_OPTIONS_BYTES=100)
    cookie = await cookie_for(OWNER)
    await runs.start("chat", prompt="1", owner=OWNER)
    communicator = await connect("chat", cookie)
    await frames_until_done(communicator)
    # Far past twice the limit (what used to trip a bare "frame is too large").
    for prompt in ("x" * 101, "x" * 2_000, "é" * 300):
        await communicator.send_json_to({"type": "start", "prompt": prompt})
        reply = await communicator.receive_json_from(timeout=5)
        message = f"The prompt is too long ({len(prompt)} characters; the limit is 100)."
        assert reply == {"event": "error", "data": {"error": message, "status": 400}}
    assert await Run.objects.acount() == 1
    await communicator.disconnect()


async def test_a_prompt_within_the_limit_is_accepted_however_json_escapes_it(config):
    config(MAX_PROMPT_CHARS=1_000)
    cookie = await cookie_for(OWNER)
    await runs.start("chat", prompt="1", owner=OWNER)
    communicator = await connect("chat", cookie)
    await frames_until_done(communicator)
    prompt = "2 " + "\U0001f600" * 998  # json.dumps writes each as 12 characters
    await communicator.send_json_to({"type": "start", "prompt": prompt})
    frames = await frames_until_done(communicator)
    assert frames[0]["event"] == "start" and frames[0]["data"]["prompt"] == prompt
    assert text(frames) == "w0 w1 "
    await communicator.disconnect()


async def test_an_absurd_frame_is_refused_unread_naming_the_prompt_limit(config):
    config(MAX_PROMPT_CHARS=100, MAX_OPTIONS_BYTES=100, MAX_INPUT_BYTES=50)
    cookie = await cookie_for(OWNER)
    await runs.start("chat", prompt="1", owner=OWNER)
    communicator = await connect("chat", cookie)
    await frames_until_done(communicator)
    frame = json.dumps({"type": "start", "prompt": "x" * 5_000})
    await communicator.send_to(text_data=frame)
    reply = await communicator.receive_json_from(timeout=5)
    assert reply["event"] == "error"
    assert reply["data"]["error"] == (
        f"The frame is too large ({len(frame)} characters); "
        "a prompt may have at most 100 characters, its options 100 bytes of JSON, "
        "an answer's value 50."
    )
    assert await Run.objects.acount() == 1
    await communicator.disconnect()


async def test_closing_the_socket_drops_the_subscriber_and_the_run_goes_on(config):
    config(EVICT_AFTER=0.1)
    cookie = await cookie_for(OWNER)
    run = await runs.start("chat", prompt="30", owner=OWNER)
    communicator = await connect("chat", cookie)
    await communicator.receive_json_from()
    await communicator.disconnect()
    events = [e async for e in runs.subscribe("chat")]
    assert events[-1].data == {"status": "done"}
    await asyncio.sleep(0.3)
    # The dropped subscriber was released, so the run was evicted on time.
    assert await get_service().backend.get("chat") is None
    row = await Run.objects.aget(pk=run.pk)
    assert row.output == "".join(f"w{i} " for i in range(30))


async def test_a_socket_that_lags_gets_what_piled_up_merged():
    cookie = await cookie_for(OWNER)
    gate = asyncio.Event()

    async def bursty(ctx: Any) -> AsyncIterator[str]:
        await gate.wait()
        for i in range(500):
            yield f"b{i} "

    await runs.start("chat", prompt="x", owner=OWNER, agent=bursty)
    communicator = await connect("chat", cookie)
    assert (await communicator.receive_json_from())["event"] == "start"
    gate.set()  # 500 words arrive at once: the socket reads them as one batch
    frames = await frames_until_done(communicator)
    assert text(frames) == "".join(f"b{i} " for i in range(500))
    assert len(frames) < 10
    await communicator.disconnect()


async def test_a_socket_whose_user_logged_out_over_http_is_closed_at_its_next_frame():
    """What a socket may do was decided at its handshake, for that login: a
    logout since then ends it (4403), and the browser connects again as who
    it is now."""
    user = await get_user_model().objects.acreate(username="alice")
    client = Client()
    await sync_to_async(client.force_login)(user)
    await runs.start("mine", prompt="2", owner=user)
    communicator = await connect("mine", f"sessionid={client.cookies['sessionid'].value}")
    await frames_until_done(communicator)
    await sync_to_async(client.logout)()
    await communicator.send_json_to({"type": "start", "prompt": "3"})
    assert await closed_with(communicator) == 4403
    assert await Run.objects.filter(session_key="mine").acount() == 1  # nothing started


async def test_a_socket_opened_before_a_login_is_closed_at_its_next_frame():
    """A login cycles the session key (Django keeps the data under a new one):
    the socket's session is gone, and so is the anonymous owner it had."""
    store = SessionStore()
    await store.aset(ANON_SESSION_KEY, OWNER)
    await store.asave()
    await runs.start("chat", prompt="2", owner=OWNER)
    communicator = await connect("chat", f"sessionid={store.session_key}")
    await frames_until_done(communicator)
    await sync_to_async(store.cycle_key)()
    await communicator.send_json_to({"type": "stop"})
    assert await closed_with(communicator) == 4403

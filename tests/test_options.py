"""Options sent with a prompt (`detached_runs.validation`), the agent's
``ctx.options`` and ``ctx.user``, the queue's WebSocket frames and the
admin's cancel action, in process (the end-to-end tests are in
`test_e2e_multitask.py`)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.test import Client
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from detached_runs import runs
from detached_runs.exceptions import BadMultitask, BadOptions
from detached_runs.models import Run
from detached_runs.validation import clean_options, validate_multitask, validate_options

from .agents import forever, numbered
from .conftest import as_stored

pytestmark = pytest.mark.django_db(transaction=True)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.one_of(json_values.filter(lambda v: not isinstance(v, dict)), st.sets(st.integers())))
def test_anything_but_a_json_object_is_refused(value):
    if value is None:
        assert validate_options(value) == {}
        return
    with pytest.raises(BadOptions, match="must be a JSON object"):
        validate_options(value)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)
@given(st.dictionaries(st.text(), json_values, max_size=6))
@example({"big": 9.93063082179097e16})  # PostgreSQL's jsonb gives it back as an int
def test_any_json_object_comes_out_storable_or_is_refused_for_its_size(options):
    """Lone surrogates, NUL, NaN and all: what passes is JSON every database
    stores (saved and read back the same), what does not is too large."""
    try:
        cleaned = validate_options(options)
    except BadOptions as exc:
        assert "too large" in str(exc)
        return
    text = json.dumps(cleaned, ensure_ascii=False, allow_nan=False)
    assert "\x00" not in text
    text.encode()  # no lone surrogate
    run = Run.objects.create(session_key="s", prompt="p", options=cleaned)
    assert as_stored(Run.objects.get(pk=run.pk).options) == as_stored(cleaned)
    run.delete()


def test_the_bound_is_of_the_json_in_utf8_bytes(config):
    config(MAX_OPTIONS_BYTES=30)
    exact = {"k": "é" * 11}  # {"k":"...."} is 8 + 22 bytes
    assert validate_options(exact) == exact
    with pytest.raises(BadOptions, match=r"too large \(32 bytes of JSON; the limit is 30\)"):
        validate_options({"k": "é" * 12})


def sync_hook(options: dict[str, Any], owner: str) -> dict[str, Any]:
    if "attachment" in options and not options["attachment"].startswith(owner):
        raise ValidationError(["Not your attachment.", "Upload it again."])
    return {**options, "checked_by": "sync"}


def not_a_dict(options: dict[str, Any], owner: str) -> Any:
    return ["model"]


async def test_a_sync_hook_runs_and_its_validation_errors_are_the_message(config):
    config(VALIDATE_OPTIONS=sync_hook)
    assert await clean_options({"a": 1}, "user:1") == {"a": 1, "checked_by": "sync"}
    with pytest.raises(BadOptions, match=r"\ANot your attachment\. Upload it again\.\Z"):
        await clean_options({"attachment": "user:2/x"}, "user:1")


async def test_a_hook_that_returns_no_dict_is_a_misconfiguration(config):
    config(VALIDATE_OPTIONS=not_a_dict)
    with pytest.raises(ImproperlyConfigured, match="returned list"):
        await clean_options({}, "")


def test_multitask_defaults_to_the_setting_and_refuses_the_unknown(config):
    assert validate_multitask(None) == "interrupt"
    config(MULTITASK="enqueue")
    assert validate_multitask(None) == "enqueue"
    for bad in ("Enqueue", "", 1, ["reject"]):
        with pytest.raises(BadMultitask):
            validate_multitask(bad)


async def test_the_agent_gets_the_user_who_started_the_run_and_the_options():
    user = await get_user_model().objects.acreate_user("ada", password="pw")
    await runs.start("ctx", prompt="context", owner=user, options={"model": "m"})
    events = [e async for e in runs.subscribe("ctx", owner=user)]
    context = next(e for e in events if e.event == "context")
    assert context.data == {"options": {"model": "m"}, "user": "ada"}
    # An owner key names the user too (the views pass one).
    await runs.start("ctx2", prompt="context", owner=f"user:{user.pk}")
    events = [e async for e in runs.subscribe("ctx2", owner=user)]
    assert next(e for e in events if e.event == "context").data["user"] == "ada"


async def shouting(ctx: Any) -> Any:
    yield ctx.prompt.upper()


async def test_a_queued_run_started_by_this_process_runs_the_agent_it_was_given():
    first = await runs.start("q", prompt="3", agent=forever)
    queued = await runs.start("q", prompt="hello", multitask="enqueue", agent=shouting)
    assert (first.status, queued.status) == ("running", "queued")
    assert await runs.stop("q")
    followed = [e async for e in runs.subscribe("q")]
    assert followed[-1].data == {"status": "stopped"}
    # Past the end of the stopped run, a subscriber follows the queued one.
    events = [e async for e in runs.subscribe("q", after=followed[-1].id)]
    assert events[0].data["run"] == str(queued.pk)
    assert [e.data.get("text") for e in events[1:-1]] == ["HELLO"]


async def test_the_admin_cancels_queued_runs_and_leaves_running_ones(config):
    config(AGENT=forever)
    admin = await get_user_model().objects.acreate_superuser("admin", "a@example.com", "pw")
    running = await runs.start("adm", prompt="x")
    queued = await runs.start("adm", prompt="y", multitask="enqueue")
    client = Client()
    await sync_to_async(client.force_login)(admin)
    listing = await sync_to_async(client.get)("/admin/detached_runs/run/?status=queued")
    assert listing.status_code == 200 and str(queued.pk)[:8].encode() in listing.content
    reply = await sync_to_async(client.post)(
        "/admin/detached_runs/run/",
        {"action": "cancel_queued_runs", "_selected_action": [str(running.pk), str(queued.pk)]},
        follow=True,
    )
    assert b"Cancelled 1 queued run." in reply.content
    assert (await Run.objects.aget(pk=queued.pk)).status == "stopped"
    assert (await Run.objects.aget(pk=running.pk)).status == "running"
    assert await runs.stop("adm")


async def test_a_websocket_that_queues_a_run_follows_it_after_the_run_in_flight():
    from .test_consumers import OWNER, connect, cookie_for, frames_until_done

    cookie = await cookie_for(OWNER)
    await runs.start("wsq", prompt="5", owner=OWNER)
    socket = await connect("wsq", cookie)
    await socket.send_json_to(
        {"type": "start", "prompt": "context", "multitask": "enqueue", "options": {"n": 2}}
    )
    first = await frames_until_done(socket)
    second = await frames_until_done(socket)
    assert first[0]["event"] == "start" and first[0]["data"]["prompt"] == "5"
    assert "".join(f["data"].get("text", "") for f in first) == "".join(numbered(5))
    assert second[0]["data"]["prompt"] == "context"
    context = next(f for f in second if f["event"] == "context")
    assert context["data"]["options"] == {"n": 2}
    assert second[-1]["data"] == {"status": "done"}
    # A bad frame: an error, and the socket stays.
    await socket.send_json_to({"type": "start", "prompt": "x", "multitask": "later"})
    error = await socket.receive_json_from(timeout=5)
    assert error["event"] == "error" and "multitask" in error["data"]["error"]
    await socket.send_json_to({"type": "stop", "all": "yes"})
    error = await socket.receive_json_from(timeout=5)
    assert error["data"]["error"] == '"all" must be true or false.'
    await socket.disconnect()
    assert await Run.objects.filter(session_key="wsq").acount() == 2

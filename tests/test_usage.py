"""Usage accounting (`detached_runs.usage`, and its recording): the rules of a
report, reports yielded and reported without yielding, merged into the row at
every end and with every checkpoint, the time of the first token; with a real
database and the suite's backend (memory, or Redis under TEST_BACKEND=redis)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detached_runs import rows, runs
from detached_runs.models import Run
from detached_runs.runs import get_service
from detached_runs.usage import (
    MAX_COUNT,
    MAX_USAGE_BYTES,
    MAX_USAGE_DEPTH,
    TOKEN_KEYS,
    clean_usage,
    estimate_tokens,
    merge_usage,
    usage_size,
)

from .conftest import as_stored, ended, text_of

pytestmark = pytest.mark.django_db(transaction=True)


async def follow(session: str) -> list[Any]:
    async with asyncio.timeout(10):
        return [event async for event in runs.subscribe(session)]


def usage_events(events: list[Any]) -> list[dict[str, Any]]:
    return [event.data for event in events if event.event == "usage"]


def merged(reports: list[dict[str, Any]]) -> dict[str, Any]:
    usage: dict[str, Any] = {}
    for report in reports:
        usage = merge_usage(usage, report)
    return usage


# -- the rules of a report -----------------------------------------------------------


def test_a_report_with_the_usual_keys_is_kept_as_it_is():
    report = {
        "input_tokens": 12,
        "output_tokens": 30,
        "total_tokens": 42,
        "model": "gpt-x",
        "cost": 0.0012,
        "estimated": False,
        "details": {"cached_tokens": 5, "tiers": [1, 2]},
    }
    assert clean_usage(report) == report


@pytest.mark.parametrize(
    ("report", "rule"),
    [
        ([1, 2], "JSON object"),
        ("12 tokens", "JSON object"),
        (None, "JSON object"),
        ({"input_tokens": -1}, "input_tokens must be a whole number"),
        ({"output_tokens": 1.5}, "output_tokens must be a whole number"),
        ({"total_tokens": True}, "total_tokens must be a whole number"),
        ({"input_tokens": "12"}, "input_tokens must be a whole number"),
        ({"input_tokens": MAX_COUNT + 1}, "input_tokens must be a whole number"),
        ({"cost": float("nan")}, "cost must be a number"),
        ({"cost": float("inf")}, "cost must be a number"),
        ({"cost": -0.5}, "cost must be a number"),
        ({"model": 4}, "model must be a string"),
        ({"model": "m" * 201}, "model must be a string"),
        ({"estimated": "yes"}, "estimated must be true or false"),
        ({"note": "x" * MAX_USAGE_BYTES}, f"over {MAX_USAGE_BYTES}"),
        ({"a": {"b": {"c": {"d": {"e": 1}}}}}, f"nested more than {MAX_USAGE_DEPTH}"),
        ({"a": [[[[1]]]]}, f"nested more than {MAX_USAGE_DEPTH}"),
        ({"a": {1: 2}}, "string keys"),
        ({"a": {1, 2}}, "not JSON"),
        ({"a": object()}, "not JSON"),
    ],
)
def test_a_report_that_breaks_a_rule_is_refused_naming_the_rule(report, rule):
    with pytest.raises(ValueError, match=rule):
        clean_usage(report)


def test_text_is_cleaned_and_floats_json_cannot_hold_become_null_in_other_keys():
    report = clean_usage({"model": "m\x00\ud800", "latency": float("nan"), "pair": (1, 2)})
    assert report == {"model": "m\ufffd\ufffd", "latency": None, "pair": [1, 2]}


def test_the_estimate_is_a_token_per_four_characters_rounded_up():
    assert [estimate_tokens(n) for n in (0, 1, 4, 5, 400)] == [0, 1, 1, 2, 100]
    assert estimate_tokens("abcdefgh") == 2


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
_json_ish = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=8) | st.integers(0, 3), inner, max_size=4)
    ),
    max_leaves=20,
)
_reports = (
    st.dictionaries(
        st.sampled_from([*TOKEN_KEYS, "cost", "model", "estimated"]) | st.text(max_size=8),
        _json_ish,
        max_size=6,
    )
    | _json_ish
    | st.text(max_size=5000).map(lambda s: {"note": s})
)


@settings(max_examples=300, deadline=None)
@given(_reports)
def test_any_report_is_refused_with_a_value_error_or_kept_within_every_rule(report):
    try:
        usage = clean_usage(report)
    except ValueError:
        return
    encoded = json.dumps(usage, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    assert len(encoded.encode()) <= MAX_USAGE_BYTES == 4096
    assert usage_size(usage) == len(encoded.encode())
    assert json.loads(encoded) == usage  # plain JSON data, the same on every copy
    for key in TOKEN_KEYS:
        if key in usage:
            assert type(usage[key]) is int and 0 <= usage[key] <= MAX_COUNT
    if "cost" in usage:
        assert math.isfinite(usage["cost"]) and 0 <= usage["cost"] <= MAX_COUNT
    assert "\x00" not in encoded


# -- through a run -------------------------------------------------------------------


async def test_usage_events_pass_to_clients_and_their_merge_is_saved_at_the_end():
    async def agent(ctx: Any) -> AsyncIterator[Any]:
        yield {"event": "usage", "data": {"input_tokens": 10, "model": "m1"}}
        yield "Hello "
        yield {"event": "usage", "data": {"output_tokens": 2, "model": "m2"}}
        yield "there."

    await runs.start("chat", prompt="hi", agent=agent)
    events = await follow("chat")
    assert usage_events(events) == [
        {"input_tokens": 10, "model": "m1"},
        {"output_tokens": 2, "model": "m2"},
    ]
    row = await ended("chat")
    assert row.status == "done" and row.output == "Hello there."
    assert row.usage == {"input_tokens": 10, "output_tokens": 2, "model": "m2"}
    assert row.as_json()["usage"] == row.usage


async def test_an_error_run_keeps_the_usage_reported_before_the_error():
    async def agent(ctx: Any) -> AsyncIterator[Any]:
        yield "partial "
        yield {"event": "usage", "data": {"input_tokens": 7, "output_tokens": 1}}
        await asyncio.sleep(0)
        raise RuntimeError("boom")

    await runs.start("chat", prompt="hi", agent=agent)
    row = await ended("chat")
    assert row.status == "error" and row.usage == {"input_tokens": 7, "output_tokens": 1}


async def test_usage_reported_in_the_agents_finally_when_stopped_is_logged_and_saved():
    """A stop cancels the agent at its await: it cannot yield any more, but
    ``ctx.report_usage`` in its ``finally`` still counts, for clients too."""
    started = asyncio.Event()

    async def agent(ctx: Any) -> AsyncIterator[Any]:
        written = ""
        try:
            for word in ("one ", "two "):
                written += word
                yield word
            started.set()
            await asyncio.sleep(3600)
        finally:
            ctx.report_usage({"output_tokens": len(written.split()), "estimated": True})

    await runs.start("chat", prompt="hi", agent=agent)
    subscription = await runs.subscribe("chat")
    await started.wait()
    assert await runs.stop("chat") is True
    async with asyncio.timeout(10):
        events = [event async for event in subscription]
    assert [e.event for e in events][-2:] == ["usage", "done"]
    assert events[-1].data == {"status": "stopped"}
    row = await ended("chat")
    assert row.status == "stopped" and row.usage == {"output_tokens": 2, "estimated": True}


async def test_usage_reported_during_aclose_at_a_yield_is_saved_too():
    """An agent that swallows the cancellation and yields again is closed at
    that yield (``aclose``: GeneratorExit); its ``finally`` reports."""

    async def agent(ctx: Any) -> AsyncIterator[Any]:
        try:
            yield "one "
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass  # a stubborn agent: it goes on after the stop
            yield "two "
            await asyncio.sleep(3600)
        finally:
            ctx.report_usage({"output_tokens": 2})

    await runs.start("chat", prompt="hi", agent=agent)
    subscription = await runs.subscribe("chat")
    async with asyncio.timeout(10):
        seen: list[Any] = []
        while not text_of(seen):
            seen += await subscription.next_batch()
        assert await runs.stop("chat") is True
        events = seen + [event async for event in subscription]
    assert usage_events(events) == [{"output_tokens": 2}]
    row = await ended("chat")
    assert row.status == "stopped" and row.usage == {"output_tokens": 2}


async def test_reports_made_mid_run_are_logged_before_the_next_item_in_order():
    async def agent(ctx: Any) -> AsyncIterator[Any]:
        ctx.report_usage({"input_tokens": 3})
        yield "a"
        ctx.report_usage({"output_tokens": 1})
        yield {"event": "usage", "data": {"output_tokens": 5}}
        ctx.report_usage({"cost": 0.5})

    await runs.start("chat", prompt="hi", agent=agent)
    events = await follow("chat")
    kinds = [(e.event, e.data) for e in events if e.event in ("usage", "delta")]
    assert kinds == [
        ("usage", {"input_tokens": 3}),
        ("delta", {"text": "a"}),
        ("usage", {"output_tokens": 1}),
        ("usage", {"output_tokens": 5}),
        ("usage", {"cost": 0.5}),
    ]
    assert (await ended("chat")).usage == {"input_tokens": 3, "output_tokens": 5, "cost": 0.5}


async def test_a_bad_report_is_dropped_with_a_warning_and_the_answer_goes_on(caplog):
    caplog.set_level(logging.WARNING, logger="detached_runs")

    async def agent(ctx: Any) -> AsyncIterator[Any]:
        yield {"event": "usage", "data": {"input_tokens": "many"}}
        yield {"event": "usage", "data": [1, 2, 3]}
        ctx.report_usage({"cost": float("nan")})
        ctx.report_usage("12 tokens")  # not a mapping
        yield "still here"
        yield {"event": "usage", "data": {"input_tokens": 4}}

    run = await runs.start("chat", prompt="hi", agent=agent)
    events = await follow("chat")
    assert usage_events(events) == [{"input_tokens": 4}]
    row = await ended("chat")
    assert (row.status, row.output, row.usage) == ("done", "still here", {"input_tokens": 4})
    dropped = [r.getMessage() for r in caplog.records if "dropped a usage report" in r.getMessage()]
    assert len(dropped) == 4 and all(run.id.hex in line for line in dropped)
    assert "input_tokens must be a whole number" in dropped[0]
    assert "JSON object" in dropped[1]


async def test_a_report_that_would_take_the_runs_usage_over_the_bound_is_dropped(caplog):
    caplog.set_level(logging.WARNING, logger="detached_runs")
    piece = "x" * (MAX_USAGE_BYTES // 2)

    async def agent(ctx: Any) -> AsyncIterator[Any]:
        yield {"event": "usage", "data": {"a": piece}}
        yield {"event": "usage", "data": {"b": piece}}  # each fits, not both
        yield {"event": "usage", "data": {"a": "short", "c": 1}}

    await runs.start("chat", prompt="hi", agent=agent)
    events = await follow("chat")
    assert usage_events(events) == [{"a": piece}, {"a": "short", "c": 1}]
    assert (await ended("chat")).usage == {"a": "short", "c": 1}
    assert "over 4096" in caplog.text


async def test_usage_and_the_first_token_are_checkpointed_while_the_run_goes_on(config):
    """The first token's time is when it was logged, not when a checkpoint
    (every 1 s here) wrote it."""
    config(CHECKPOINT_EVERY=1.0)
    yielded: list[Any] = []

    async def agent(ctx: Any) -> AsyncIterator[Any]:
        await asyncio.sleep(0.3)
        yield {"event": "usage", "data": {"input_tokens": 9}}
        yielded.append(timezone.now())
        yield "first "
        yielded.append(timezone.now())
        await asyncio.sleep(3600)

    run = await runs.start("chat", prompt="hi", agent=agent)
    row = await Run.objects.aget(pk=run.pk)
    assert row.first_token_at is None and row.usage == {}
    for _ in range(300):
        row = await Run.objects.aget(pk=run.pk)
        if row.output:
            break
        await asyncio.sleep(0.01)
    assert row.status == "running" and row.output == "first "
    assert row.usage == {"input_tokens": 9}
    assert row.first_token_at is not None
    assert yielded[0] <= row.first_token_at <= yielded[1]
    assert row.updated_at - row.first_token_at > timedelta(seconds=0.4)
    await runs.stop("chat")
    final = await ended("chat")
    assert final.first_token_at == row.first_token_at and final.usage == {"input_tokens": 9}


async def test_a_run_without_text_has_no_first_token_and_empty_usage():
    async def agent(ctx: Any) -> AsyncIterator[Any]:
        yield {"event": "tool_call", "data": {"name": "x"}}

    await runs.start("chat", prompt="hi", agent=agent)
    row = await ended("chat")
    assert row.status == "done" and row.first_token_at is None and row.usage == {}


async def test_a_shutdown_saves_the_usage_of_the_runs_it_interrupts():
    ready = asyncio.Event()

    async def agent(ctx: Any) -> AsyncIterator[Any]:
        try:
            yield {"event": "usage", "data": {"input_tokens": 5}}
            yield "thinking "
            ready.set()
            await asyncio.sleep(3600)
        finally:
            ctx.report_usage({"output_tokens": 1, "estimated": True})

    await runs.start("chat", prompt="hi", agent=agent)
    await ready.wait()
    await get_service().shutdown(5)
    row = await ended("chat")
    assert row.status == "interrupted"
    assert row.usage == {"input_tokens": 5, "output_tokens": 1, "estimated": True}
    assert row.first_token_at is not None


async def test_an_orphaned_row_keeps_the_usage_of_its_last_checkpoint():
    old = timezone.now() - timedelta(minutes=5)
    await Run.objects.acreate(
        session_key="dead",
        prompt="p",
        output="half",
        usage={"input_tokens": 3},
        first_token_at=old,
        started_at=old,
        updated_at=old,
    )
    status = await runs.status("dead")
    assert status is not None and status.status == "interrupted"
    assert status.usage == {"input_tokens": 3} and status.first_token_at == old


async def test_the_live_status_shows_the_usage_so_far():
    ready = asyncio.Event()

    async def agent(ctx: Any) -> AsyncIterator[Any]:
        yield {"event": "usage", "data": {"input_tokens": 11}}
        ready.set()
        await asyncio.sleep(3600)

    await runs.start("chat", prompt="hi", agent=agent)
    await ready.wait()
    await asyncio.sleep(0.05)
    live = await runs.status("chat")
    assert live is not None and live.status == "running"
    assert live.as_json()["usage"] == {"input_tokens": 11}
    await runs.stop("chat")


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(_reports, max_size=5))
def test_whatever_usage_an_agent_reports_the_run_ends_done_with_the_merge_clients_got(reports):
    from asgiref.sync import async_to_sync

    async def agent(ctx: Any) -> AsyncIterator[Any]:
        for index, report in enumerate(reports):
            if index % 2:
                ctx.report_usage(report)
            else:
                yield {"event": "usage", "data": report}
            yield "w "

    async def scenario() -> None:
        get_service().reset()  # a backend of this example's own event loop
        try:
            await runs.start("prop", prompt="hi", agent=agent)
            events = await follow("prop")
            row = await ended("prop")
            await Run.objects.filter(session_key="prop").adelete()
        finally:
            await get_service().shutdown(2)
        assert events[-1].data == {"status": "done"}
        assert row.status == "done" and row.output == "w " * len(reports)
        assert as_stored(row.usage) == as_stored(merged(usage_events(events)))
        assert usage_size(row.usage) <= MAX_USAGE_BYTES

    async_to_sync(scenario)()


# -- the checkpoint statement --------------------------------------------------------


def test_checkpoints_write_usage_as_json_and_the_first_token_on_this_database():
    first = timezone.now().replace(microsecond=123000)
    rich = {"input_tokens": 2**53 - 1, "model": "😀 naïve", "nested": {"list": [1, None, "x"]}}
    a = Run.objects.create(session_key="a", prompt="p")
    b = Run.objects.create(session_key="b", prompt="p")
    refused = rows.write_checkpoints(
        [
            rows.Checkpoint(a.pk, "out a", "id-a", rich, first),
            rows.Checkpoint(b.pk, "out b", "id-b", {}, None),
        ]
    )
    assert refused == set()
    a.refresh_from_db()
    b.refresh_from_db()
    assert (a.output, a.usage, a.first_token_at) == ("out a", rich, first)
    assert (b.output, b.usage, b.first_token_at) == ("out b", {}, None)
    # The JSON is JSON to the database itself: key transforms read it.
    assert Run.objects.filter(usage__input_tokens=2**53 - 1).get() == a
    assert Run.objects.filter(usage__nested__list__2="x").get() == a


def test_a_reaped_runs_usage_is_its_logs_merged_over_its_last_checkpoint():
    row = Run.objects.create(session_key="a", prompt="p", usage={"input_tokens": 5, "cost": 1})
    first = timezone.now().replace(microsecond=0)
    saved, ended_here = rows.save_reaped(
        str(row.pk), "text", "", usage={"cost": 2, "output_tokens": 3}, first_token_at=first
    )
    assert ended_here and saved is not None and saved.status == "interrupted"
    assert saved.usage == {"input_tokens": 5, "cost": 2, "output_tokens": 3}
    assert saved.first_token_at == first
    # A checkpoint's first token is kept: it came from the same worker.
    other = Run.objects.create(session_key="b", prompt="p", first_token_at=first)
    saved, _ = rows.save_reaped(str(other.pk), "", "", first_token_at=first + timedelta(1))
    assert saved is not None and saved.first_token_at == first
    # An end saved already is not changed.
    rows.save_reaped(str(row.pk), "other", "", usage={"cost": 9})
    row.refresh_from_db()
    assert row.usage["cost"] == 2 and row.output == "text"

"""The conversations' pages and cursors (`detached_runs.listing`) against a real
database: keyset paging walked to the end (Hypothesis, with runs that start in
the same microsecond), titles, and cursors and limits that are not ours."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detached_runs import listing
from detached_runs.exceptions import BadCursor, BadLimit
from detached_runs.listing import Point
from detached_runs.models import Run

BASE = datetime(2026, 1, 1, tzinfo=UTC)
SESSIONS = ["a", "b", "c", "d"]
OWNERS = ["user:1", "user:2"]

#: A run as (session, owner, second, microsecond): few distinct instants, so
#: that many runs start at the same one (the keyset's ``id`` breaks the ties).
runs_strategy = st.lists(
    st.tuples(
        st.sampled_from(SESSIONS),
        st.sampled_from(OWNERS),
        st.integers(0, 3),
        st.sampled_from([0, 1, 999_999]),
    ),
    max_size=30,
)
examples = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def fill(runs: list[tuple[str, str, int, int]]) -> list[Run]:
    Run.objects.all().delete()
    return Run.objects.bulk_create(
        Run(
            session_key=session,
            owner=owner,
            prompt=f"prompt {index} of {session}",
            status="done",
            started_at=BASE + timedelta(seconds=second, microseconds=micro),
        )
        for index, (session, owner, second, micro) in enumerate(runs)
    )


def database_order() -> Any:
    """A sort key: where a run is in the database's order of ``(started_at,
    id)``, the order the keyset follows. (Not Python's order of UUIDs:
    MariaDB's native ``uuid`` type sorts them by another arrangement of their
    bytes.)"""
    pks = Run.objects.order_by("started_at", "id").values_list("pk", flat=True)
    rank = {pk: index for index, pk in enumerate(pks)}
    return lambda run: rank[run.pk]


def walk_runs(session_key: str, limit: int) -> list[list[Run]]:
    """Every page of the session's runs, newest page first, each cursor
    through its encoded form as a client would hand it back."""
    pages, after = [], None
    while True:
        page, more = listing.runs_page(session_key, limit, after)
        pages.append(page)
        if more is None:
            return pages
        cursor = listing.encode_cursor(more, listing.runs_list(session_key))
        after = listing.decode_cursor(cursor, listing.runs_list(session_key))


def walk_sessions(owner: str | None, limit: int) -> list[list[listing.SessionSummary]]:
    pages, after = [], None
    while True:
        page, more = listing.sessions_page(owner, limit, after)
        pages.append([summary for _latest, summary in page])
        if more is None:
            return pages
        after = listing.decode_cursor(listing.encode_cursor(more, listing.SESSIONS), "sessions")


@pytest.mark.django_db
@examples
@given(runs=runs_strategy, limit=st.integers(1, 7))
def test_walking_every_page_of_a_sessions_runs_gives_each_run_once_in_order(runs, limit):
    made = fill(runs)
    order = database_order()
    for session in SESSIONS:
        expected = sorted((r for r in made if r.session_key == session), key=order)
        pages = walk_runs(session, limit)
        for page in pages:
            assert 0 < len(page) <= limit or (len(pages) == 1 and not expected)
            assert page == sorted(page, key=order)  # each page oldest first
        # Pages go from the newest backwards: read in reverse, they are the session.
        walked = [run.id for page in reversed(pages) for run in page]
        assert walked == [run.id for run in expected]


@pytest.mark.django_db
@examples
@given(runs=runs_strategy, limit=st.integers(1, 5), owner=st.sampled_from([*OWNERS, None]))
def test_walking_every_page_of_the_sessions_gives_the_owners_sessions_once_newest_first(
    runs, limit, owner
):
    made = fill(runs)
    order = database_order()
    expected = []
    for session in SESSIONS:
        mine = sorted((r for r in made if r.session_key == session), key=order)
        if mine and (owner is None or mine[-1].owner == owner):
            expected.append((mine[-1], mine[0], len(mine)))
    expected.sort(key=lambda entry: order(entry[0]), reverse=True)
    pages = walk_sessions(owner, limit)
    assert all(len(page) <= limit for page in pages)
    walked = [summary for page in pages for summary in page]
    assert [s.session for s in walked] == [latest.session_key for latest, _, _ in expected]
    for summary, (latest, first, count) in zip(walked, expected, strict=True):
        assert summary.title == first.prompt
        assert summary.runs == count
        assert summary.status == latest.status
        assert summary.started_at == first.started_at
        assert summary.updated_at == latest.started_at


@pytest.mark.django_db
def test_a_session_belongs_to_the_owner_of_its_latest_run():
    fill(
        [("a", "user:1", 0, 0), ("a", "user:2", 1, 0), ("b", "user:2", 0, 0), ("b", "user:1", 2, 0)]
    )
    assert [s.session for s in walk_sessions("user:1", 10)[0]] == ["b"]
    assert [s.session for s in walk_sessions("user:2", 10)[0]] == ["a"]
    assert walk_sessions("user:3", 10) == [[]]


@pytest.mark.django_db
def test_the_latest_run_is_the_last_by_start_then_id_as_the_status_endpoint_takes_it():
    from detached_runs import rows

    made = fill([("a", "user:1", 0, 0), ("a", "user:2", 0, 0)])
    latest = max(made, key=database_order())
    assert rows.latest_row("a") == latest
    assert [s.session for s in walk_sessions(latest.owner, 10)[0]] == ["a"]
    other = next(owner for owner in OWNERS if owner != latest.owner)
    assert walk_sessions(other, 10) == [[]]


@pytest.mark.django_db
def test_a_queued_run_cancelled_before_it_started_is_not_the_sessions_current_run():
    """A stop with ``all`` (or an ``interrupt``) saves the queued runs
    ``stopped`` with no event (no ``last_event_id``) and their later start
    times: the session's current run, for `GET <key>/` once the backend let go
    of it and for the sessions list, is still the one that ran."""
    from detached_runs import rows

    ran, _cancelled = fill([("a", "user:1", 0, 0), ("a", "user:1", 1, 0)])
    Run.objects.filter(pk=ran.pk).update(status="error", last_event_id=f"{ran.pk.hex}-9")
    Run.objects.filter(pk=_cancelled.pk).update(status="stopped")
    assert rows.latest_row("a") == ran
    [summary] = walk_sessions("user:1", 10)[0]
    assert summary.status == "error"
    assert summary.runs == 2 and summary.updated_at == _cancelled.started_at


# -- titles --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "title"),
    [
        ("Hello there", "Hello there"),
        ("  Hello\n\n  there\t! ", "Hello there !"),
        ("x" * 80, "x" * 80),
        ("x" * 81, "x" * 80),  # one word longer than a title: cut
        ("word " * 16 + "more", ("word " * 16).strip()),  # 80 characters end with a word
        ("a" * 70 + " " + "b" * 20, "a" * 70),  # the word that crosses 80 is left out
        ("a" * 79 + " bc", "a" * 79),
        ("", ""),
    ],
)
def test_a_title_is_the_prompt_cut_to_80_characters_at_a_word(prompt, title):
    assert listing.title_of(prompt) == title
    assert len(listing.title_of(prompt)) <= 80


@given(prompt=st.text())
def test_a_title_is_at_most_80_characters_and_a_prefix_of_the_collapsed_prompt(prompt):
    title = listing.title_of(prompt)
    collapsed = " ".join(prompt.split())
    assert len(title) <= 80 and collapsed.startswith(title)
    assert title == collapsed or len(collapsed) > 80


@pytest.mark.django_db
def test_the_title_of_a_long_first_prompt_is_read_from_its_head_only():
    Run.objects.create(session_key="a", owner="user:1", prompt="  \n" * 50 + "why " * 8000)
    (summary,) = walk_sessions("user:1", 5)[0]
    assert summary.title == ("why " * 20).strip()


# -- what a client sends -------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "101", "-1", "1.5", "ten", " 5", "5 ", "²", "1e2", 0, 101])
def test_a_limit_out_of_range_or_not_a_whole_number_is_refused(value):
    with pytest.raises(BadLimit, match="limit must be a whole number from 1 to 100"):
        listing.parse_limit(value, 20)


@pytest.mark.parametrize(("value", "limit"), [(None, 20), ("", 20), ("1", 1), ("100", 100), (7, 7)])
def test_a_limit_in_range_or_none_is_taken(value, limit):
    assert listing.parse_limit(value, 20) == limit


@given(value=st.one_of(st.text(), st.integers(), st.booleans(), st.floats()))
def test_any_limit_is_a_number_from_1_to_100_or_bad_limit(value):
    try:
        limit = listing.parse_limit(value, 20)
    except BadLimit:
        return
    assert 1 <= limit <= 100
    assert value in (None, "") or int(value) == limit


def a_cursor(list_name: str = "sessions") -> str:
    return listing.encode_cursor(Point(BASE, uuid.UUID(int=42)), list_name)


def test_a_cursor_names_its_point_and_is_opaque_and_url_safe():
    cursor = a_cursor()
    assert listing.decode_cursor(cursor, "sessions") == Point(BASE, uuid.UUID(int=42))
    assert all(c.isalnum() or c in "-_:" for c in cursor)
    assert listing.decode_cursor(None, "sessions") is None
    assert listing.decode_cursor("", "sessions") is None


@given(garbage=st.text(min_size=1))
def test_any_text_that_is_not_a_cursor_of_ours_is_bad_cursor(garbage):
    with pytest.raises(BadCursor, match="not one the server gave for this list"):
        listing.decode_cursor(garbage, "sessions")


@given(data=st.data())
def test_a_cursor_changed_anywhere_is_bad_cursor(data: Any):
    cursor = a_cursor()
    index = data.draw(st.integers(0, len(cursor) - 1))
    other = data.draw(st.sampled_from("ABCxyz019-_:").filter(lambda c: c != cursor[index]))
    with pytest.raises(BadCursor):
        listing.decode_cursor(cursor[:index] + other + cursor[index + 1 :], "sessions")


def test_a_cursor_of_another_list_is_bad_cursor():
    with pytest.raises(BadCursor):
        listing.decode_cursor(a_cursor("sessions"), listing.runs_list("a"))
    with pytest.raises(BadCursor):
        listing.decode_cursor(a_cursor(listing.runs_list("a")), listing.runs_list("b"))


def test_a_signed_value_of_another_shape_is_bad_cursor():
    from django.core import signing

    for value in [["not a date", "00"], [BASE.isoformat()], {"a": 1}, 5]:
        forged = signing.dumps(value, salt="detached_runs.listing:sessions", compress=False)
        with pytest.raises(BadCursor):
            listing.decode_cursor(forged, "sessions")


def test_a_cursor_signed_with_another_key_is_bad_cursor(settings):
    cursor = a_cursor()
    settings.SECRET_KEY = "another-key-" + "x" * 40
    with pytest.raises(BadCursor):
        listing.decode_cursor(cursor, "sessions")
    settings.SECRET_KEY_FALLBACKS = ["tests-only-not-secret"]
    assert listing.decode_cursor(cursor, "sessions") == Point(BASE, uuid.UUID(int=42))

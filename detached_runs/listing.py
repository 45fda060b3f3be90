"""The conversations, a page at a time: a requester's sessions, and a
session's runs (sync query functions: the service calls them on the database
thread, `detached_runs.db.run_sync`).

Pages are cut by keyset, not by OFFSET: a page asks for the rows before the
point ``(started_at, id)`` where the previous page ended, in the order of an
index (``(owner, -started_at)`` for the sessions, ``(session_key,
-started_at)`` for the runs), so a deep page costs about what the first one
does, and a run started meanwhile neither shifts nor repeats rows. The
``id`` orders runs that started in the same microsecond.

The point travels to the client as an opaque *cursor*, signed with the
project's ``SECRET_KEY`` (`django.core.signing`, which honours
``SECRET_KEY_FALLBACKS``): a client can only hand back a cursor the server
gave it, for the same list (the sessions, or the runs of that session).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.core import signing
from django.db.models import Exists, Func, IntegerField, OuterRef, Q, QuerySet, Subquery
from django.db.models.functions import Left

from .exceptions import BadCursor, BadLimit
from .models import Run
from .rows import that_ran

#: Page sizes when the client names none, and the largest it may ask for.
SESSIONS_LIMIT = 20
RUNS_LIMIT = 50
MAX_LIMIT = 100
#: A session's title is its first prompt, cut to this many characters at a word.
TITLE_CHARS = 80
#: Characters of the first prompt read for its title: enough for whitespace
#: that the title collapses (line breaks, indentation) to leave 80 behind.
#: A head that leaves fewer (a prompt pasted after hundreds of line breaks)
#: has its whole prompt read instead (`_title`).
_TITLE_SOURCE = 400
#: A cursor longer than this is not one of ours (they are about 110 characters).
_CURSOR_CHARS = 400
_SALT = "detached_runs.listing"
_LIMIT_RE = re.compile(r"[0-9]{1,6}")
_NEWEST_FIRST = ("-started_at", "-id")
_COUNT_ALL = Func(template="COUNT(*)", output_field=IntegerField())


@dataclass(frozen=True, slots=True)
class Point:
    """Where a page ends: the last row's ``(started_at, id)``; the next page
    holds the rows before it."""

    started_at: datetime
    id: uuid.UUID


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """One session of the sessions list.

    ``title``: its first prompt, whitespace collapsed, cut to `TITLE_CHARS`
    at a word (`title_of`). ``status``: its current run's status (its latest
    run not queued: a run in flight with a follow-up queued is ``running``;
    ``queued`` if every run is). ``runs``: how
    many runs it has. ``started_at``: when its first run started;
    ``updated_at``: when its latest run started (its latest prompt was sent,
    or queued), which orders the list.
    """

    session: str
    title: str
    status: str
    runs: int
    started_at: datetime
    updated_at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "title": self.title,
            "status": self.status,
            "runs": self.runs,
            "started_at": self.started_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class SessionsPage:
    """A page of `RunService.sessions`: most recently active first. ``next`` is
    the cursor of the page after it, None on the last page."""

    sessions: list[SessionSummary] = field(default_factory=list)
    next: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"sessions": [s.as_json() for s in self.sessions], "next": self.next}


@dataclass(frozen=True, slots=True)
class RunsPage:
    """A page of `RunService.session_runs`: the page before ``next`` holds the
    older runs; the runs of one page are in chronological order (oldest
    first). ``next`` is None on the page with the session's first run."""

    session: str
    runs: list[Run]
    next: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "runs": [run.as_json() for run in self.runs],
            "next": self.next,
        }


# -- what a client sends -------------------------------------------------------------


def parse_limit(value: int | str | None, default: int) -> int:
    """A page size from a caller (an int) or a query string (its digits):
    ``default`` if it is None or empty, else a whole number from 1 to
    `MAX_LIMIT`, or `BadLimit`."""
    if value is None or value == "":
        return default
    if isinstance(value, str) and _LIMIT_RE.fullmatch(value):
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        number = 0
    if not 1 <= number <= MAX_LIMIT:
        raise BadLimit(f"limit must be a whole number from 1 to {MAX_LIMIT}.")
    return number


SESSIONS = "sessions"


def runs_list(session_key: str) -> str:
    """The list a cursor of ``session_key``'s runs belongs to (`encode_cursor`)."""
    return f"runs:{session_key}"


def encode_cursor(point: Point, list_name: str) -> str:
    """The cursor of the page after ``point`` in the list ``list_name``
    (`SESSIONS`, `runs_list`): URL-safe, signed, opaque to clients."""
    return signing.dumps(
        [point.started_at.isoformat(), point.id.hex], salt=f"{_SALT}:{list_name}", compress=False
    )


def decode_cursor(cursor: str | None, list_name: str) -> Point | None:
    """The point a cursor of the list ``list_name`` names; None for no cursor
    (None or empty: the first page). `BadCursor` for anything else than a
    cursor this server gave for that list."""
    if cursor is None or cursor == "":
        return None
    try:
        if not isinstance(cursor, str) or len(cursor) > _CURSOR_CHARS:
            raise ValueError(cursor)
        started_at, pk = signing.loads(cursor, salt=f"{_SALT}:{list_name}")
        return Point(datetime.fromisoformat(started_at), uuid.UUID(hex=pk))
    except (signing.BadSignature, ValueError, TypeError) as exc:
        # A bad signature, text that is not UTF-8 (a lone surrogate), a signed
        # value of another shape: the signature makes the last impossible
        # without the key, but the shape is checked all the same.
        raise BadCursor(
            "This cursor is not one the server gave for this list; "
            "ask for the first page (without a cursor)."
        ) from exc


def title_of(prompt: str) -> str:
    """A session's title: ``prompt`` with its whitespace collapsed, cut to
    `TITLE_CHARS` characters at a word (a word longer than that is cut)."""
    text = " ".join(prompt.split())
    if len(text) <= TITLE_CHARS:
        return text
    if text[TITLE_CHARS] == " ":
        return text[:TITLE_CHARS]
    space = text.rfind(" ", 0, TITLE_CHARS + 1)
    return text[:space] if space > 0 else text[:TITLE_CHARS]


# -- the queries ---------------------------------------------------------------------


def _before(rows: QuerySet[Run], point: Point | None) -> QuerySet[Run]:
    """The rows before ``point`` in the order ``(-started_at, -id)``. Written
    as a range on ``started_at`` (which the indexes hold) plus a filter for
    ties, so that the database reads the index from the point on."""
    if point is None:
        return rows
    return rows.filter(started_at__lte=point.started_at).filter(
        Q(started_at__lt=point.started_at) | Q(id__lt=point.id)
    )


def _page(rows: list[Run], limit: int) -> tuple[list[Run], Point | None]:
    """``rows`` (up to ``limit + 1``, newest first) cut to ``limit``, and the
    point of the next page (None if there is none)."""
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, Point(rows[-1].started_at, rows[-1].id)


def runs_query(session_key: str, after: Point | None) -> QuerySet[Run]:
    """The session's runs before ``after``, newest first (`runs_page`)."""
    rows = _before(Run.objects.filter(session_key=session_key), after)
    return rows.order_by(*_NEWEST_FIRST)


def runs_page(session_key: str, limit: int, after: Point | None) -> tuple[list[Run], Point | None]:
    """Up to ``limit`` runs of the session before ``after`` (the newest ones
    for None), oldest first; and the point of the page of older ones, if any."""
    page, more = _page(list(runs_query(session_key, after)[: limit + 1]), limit)
    page.reverse()
    return page, more


def sessions_query(owner: str | None, after: Point | None) -> QuerySet[Run]:
    """The latest run of each session whose latest run is ``owner``'s (of every
    session for None), after ``after``, most recently active first, with
    ``first_prompt`` (its head), ``first_started_at``, ``run_count`` and
    ``current_id`` (its latest run that ran, `rows.that_ran`; None if none
    did) of its session (`sessions_page`).

    One query: the owner's runs, newest first (the ``(owner, -started_at)``
    index), that no later run of their session follows (``NOT EXISTS`` on the
    ``(session_key, -started_at)`` index), then, for the rows of the page
    alone, four lookups of their session on that index: its first prompt
    (its head), its first start, its number of runs and its current run. A page costs its rows
    plus the runs it skips (those that are not the latest of their session):
    see docs/benchmarks.md for what that comes to.
    """
    session = Run.objects.filter(session_key=OuterRef("session_key"))
    later = session.filter(started_at__gte=OuterRef("started_at")).filter(
        Q(started_at__gt=OuterRef("started_at")) | Q(id__gt=OuterRef("id"))
    )
    first = session.order_by("started_at", "id")
    rows = Run.objects.all() if owner is None else Run.objects.filter(owner=owner)
    return (
        _before(rows.filter(~Exists(later)), after)
        .annotate(
            first_prompt=Subquery(
                first.annotate(head=Left("prompt", _TITLE_SOURCE)).values("head")[:1]
            ),
            first_started_at=Subquery(first.values("started_at")[:1]),
            # COUNT(*) without GROUP BY: counted in the index alone. Count("pk")
            # (grouped, as Django writes an aggregate in a subquery) read every
            # row of the session too: 40 ms instead of 4 for a session of 50,000
            # runs on SQLite (bench/paging.py).
            run_count=Subquery(session.order_by().annotate(n=_COUNT_ALL).values("n")),
            # The latest row may be a queued follow-up while the run before it
            # streams, or one cancelled before it started: the session's
            # status is its current run's, as `GET <key>/` shows it
            # (`rows.latest_row`). Read from the newest run backwards, past
            # the queued and cancelled ones only.
            current_id=Subquery(that_ran(session).order_by(*_NEWEST_FIRST).values("id")[:1]),
        )
        .defer(*_DEFERRED)
        .order_by(*_NEWEST_FIRST)
    )


_DEFERRED = ("output", "prompt", "options", "usage", "error")


def _title(latest: Run) -> str:
    """The title of ``latest``'s session, from the head of its first prompt;
    or, if whitespace took so much of the head that less than a title is left
    (and the prompt may go on), from the whole first prompt: read again, for
    such a session alone."""
    head: str = latest.first_prompt or ""  # type: ignore[attr-defined]
    title = title_of(head)
    if len(head) < _TITLE_SOURCE or len(" ".join(head.split())) > TITLE_CHARS:
        # The whole prompt, or enough of it: past TITLE_CHARS + 1 collapsed
        # characters, the head's collapsed text is the prompt's up to the cut.
        return title
    first = (
        Run.objects.filter(session_key=latest.session_key)
        .order_by("started_at", "id")
        .values_list("prompt", flat=True)
        .first()
    )
    return title_of(first) if first is not None else title


def _current_runs(page: list[Run]) -> dict[uuid.UUID, Run]:
    """The current run of each session of ``page`` whose latest row is not it
    (a queued follow-up): read in one query, for those sessions alone."""
    wanted = [
        latest.current_id  # type: ignore[attr-defined]
        for latest in page
        if latest.current_id not in (None, latest.id)  # type: ignore[attr-defined]
    ]
    if not wanted:
        return {}
    return {run.id: run for run in Run.objects.filter(pk__in=wanted).defer(*_DEFERRED)}


def sessions_page(
    owner: str | None, limit: int, after: Point | None
) -> tuple[list[tuple[Run, SessionSummary]], Point | None]:
    """Up to ``limit`` sessions whose latest run is ``owner``'s (every session
    for None), most recently active first, after ``after``: each as its
    current run (its latest that ran, else its latest; output, prompt and
    options deferred) and its summary; and the point of the next page, if any
    (`sessions_query`)."""
    page, more = _page(list(sessions_query(owner, after)[: limit + 1]), limit)
    current = _current_runs(page)
    pairs: list[tuple[Run, SessionSummary]] = []
    for latest in page:
        run = current.get(latest.current_id, latest)  # type: ignore[attr-defined]
        pairs.append(
            (
                run,
                SessionSummary(
                    session=latest.session_key,
                    title=_title(latest),
                    status=run.status,
                    runs=latest.run_count or 1,  # type: ignore[attr-defined]
                    started_at=latest.first_started_at or latest.started_at,  # type: ignore[attr-defined]
                    updated_at=latest.started_at,
                ),
            )
        )
    return pairs, more

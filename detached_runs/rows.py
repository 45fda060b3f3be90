"""Every read and write of `Run` rows the service makes (sync functions: the
service calls them on the database thread, `detached_runs.db.run_sync`)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, cast

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import connections, router, transaction
from django.db.models import Field
from django.utils import timezone

from .agents.base import Turn
from .backends.base import INTERRUPTED, RUNNING
from .db import data_errors
from .events import Position, make_id, parse_id
from .exceptions import BadEventId, RunNotFound
from .models import Run
from .owners import may_access
from .workers import orphaned as worker_orphaned
from .workers import stale_after, worker_id

_CHECKPOINTED = ("id", "output", "last_event_id", "updated_at", "status")


def write_checkpoints(rows: list[tuple[uuid.UUID, str, str]]) -> set[uuid.UUID]:
    """Checkpoint ``(pk, output, last event id)`` rows in one statement (sync,
    on the database thread); returns the keys of the rows the database
    refused for their data. Only rows still ``running`` are touched, so a
    checkpoint never undoes a final save.

    The ORM's ``update()`` builds a query per row, which at a thousand rows a
    second costs more than the writes; one prepared ``executemany`` does not.
    If the database refuses the data of one row (`DataError`,
    `IntegrityError`), that sinks the whole statement: the rows are then
    written one by one, each in its own transaction, so one bad row never
    fails the checkpoints of every other run. Any other error (the database
    is unavailable) is raised.
    """
    db = router.db_for_write(Run)
    conn = connections[db]
    meta = Run._meta
    fields = {name: cast("Field[Any, Any]", meta.get_field(name)) for name in _CHECKPOINTED}
    column = {name: conn.ops.quote_name(f.column or name) for name, f in fields.items()}
    sql = (
        f"UPDATE {conn.ops.quote_name(meta.db_table)} SET {column['output']} = %s, "
        f"{column['last_event_id']} = %s, {column['updated_at']} = %s "
        f"WHERE {column['id']} = %s AND {column['status']} = %s"
    )
    now = fields["updated_at"].get_db_prep_value(timezone.now(), conn)
    params = [
        (output, last_id, now, fields["id"].get_db_prep_value(pk, conn), RUNNING)
        for pk, output, last_id in rows
    ]
    try:
        with transaction.atomic(using=db), conn.cursor() as cursor:
            cursor.executemany(sql, params)
        return set()
    except data_errors():
        pass
    refused = set()
    for (pk, _output, _last_id), row in zip(rows, params, strict=True):
        try:
            with transaction.atomic(using=db), conn.cursor() as cursor:
                cursor.execute(sql, row)
        except data_errors():
            refused.add(pk)
    return refused


def terminal_position(row: Run, size: int | None = None) -> Position:
    """Where a row's terminal event is (or will be) in its run's log.

    An ended row's ``last_event_id`` is its terminal event; a running row's is
    the last event its checkpoint covers, so the terminal comes right after.
    ``size`` is the output's length in UTF-8 bytes, if the caller has it.
    """
    if size is None:
        size = len(row.output.encode())
    run, position = row.id.hex, Position(size, 1)
    if row.last_event_id:
        try:
            run, position = parse_id(row.last_event_id)
        except BadEventId:
            pass
    if run != row.id.hex or position.text != size:
        position = Position(size, 1)  # unknown or inconsistent: start, text, end
    return position if row.status != RUNNING else Position(size, position.seq + 1)


def open_row(
    session_key: str,
    prompt: str,
    requester: str | None,
    user_pk: Any,
    *,
    check_owner: bool,
    history: int | None,
) -> tuple[Run, tuple[Turn, ...] | None]:
    """Create a run's row (sync, on the database thread). With ``check_owner``,
    a session whose latest row belongs to someone else raises `RunNotFound`.
    With ``history`` (a limit), also return the session's earlier turns."""
    rows: list[Run] = []
    wanted = max(history or 0, 1 if check_owner else 0)
    if wanted:
        rows = list(
            Run.objects.filter(session_key=session_key)
            .order_by("-started_at")
            .only("owner", "prompt", "output", "status")[:wanted]
        )
    if check_owner and rows and not may_access(requester, rows[0].owner, session_key):
        raise RunNotFound("No such session.")
    if user_pk is None and requester and requester.startswith("user:"):
        # The user a run belongs to, for the admin's link (owner keys "user:<pk>").
        try:
            user_pk = (
                get_user_model()
                .objects.filter(pk=requester.removeprefix("user:"))
                .values_list("pk", flat=True)
                .first()
            )
        except (ValueError, TypeError, ValidationError):
            user_pk = None
    run = Run.objects.create(
        session_key=session_key,
        prompt=prompt,
        owner=requester or "",
        worker=worker_id(),
        user_id=user_pk,
    )
    return run, (None if history is None else turns(rows[:history]))


def save_end(pk: uuid.UUID, fields: dict[str, Any]) -> int:
    """A run's final save (sync, on the database thread); 1 if it ended the row."""
    ended = Run.objects.filter(pk=pk, status=RUNNING).update(**fields)
    if not ended:
        # Another process found the run orphaned, ended its row and announced
        # it: this save still has the last word, but the run is not announced
        # twice.
        Run.objects.filter(pk=pk).update(**fields)
    return ended


def save_reaped(
    pk: str, output: str, last_id: str, *, status: str = INTERRUPTED, error: str = ""
) -> tuple[Run | None, bool]:
    """`RunService._save_ended_elsewhere`'s write: the row (without its
    output), and whether this call ended it."""
    updated = Run.objects.filter(pk=pk, status=RUNNING).update(
        status=status,
        error=error,
        output=output,
        last_event_id=last_id,
        finished_at=timezone.now(),
    )
    rows = Run.objects.filter(pk=pk)
    return (rows.first() if updated else rows.defer("output").first()), bool(updated)


def stale_rows(limit: int) -> list[Run]:
    """Up to ``limit`` running rows whose heartbeat is older than
    `detached_runs.workers.stale_after` (their output deferred), the oldest
    first."""
    stale = timezone.now() - stale_after()
    rows = Run.objects.filter(status=RUNNING, updated_at__lt=stale).defer("output")
    return list(rows.order_by("updated_at")[:limit])


def latest_row(session_key: str, *, output: bool = True) -> Run | None:
    rows = Run.objects.filter(session_key=session_key).order_by("-started_at")
    return (rows if output else rows.defer("output")).first()


def fresh_row(row: Run, *, output: bool = True) -> Run:
    """``row`` read again (its output deferred, unless ``output``); ``row``
    itself if it is gone."""
    rows = Run.objects.filter(pk=row.pk)
    return (rows if output else rows.defer("output")).first() or row


def mark_orphaned(fresh: Run) -> tuple[Run, bool]:
    """`RunService.resolve`'s write (sync, on the database thread): mark the
    orphaned ``fresh`` row interrupted at its last checkpoint, unless it
    changed since it was read; the row read again (with its output), and
    whether this call marked it."""
    terminal = make_id(fresh.id.hex, terminal_position(fresh))
    updated = Run.objects.filter(pk=fresh.pk, status=RUNNING, updated_at=fresh.updated_at).update(
        status=Run.Status.INTERRUPTED, finished_at=timezone.now(), last_event_id=terminal
    )
    return Run.objects.get(pk=fresh.pk), bool(updated)


def turns(rows: list[Run]) -> tuple[Turn, ...]:
    """A session's rows, newest first, as the agent's history: oldest first."""
    return tuple(Turn(r.prompt, r.output, r.status) for r in reversed(rows))


def orphaned(row: Run) -> bool:
    """Whether ``row``'s process is gone (`detached_runs.workers.orphaned`)."""
    return worker_orphaned(row.worker, row.updated_at)


def earlier_turns(run: Run, limit: int) -> tuple[Turn, ...]:
    """The session's runs before ``run`` (at most ``limit``), as turns."""
    earlier = Run.objects.filter(session_key=run.session_key, started_at__lte=run.started_at)
    return turns(list(earlier.exclude(pk=run.pk).order_by("-started_at")[:limit]))


def ended_row(pk: str) -> Run | None:
    """Run ``pk``'s row if it is no longer running."""
    return Run.objects.filter(pk=pk).exclude(status=RUNNING).first()


def is_running(pk: uuid.UUID) -> bool:
    return Run.objects.filter(pk=pk, status=RUNNING).exists()


def load_row(pk: uuid.UUID) -> Run | None:
    return Run.objects.filter(pk=pk).first()


def delete_row(pk: uuid.UUID) -> None:
    Run.objects.filter(pk=pk).delete()


def set_started_at(pk: uuid.UUID, started_at: datetime) -> None:
    Run.objects.filter(pk=pk).update(started_at=started_at)

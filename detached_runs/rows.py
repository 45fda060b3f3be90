"""Every read and write of `Run` rows the service makes (sync functions: the
service calls them on the database thread, `detached_runs.db.run_sync`)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, cast

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import connections, router, transaction
from django.db.models import DateTimeField, Field, Min, QuerySet, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from .agents.base import Turn
from .backends.base import ACTIVE, INTERRUPTED, RUNNING, WAITING
from .conf import get_config
from .db import data_errors
from .events import Position, make_id, parse_id
from .exceptions import BadEventId, QueueFull, RunNotFound, SessionBusy
from .models import Run
from .owners import may_access
from .usage import merge_usage
from .workers import orphaned as worker_orphaned
from .workers import stale_after, worker_id

QUEUED = Run.Status.QUEUED
_CHECKPOINTED = (
    "id",
    "output",
    "last_event_id",
    "updated_at",
    "status",
    "usage",
    "first_token_at",
)


class Checkpoint(NamedTuple):
    """What a checkpoint writes of a running run's row (`write_checkpoints`)."""

    pk: uuid.UUID
    output: str
    #: The id of the last event ``output`` covers.
    last_id: str
    #: The run's usage so far (`detached_runs.usage`): a dict of JSON data.
    usage: dict[str, Any]
    #: When its first text delta was logged; None before it.
    first_token_at: datetime | None


def write_checkpoints(rows: list[Checkpoint]) -> set[uuid.UUID]:
    """Checkpoint rows (output, last event id, usage, first token) in one
    statement (sync, on the database thread); returns the keys of the rows
    the database refused for their data. Only rows still ``running`` are
    touched, so a checkpoint never undoes a final save.

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
    # Each value as its field prepares it for this database: the usage as
    # JSON (text on SQLite and MariaDB, jsonb on PostgreSQL), times as the
    # database takes them. (`usage` is a reserved word of MySQL: every column
    # name is quoted.)
    sql = (
        f"UPDATE {conn.ops.quote_name(meta.db_table)} SET {column['output']} = %s, "
        f"{column['last_event_id']} = %s, {column['updated_at']} = %s, "
        f"{column['usage']} = %s, {column['first_token_at']} = %s "
        f"WHERE {column['id']} = %s AND {column['status']} IN (%s, %s)"
    )
    now = fields["updated_at"].get_db_prep_value(timezone.now(), conn)
    params = [
        (
            row.output,
            row.last_id,
            now,
            fields["usage"].get_db_prep_value(row.usage, conn),
            fields["first_token_at"].get_db_prep_value(row.first_token_at, conn),
            fields["id"].get_db_prep_value(row.pk, conn),
            RUNNING,
            WAITING,
        )
        for row in rows
    ]
    try:
        with transaction.atomic(using=db), conn.cursor() as cursor:
            cursor.executemany(sql, params)
        return set()
    except data_errors():
        pass
    refused = set()
    for checkpoint, row in zip(rows, params, strict=True):
        try:
            with transaction.atomic(using=db), conn.cursor() as cursor:
                cursor.execute(sql, row)
        except data_errors():
            refused.add(checkpoint.pk)
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
    return position if row.status not in ACTIVE else Position(size, position.seq + 1)


class Opened(NamedTuple):
    """What `open_row` made and read."""

    run: Run
    #: The session's earlier turns, if asked for (``history``).
    history: tuple[Turn, ...] | None
    #: Whether runs of the session were queued when this row was made: an
    #: ``interrupt`` or ``rollback`` start has a queue to cancel only if so.
    queued: bool


def open_row(*args: Any, **kwargs: Any) -> Opened:
    """`_open_row` in one transaction: a refused start changes nothing."""
    with transaction.atomic(using=router.db_for_write(Run)):
        return _open_row(*args, **kwargs)


def _open_row(
    session_key: str,
    prompt: str,
    requester: str | None,
    user: Any,
    *,
    check_owner: bool,
    history: int | None,
    options: dict[str, Any] | None = None,
    multitask: str = "interrupt",
    in_flight: bool = False,
    started_at: datetime | None = None,
) -> Opened:
    """Create a run's row (sync, on the database thread). ``user`` is the
    requester's ``User``, or None: then the user an owner key ``"user:<pk>"``
    names is looked up (for the admin's link and ``ctx.user``). With
    ``check_owner``, a session whose latest row belongs to someone else
    raises `RunNotFound`. With ``history`` (a limit), also return the
    session's earlier turns.

    The session's queue, by ``multitask`` (`RunService.start`): ``reject``
    raises `SessionBusy` if runs are queued; ``enqueue`` creates the row
    ``queued`` if a run is in flight (``in_flight``) or queued (`QueueFull`
    past ``MAX_QUEUED_PER_SESSION``). Nothing else changes here: what an
    ``interrupt`` or a ``rollback`` ends is ended once the backend took the
    run (`replace_pending`). ``started_at`` is the backend's time, if it
    orders the session's starts."""
    rows: list[Run] = []
    wanted = max(history or 0, 1 if check_owner else 0)
    if wanted:
        rows = list(
            Run.objects.filter(session_key=session_key)
            .order_by("-started_at")
            .only("owner", "prompt", "output", "status", "last_event_id")[:wanted]
        )
    if check_owner and rows and not may_access(requester, rows[0].owner, session_key):
        raise RunNotFound("No such session.")
    status = RUNNING
    if wanted and len(rows) < wanted:
        # Every row of the session is in hand (a new session has none): no
        # second query to count its queue.
        queued = sum(row.status == QUEUED for row in rows)
    else:
        queued = queued_count(session_key)
    if multitask in ("reject", "enqueue"):
        if multitask == "reject" and queued:
            raise SessionBusy("The session has runs queued; nothing was started.")
        if multitask == "enqueue" and (in_flight or queued):
            limit = int(get_config()["MAX_QUEUED_PER_SESSION"])
            if queued >= limit:
                raise QueueFull(f"The session has {queued} runs queued; the limit is {limit}.")
            status, history = QUEUED, None
    if user is None and requester and requester.startswith("user:"):
        try:
            user = get_user_model().objects.filter(pk=requester.removeprefix("user:")).first()
        except (ValueError, TypeError, ValidationError):
            user = None
    run = Run.objects.create(
        session_key=session_key,
        prompt=prompt,
        owner=requester or "",
        worker=worker_id(),
        user=user,
        options=options or {},
        status=status,
        **({"started_at": started_at} if started_at is not None else {}),
    )
    # The history is of runs that ran.
    ran = [row for row in rows if ran_once(row)]
    return Opened(run, None if history is None else turns(ran[:history]), queued > 0)


def save_end(pk: uuid.UUID, fields: dict[str, Any]) -> tuple[int, bool]:
    """A run's final save (sync, on the database thread): 1 if it ended the
    row (running or waiting), and whether the row is gone (a ``rollback`` deleted it)."""
    ended = Run.objects.filter(pk=pk, status__in=ACTIVE).update(**fields)
    if not ended:
        # Another process found the run orphaned, ended its row and announced
        # it: this save still has the last word, but the run is not announced
        # twice.
        Run.objects.filter(pk=pk).update(**fields)
        return ended, not Run.objects.filter(pk=pk).exists()
    return ended, False


def save_reaped(
    pk: str,
    output: str,
    last_id: str,
    *,
    status: str = INTERRUPTED,
    error: str = "",
    usage: dict[str, Any] | None = None,
    first_token_at: datetime | None = None,
) -> tuple[Run | None, bool]:
    """`RunService._save_ended_elsewhere`'s write: the row (without its
    output), and whether this call ended it.

    ``usage`` is the merge of the usage events in the run's log; it is merged
    over the usage the row's last checkpoint holds (the log's keys win: it is
    usually ahead), so that a key only the checkpoint had is kept.
    ``first_token_at`` (as the run's worker told the backend) is set if the
    row has none yet (its worker died before a checkpoint after it)."""
    fields: dict[str, Any] = {
        "status": status,
        "error": error,
        "output": output,
        "last_event_id": last_id,
        "finished_at": timezone.now(),
    }
    if usage:
        checkpointed = Run.objects.filter(pk=pk, status__in=ACTIVE).values_list("usage", flat=True)
        current = checkpointed.first()
        fields["usage"] = merge_usage(current if isinstance(current, dict) else {}, usage)
    if first_token_at is not None:
        fields["first_token_at"] = Coalesce(
            "first_token_at", Value(first_token_at, output_field=DateTimeField())
        )
    updated = Run.objects.filter(pk=pk, status__in=ACTIVE).update(**fields)
    rows = Run.objects.filter(pk=pk)
    return (rows.first() if updated else rows.defer("output").first()), bool(updated)


def stale_rows(limit: int) -> list[Run]:
    """Up to ``limit`` running rows whose heartbeat is older than
    `detached_runs.workers.stale_after` (their output deferred), the oldest
    first."""
    stale = timezone.now() - stale_after()
    rows = Run.objects.filter(status__in=ACTIVE, updated_at__lt=stale).defer("output")
    return list(rows.order_by("updated_at")[:limit])


def latest_row(session_key: str, *, output: bool = True) -> Run | None:
    """The session's current or last run: its latest row that ran
    (`that_ran`), by ``(started_at, id)`` as the conversations list
    (`detached_runs.listing`) orders runs (or, if none ran, the oldest one)."""
    rows = Run.objects.filter(session_key=session_key)
    if not output:
        rows = rows.defer("output")
    latest = that_ran(rows).order_by("-started_at", "-id").first()
    return latest or rows.order_by("started_at", "id").first()


def that_ran(rows: QuerySet[Run]) -> QuerySet[Run]:
    """The runs of ``rows`` that ran (`ran_once`): not queued, nor cancelled
    while queued (``stopped`` without an event). Only those are in an agent's
    history or a session's current run."""
    return rows.exclude(status=QUEUED).exclude(status=Run.Status.STOPPED, last_event_id="")


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
    updated = Run.objects.filter(
        pk=fresh.pk, status__in=ACTIVE, updated_at=fresh.updated_at
    ).update(status=Run.Status.INTERRUPTED, finished_at=timezone.now(), last_event_id=terminal)
    # Deleted meanwhile (its session was: `RunService.delete`): as it was read.
    return Run.objects.filter(pk=fresh.pk).first() or fresh, bool(updated)


def turns(rows: list[Run]) -> tuple[Turn, ...]:
    """A session's rows, newest first, as the agent's history: oldest first."""
    return tuple(Turn(r.prompt, r.output, r.status) for r in reversed(rows))


def orphaned(row: Run) -> bool:
    """Whether ``row``'s process is gone (`detached_runs.workers.orphaned`)."""
    return worker_orphaned(row.worker, row.updated_at)


def ran_once(row: Run) -> bool:
    """Whether ``row``'s run ran: not queued, nor cancelled while queued (a
    run that ran has the id of an event of its log)."""
    return row.status != QUEUED and not (row.status == Run.Status.STOPPED and not row.last_event_id)


def earlier_turns(run: Run, limit: int) -> tuple[Turn, ...]:
    """The session's runs before ``run`` that ran (at most ``limit``), as turns."""
    earlier = Run.objects.filter(session_key=run.session_key, started_at__lte=run.started_at)
    earlier = that_ran(earlier.exclude(pk=run.pk))
    return turns(list(earlier.order_by("-started_at")[:limit]))


def replace_pending(session_key: str, *, delete: bool, rolled_back: uuid.UUID | None) -> None:
    """What an ``interrupt`` (or, with ``delete``, a ``rollback``) start ends
    once the backend took its run: the session's queued runs, cancelled
    (``stopped``, no output) or deleted, and with ``rolled_back`` the row of
    the run it replaced."""
    with transaction.atomic(using=router.db_for_write(Run)):
        cancel_queued(session_key, delete=delete)
        if rolled_back is not None:
            Run.objects.filter(pk=rolled_back).delete()


def has_queued(session_key: str) -> bool:
    """Whether a run of the session is queued."""
    return Run.objects.filter(session_key=session_key, status=QUEUED).exists()


def ended_row(pk: str) -> Run | None:
    """Run ``pk``'s row if it is no longer running."""
    return Run.objects.filter(pk=pk).exclude(status__in=ACTIVE).first()


def is_running(pk: uuid.UUID) -> bool:
    """Whether run ``pk``'s row is in flight (running or waiting)."""
    return Run.objects.filter(pk=pk, status__in=ACTIVE).exists()


def mark_waiting(pk: uuid.UUID, waiting: bool) -> None:
    """Run ``pk``'s row ``waiting`` (its agent asked the user something), or
    ``running`` again; a row that ended meanwhile is left as it is."""
    before, after = (RUNNING, WAITING) if waiting else (WAITING, RUNNING)
    Run.objects.filter(pk=pk, status=before).update(status=after)


def load_row(pk: uuid.UUID) -> Run | None:
    return Run.objects.filter(pk=pk).first()


def delete_row(pk: uuid.UUID) -> None:
    Run.objects.filter(pk=pk).delete()


def requeue(pk: uuid.UUID) -> None:
    """Put a run `claim_queued` took back in the queue (its start was refused)."""
    Run.objects.filter(pk=pk, status=RUNNING).update(status=QUEUED)


def session_run_ids(session_key: str) -> list[uuid.UUID]:
    """The keys of every run of the session (`RunService.delete`)."""
    return list(Run.objects.filter(session_key=session_key).values_list("pk", flat=True))


#: Rows deleted per statement: under every database's limit of parameters.
_DELETE_BATCH = 500


def delete_rows(pks: list[uuid.UUID]) -> int:
    """Delete these rows, in one transaction; how many there were. Every
    later write of a run (a checkpoint, a final save, a reaped end) is an
    ``UPDATE`` of its row by key, so none of them can bring a deleted row back."""
    deleted = 0
    with transaction.atomic(using=router.db_for_write(Run)):
        for begin in range(0, len(pks), _DELETE_BATCH):
            count, _ = Run.objects.filter(pk__in=pks[begin : begin + _DELETE_BATCH]).delete()
            deleted += count
    return deleted


def set_started_at(pk: uuid.UUID, started_at: datetime) -> None:
    Run.objects.filter(pk=pk).update(started_at=started_at)


def queued_count(session_key: str) -> int:
    """How many runs of the session are queued."""
    return Run.objects.filter(session_key=session_key, status=Run.Status.QUEUED).count()


def is_next(session_key: str, run_id: str) -> bool:
    """Whether a run of the session other than ``run_id`` (hex) is queued, or
    is being started from the queue (claimed, `claim_queued`)."""
    pending = Run.objects.filter(session_key=session_key, status__in=(QUEUED, *ACTIVE))
    return pending.exclude(pk=uuid.UUID(run_id)).exists()


def cancel_queued(session_key: str, *, delete: bool = False) -> list[uuid.UUID]:
    """End every queued run of the session as ``stopped`` with no output (or,
    with ``delete``, delete their rows); the keys of the runs it ended. A run
    that left the queue meanwhile (its start claimed it) is not touched."""
    queued = Run.objects.filter(session_key=session_key, status=Run.Status.QUEUED)
    keys = list(queued.values_list("pk", flat=True))
    if not keys:
        return []
    if delete:
        Run.objects.filter(pk__in=keys, status=QUEUED).delete()
    else:
        cancel_runs(keys)
    return keys


def cancel_runs(pks: list[Any]) -> int:
    """End the runs of ``pks`` that are queued as ``stopped`` with no output;
    how many it ended."""
    now = timezone.now()
    queued = Run.objects.filter(pk__in=pks, status=QUEUED)
    return queued.update(status=Run.Status.STOPPED, finished_at=now, updated_at=now)


def claim_queued(session_key: str, now: float) -> Run | None:
    """Take the session's oldest queued run out of the queue: its row, now
    ``running`` in this process (`worker_id`) and started at ``now`` (epoch
    seconds, the backend's clock), with its user loaded; None if none is
    queued. The claim is one conditional ``UPDATE``: of processes claiming
    at once, one gets the run.

    A queued row's ``started_at`` holds its place in the session (after every
    run sent before it) until it starts; then it is when it started (so that
    the time to its first token does not count its wait), and the runs still
    queued move after it, in their order."""
    moment = datetime.fromtimestamp(now, UTC)
    while True:
        queued = list(
            Run.objects.filter(session_key=session_key, status=QUEUED)
            .order_by("started_at", "id")
            .values_list("pk", flat=True)
        )
        if not queued:
            return None
        claimed = Run.objects.filter(pk=queued[0], status=QUEUED).update(
            status=RUNNING, worker=worker_id(), updated_at=timezone.now(), started_at=moment
        )
        if claimed:
            for place, pk in enumerate(queued[1:], start=1):
                later = moment + timedelta(microseconds=place)
                Run.objects.filter(pk=pk, status=QUEUED).update(started_at=later)
            return Run.objects.select_related("user").get(pk=queued[0])


def waiting_queues(older_than: datetime, limit: int) -> list[str]:
    """Sessions with a run queued since before ``older_than`` (at most
    ``limit``, those waiting longest first)."""
    queued = Run.objects.filter(status=Run.Status.QUEUED, updated_at__lt=older_than)
    # order_by() first: the model's ordering would make DISTINCT one entry per row.
    sessions = queued.order_by().values("session_key").annotate(since=Min("updated_at"))
    return [s["session_key"] for s in sessions.order_by("since")[:limit]]

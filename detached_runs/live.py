"""A run as it is now, for the admin's live view: its row brought up to date
with what the backend holds while it is in flight, and a summary of its log
(its events by type), read through the same log its clients read.

The admin calls `refresh` for a run's page and for the page's polls
(`detached_runs.admin.RunAdmin.live_view`); it holds no run logic itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from .backends.base import ACTIVE, BaseBackend, RunState
from .events import DELTA, ORIGIN, parse_id
from .exceptions import RunNotFound, TooManySubscribers
from .models import Run
from .runs import get_service

#: Seconds a summary waits for a log that has not reached what the backend
#: reported a moment before (a Redis mirror catching up); then it stops there.
READ_WAIT = 1.0


@dataclass(frozen=True, slots=True)
class LogSummary:
    """What a run's log holds, read from its start."""

    #: Its events other than text, by type, in the order each type first
    #: appears: ``{"start": 1, "usage": 3, "done": 1}``.
    counts: dict[str, int] = field(default_factory=dict)
    #: Characters of text it holds. Its text deltas are not counted as events:
    #: the log keeps consecutive deltas as one piece of text.
    text_chars: int = 0
    #: The id of the last event read.
    last_id: str = ""


async def refresh(run: Run) -> LogSummary | None:
    """Bring ``run`` (a row) up to date in place, and summarise its log.

    ``run`` is read again (`RunService.resolve`: a row left in flight by a
    process that died is marked ``interrupted``). While it is in flight and
    the backend holds it, its ``status``, ``output``, ``error``, ``usage``,
    ``first_token_at``, ``finished_at`` and ``last_event_id`` are the live
    ones, as a client reading its log now would see them; an ended run is
    what its row holds.

    Returns the summary of its log while the backend keeps it (in flight, or
    ended and not yet evicted: ``EVICT_AFTER``), else None: the log is gone,
    is held by another process (the memory backend), or the run is no longer
    its session's current one (a later run took the session). Raises
    `BackendUnavailable` if the backend cannot be reached (Redis down).
    """
    service = get_service()
    fresh = await service.resolve(run)
    for column in Run._meta.concrete_fields:
        setattr(run, column.attname, getattr(fresh, column.attname))
    backend = service.backend
    state = await backend.find(run.session_key, run.id.hex)
    if state is None:
        return None
    if run.status in ACTIVE:
        _apply(run, state)
    return await _summary(backend, state)


def _apply(run: Run, state: RunState) -> None:
    """The live state on the row, as `RunService.status` shows it."""
    run.status = state.status
    run.output = state.output
    run.error = state.error
    run.usage = state.usage
    run.last_event_id = state.last_id
    run.input_request = state.input_request
    if state.first_token_at is not None:
        run.first_token_at = datetime.fromtimestamp(state.first_token_at, UTC)
    if state.finished_at is not None:
        run.finished_at = datetime.fromtimestamp(state.finished_at, UTC)


async def _summary(backend: BaseBackend, state: RunState) -> LogSummary | None:
    """Replay the log the backend holds for the run of ``state`` as a
    subscriber does, up to where ``state`` saw it (``last_id``): a read of
    what is there, without waiting for what the run logs next."""
    try:
        subscription = await backend.subscribe(state.session_key)
    except (RunNotFound, TooManySubscribers):
        return None  # evicted since, or no room for one more subscriber now
    counts: dict[str, int] = {}
    chars, last_id, position = 0, "", ORIGIN
    target = parse_id(state.last_id)[1]
    async with subscription:
        if subscription.run_id != state.run_id:
            return None  # a later run of the session is its current one
        while position < target:
            try:
                batch = await subscription.next_batch(READ_WAIT)
            except StopAsyncIteration:
                break  # its terminal event was read
            if not batch:
                break  # a copy of the log lagging behind: what it has so far
            for event in batch:
                if event.event == DELTA:
                    chars += len(event.data["text"])
                else:
                    counts[event.event] = counts.get(event.event, 0) + 1
                last_id = event.id
            position = parse_id(last_id)[1]
    return LogSummary(counts=counts, text_chars=chars, last_id=last_id)

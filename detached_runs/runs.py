"""The service: start, subscribe, stop and status for a session.

It wraps the agent (turning what it yields into log items), assembles nothing
itself (the backend's log holds the text), saves the `Run` row at start, every
``CHECKPOINT_EVERY`` seconds and at the end, checks ownership, and serves a run
from the database once the backend no longer holds it::

    from detached_runs import runs

    run = await runs.start("chat-1", prompt="Hello", owner=request.user)
    async for event in runs.subscribe("chat-1", owner=request.user):
        ...
    await runs.stop("chat-1", owner=request.user)
    latest = await runs.status("chat-1", owner=request.user)

``owner=None`` means a trusted caller (your own code, the admin): no
ownership check, and a run it starts belongs to nobody in particular.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import re
import secrets
import socket
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.db import connections, router, transaction
from django.db.models import Field
from django.dispatch import Signal
from django.utils import timezone
from django.utils.module_loading import import_string

from .backends import load_backend
from .backends.base import (
    INTERRUPTED,
    READ_CHUNK,
    RUNNING,
    BaseBackend,
    Item,
    RunEnd,
    RunState,
    Subscription,
    piece_end,
)
from .conf import get_config
from .db import data_errors, database_errors, run_sync
from .events import DELTA, DONE, ORIGIN, RESERVED, START, Event, Position, make_id, parse_id
from .exceptions import (
    AgentError,
    BadEventId,
    BadPrompt,
    BadSessionKey,
    NotAllowed,
    RunNotFound,
    TooManyRuns,
)
from .lifecycle import install_signal_handlers
from .models import Run
from .owners import ANONYMOUS, limited_address, may_access, owner_key
from .signals import run_finished, run_started
from .text import clean_json, clean_text

logger = logging.getLogger(__name__)

SESSION_KEY_RE = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")
_EVENT_TYPE_RE = re.compile(r"\A[A-Za-z0-9_.:-]{1,64}\Z")
#: Delays between attempts of the final save.
SAVE_RETRY_DELAYS = (0.05, 0.2, 0.5, 1.0, 2.0)

Agent = Callable[["AgentContext"], AsyncIterator[Any]]


@dataclass(frozen=True, slots=True)
class Turn:
    """An earlier run of the session, as the agent sees it in ``ctx.history``."""

    prompt: str
    output: str
    status: str


@dataclass(frozen=True, slots=True)
class AgentContext:
    """What the agent is called with."""

    session_key: str
    prompt: str
    history: tuple[Turn, ...]
    owner: str
    run_id: str


def validate_session_key(session_key: object) -> str:
    if not isinstance(session_key, str) or not SESSION_KEY_RE.match(session_key):
        raise BadSessionKey("Invalid session key: use 1-64 characters of A-Z, a-z, 0-9, _ and -.")
    return session_key


def validate_prompt(prompt: object) -> str:
    """The prompt, cleaned (`detached_runs.text.clean_text`: NUL and lone
    surrogates become U+FFFD); `BadPrompt` if it is not a string, is empty or
    is longer than ``MAX_PROMPT_CHARS``."""
    if not isinstance(prompt, str):
        raise BadPrompt("The prompt must be a string.")
    prompt = clean_text(prompt)
    if not prompt.strip():
        raise BadPrompt("The prompt is empty.")
    limit = get_config()["MAX_PROMPT_CHARS"]
    if limit is not None and len(prompt) > limit:
        raise BadPrompt(f"The prompt is too long ({len(prompt)} characters; the limit is {limit}).")
    return prompt


def load_agent(value: Any = None) -> Agent:
    value = value if value is not None else get_config()["AGENT"]
    if value is None:
        raise ImproperlyConfigured("Set DETACHED_RUNS['AGENT'] to the dotted path of your agent.")
    agent = import_string(value) if isinstance(value, str) else value
    if not callable(agent):
        raise ImproperlyConfigured(f"DETACHED_RUNS['AGENT'] = {value!r} is not callable.")
    return agent


_worker: dict[int, str] = {}


def worker_id() -> str:
    """This process: ``host:pid:boot`` (a fork gets its own)."""
    pid = os.getpid()
    if pid not in _worker:
        _worker[pid] = f"{socket.gethostname()}:{pid}:{secrets.token_hex(4)}"
    return _worker[pid]


def _orphaned(row: Run) -> bool:
    if row.worker and row.worker != worker_id():
        host, _, rest = row.worker.partition(":")
        pid = rest.partition(":")[0]
        if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
            return True
    return row.updated_at < timezone.now() - _stale_after()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _heartbeat_every() -> float:
    return max(float(get_config()["CHECKPOINT_EVERY"]), 2.0)


def _stale_after() -> timedelta:
    """How old a running row's heartbeat may be before its process counts as dead."""
    return timedelta(seconds=3 * _heartbeat_every() + 5)


class _Recorder:
    """The service's side of one run: feeds the agent to the backend, saves the row."""

    def __init__(
        self,
        service: RunService,
        backend: BaseBackend,
        run: Run,
        agent: Agent,
        history: tuple[Turn, ...] | None = None,
    ) -> None:
        self.service = service
        self.backend = backend
        self.run = run
        self.agent = agent
        self.history = history
        # What the last checkpoint saved, and when.
        self.saved_id, self.beat = "", time.monotonic()

    async def source(self) -> AsyncIterator[Item]:
        run = self.run
        history = self.history
        if history is None:
            history = await self.service.history(run)
        ctx = AgentContext(run.session_key, run.prompt, history, run.owner, str(run.id))
        stream = self.agent(ctx)
        if not hasattr(stream, "__anext__"):
            if asyncio.iscoroutine(stream):
                stream.close()
            raise AgentError("The agent must return an async iterator (an async generator).")
        self.service._checkpoints.add(self)
        try:
            async for item in stream:
                normalised = _normalise(item)
                if normalised is not None:
                    yield normalised
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    def checkpoint(self) -> tuple[str, str] | None:
        """``(output, last id)`` if the row is due a checkpoint (new text, or a
        heartbeat to show its process is alive), else None."""
        snapshot = self.backend.output(self.run.session_key, self.run.id.hex)
        if snapshot is None:
            return None
        if snapshot[1] == self.saved_id and time.monotonic() - self.beat < _heartbeat_every():
            return None
        return snapshot

    async def finalize(self, end: RunEnd) -> bool:
        """Save the run's end (`detached_runs.backends.base.Finalize`), trying
        again a few times (`SAVE_RETRY_DELAYS`) while the database fails;
        False if it still failed (the backend keeps the run and calls again)."""
        # A checkpoint written after this save finds the row no longer running.
        self.service._checkpoints.discard(self)
        now = timezone.now()
        fields = {
            "status": end.status,
            "output": end.output,
            "error": end.error,
            "last_event_id": end.terminal_id,
            "finished_at": now,
            "updated_at": now,
        }
        ended, escaped = 0, False
        delays = iter((*SAVE_RETRY_DELAYS, None))
        while True:
            try:
                ended = await run_sync(_save_end, self.run.pk, fields)
                break
            except data_errors() as exc:
                failure: Exception = exc
                if escaped:
                    delay = None  # refused even as ASCII: trying again changes nothing
                else:
                    # The database refused the text itself (a column whose
                    # character set cannot hold it): the answer reached clients,
                    # so it is saved escaped rather than lost.
                    logger.error(
                        "The database refused the text of run %s; saving it escaped as ASCII",
                        self.run.id.hex,
                        exc_info=True,
                    )
                    fields |= {"output": _escaped(end.output), "error": _escaped(end.error)}
                    escaped = True
                    continue
            except database_errors() as exc:
                failure, delay = exc, next(delays)
            if delay is None:
                logger.error(
                    "Could not save run %s (%s, %d characters)",
                    self.run.id.hex,
                    end.status,
                    len(end.output),
                    exc_info=failure,
                )
                return False
            logger.warning("Saving run %s failed; retrying in %ss", self.run.id.hex, delay)
            await asyncio.sleep(delay)
        if ended:
            run = copy.copy(self.run)  # the caller of start() keeps its own
            for name, value in fields.items():
                setattr(run, name, value)
            await self.service._announce(run_finished, run, status=end.status, output=end.output)
        return True


class _Checkpoints:
    """Checkpoints of every run this service drives, written together: one
    task and one trip to the database per ``CHECKPOINT_EVERY``, however many
    runs are in flight (a task and a transaction per run would cost a thousand
    commits a second at a thousand runs)."""

    def __init__(self) -> None:
        self._recorders: set[_Recorder] = set()
        self._task: asyncio.Task[None] | None = None

    def add(self, recorder: _Recorder) -> None:
        loop = asyncio.get_running_loop()
        if self._task is not None and self._task.get_loop() is not loop:
            # A new event loop (tests run one each): what the old one held is gone.
            self._recorders, self._task = set(), None
        self._recorders.add(recorder)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._loop(), name="detached_runs:checkpoints")

    def discard(self, recorder: _Recorder) -> None:
        self._recorders.discard(recorder)
        if not self._recorders and self._task is not None:
            self._task.cancel()
            self._task = None

    async def _loop(self) -> None:
        every = float(get_config()["CHECKPOINT_EVERY"])
        while True:
            await asyncio.sleep(every)
            due = {r: snap for r in self._recorders if (snap := r.checkpoint()) is not None}
            if not due:
                continue
            try:
                refused = await run_sync(
                    _write_checkpoints,
                    [(r.run.pk, output, last_id) for r, (output, last_id) in due.items()],
                )
            except Exception:  # one task serves every run: it must go on
                logger.warning(
                    "Checkpoint of run %s failed; will retry",
                    ", ".join(r.run.id.hex for r in due),
                    exc_info=True,
                )
                continue
            now = time.monotonic()
            for recorder, (_output, last_id) in due.items():
                if recorder.run.pk in refused:
                    # Its data, not the database: the others' rows were written.
                    logger.warning(
                        "The database refused the checkpoint of run %s; will retry",
                        recorder.run.id.hex,
                    )
                    continue
                recorder.saved_id, recorder.beat = last_id, now


_CHECKPOINTED = ("id", "output", "last_event_id", "updated_at", "status")


def _write_checkpoints(rows: list[tuple[uuid.UUID, str, str]]) -> set[uuid.UUID]:
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


def _escaped(text: str) -> str:
    """``text`` as ASCII with backslash escapes: what a final save stores when
    the database refuses the text itself, so that it is kept, if not pretty."""
    return text.encode("ascii", "backslashreplace").decode("ascii")


def _normalise(item: Any) -> Item | None:
    """An agent's item as a log item, or None to skip it (empty text).

    The boundary of the agent's output: text and event data are cleaned here
    (`detached_runs.text`), once, so that the log, clients and the saved row
    can encode and store them on every database.
    """
    if isinstance(item, str):
        return clean_text(item) or None
    if isinstance(item, dict):
        event, data = item.get("event"), item.get("data", {})
        if not isinstance(event, str) or not _EVENT_TYPE_RE.match(event) or event in RESERVED:
            raise AgentError("The agent yielded an event with an invalid type.")
        if event == DELTA:
            text = data.get("text") if isinstance(data, dict) else None
            if not isinstance(text, str):
                raise AgentError("The agent yielded a delta without text.")
            return clean_text(text) or None
        try:
            data = clean_json(data)
        except (TypeError, ValueError) as exc:
            raise AgentError(f"The agent yielded a {event} event whose data is not JSON.") from exc
        if not isinstance(data, dict):
            data = {"value": data}
        return (event, data)
    raise AgentError("The agent yielded something that is neither text nor an event.")


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


class _Output:
    """A saved output's bytes, weakly referable (``bytes`` is not)."""

    __slots__ = ("__weakref__", "data")

    def __init__(self, data: bytes) -> None:
        self.data = data


class StoredSubscription(Subscription):
    """A run the backend no longer holds, served from its row: start, the output
    as one delta, the terminal event. A row still ``running`` elsewhere is
    polled until it ends (or its process is found dead)."""

    def __init__(
        self,
        service: RunService,
        row: Run,
        output: _Output,
        after: tuple[str, Position] | None,
    ) -> None:
        self._service = service
        # The output as UTF-8, one copy shared by every subscriber of the same
        # saved state, read once (the row holds none): ten subscribers
        # replaying a long answer hold it once, plus a piece each.
        self._row, self._output = row, output
        self.run_id = row.id.hex
        self.meta = {"owner": row.owner}
        self._cursor = ORIGIN
        if after is not None and after[0] == self.run_id:
            self._cursor = after[1]
            terminal = self._terminal()
            if row.status != RUNNING and self._cursor > terminal:
                # The client saw more than the last checkpoint before the process
                # died: nothing of the text is left to send, only the end.
                self._cursor = Position(terminal.text, terminal.seq - 1)
        self._closed = False

    @classmethod
    async def bind(
        cls, service: RunService, row: Run, after: tuple[str, Position] | None
    ) -> StoredSubscription:
        """A subscription to ``row`` (its output may be deferred)."""
        return cls(service, *await service._stored_output(row), after)

    def _terminal(self) -> Position:
        return terminal_position(self._row, len(self._output.data))

    @property
    def ended(self) -> bool:
        return self._row.status != RUNNING and self._cursor >= self._terminal()

    async def next_batch(self, timeout: float | None = None) -> list[Event]:
        waited, step = 0.0, max(float(get_config()["CHECKPOINT_EVERY"]), 0.05)
        while True:
            if self._closed or self.ended:
                raise StopAsyncIteration
            batch = self._read()
            if batch:
                return batch
            if timeout is not None and waited >= timeout:
                return []
            await asyncio.sleep(step)
            waited += step
            row = await self._service.resolve(self._row, output=False)
            self._row, self._output = await self._service._stored_output(row)

    def _read(self) -> list[Event]:
        row, cursor, terminal = self._row, self._cursor, self._terminal()
        events: list[Event] = []
        start = Position(0, 1)
        if cursor < start:
            events.append(
                Event(
                    make_id(self.run_id, start), START, {"run": str(row.id), "prompt": row.prompt}
                )
            )
        data = self._output.data
        if cursor.text < len(data):
            # In pieces of READ_CHUNK bytes, as the backends read their logs.
            cut = piece_end(data, cursor.text, READ_CHUNK)
            text = data[cursor.text : cut].decode(errors="replace")
            position = Position(cut, terminal.seq - 1)
            events.append(Event(make_id(self.run_id, position), DELTA, {"text": text}))
            if cut < len(data):
                self._cursor = position
                return events
        if row.status != RUNNING:
            body: dict[str, Any] = {"status": row.status}
            if row.error:
                body["error"] = row.error
            events.append(Event(make_id(self.run_id, terminal), DONE, body))
            position = terminal
        else:
            position = Position(len(data), max(cursor.seq, 1))
        if events:
            self._cursor = max(position, cursor)
        return events

    def close(self) -> None:
        self._closed = True


class PendingSubscription:
    """What `RunService.subscribe` returns: ``await`` it to bind (and get errors
    such as `RunNotFound` at once), or ``async for`` over it directly."""

    def __init__(
        self, service: RunService, session_key: str, after: str | None, owner: Any
    ) -> None:
        self._args = (service, session_key, after, owner)

    def __await__(self) -> Generator[Any, None, Subscription]:
        service, session_key, after, owner = self._args
        return service.open(session_key, after=after, owner=owner).__await__()

    async def __aiter__(self) -> AsyncIterator[Event]:
        subscription = await self
        async for event in subscription:
            yield event


class RunService:
    """Start, follow, stop and inspect runs; bound to one backend per event loop."""

    def __init__(self, backend: BaseBackend | None = None) -> None:
        self._fixed = backend
        if backend is not None:
            backend.on_reaped = self._save_ended_elsewhere
            backend.on_sweep = self.sweep
            backend.saved_end = self._saved_end
        self._backend: BaseBackend | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start_locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._signals_installed = False
        self._announcing: set[asyncio.Task[None]] = set()
        self._checkpoints = _Checkpoints()
        self._outputs: weakref.WeakValueDictionary[tuple[Any, ...], _Output] = (
            weakref.WeakValueDictionary()
        )
        self._loading: dict[uuid.UUID, asyncio.Future[tuple[Run, _Output]]] = {}

    @property
    def backend(self) -> BaseBackend:
        """The backend of the running event loop (an in-process registry cannot be
        shared between loops, e.g. between tests)."""
        if self._fixed is not None:
            return self._fixed
        loop = asyncio.get_running_loop()
        if self._backend is None or self._loop is not loop:
            self._backend, self._loop = load_backend(), loop
            self._backend.on_reaped = self._save_ended_elsewhere
            self._backend.on_sweep = self.sweep
            self._backend.saved_end = self._saved_end
        return self._backend

    def reset(self) -> None:
        """Forget the backend (after settings change, in tests)."""
        self._backend, self._loop = None, None

    # -- the API -----------------------------------------------------------

    async def start(
        self,
        session_key: str,
        *,
        prompt: Any,
        owner: Any = None,
        agent: Agent | str | None = None,
        address: str | None = None,
    ) -> Run:
        """Start a run for ``prompt``, stopping the session's run in flight.

        ``address`` is the client address of whoever asks (``REMOTE_ADDR``,
        ``scope["client"][0]``): an anonymous owner's runs are limited per
        address too (``MAX_ACTIVE_ANONYMOUS_RUNS_PER_ADDRESS``; an IPv6 address
        counts as its /64, `detached_runs.owners.address_group`). The owner
        keys of `request_owner` and `scope_owner` carry it already.

        Returns the `Run` row (status ``running``). Raises `BadSessionKey`,
        `BadPrompt`, `RunNotFound` (a session of another owner), `TooManyRuns`.
        """
        validate_session_key(session_key)
        prompt = validate_prompt(prompt)
        requester = None if owner is None else owner_key(owner)
        if requester == ANONYMOUS:
            # Shared by every visitor without an id: a run it started would be
            # everybody's.
            raise NotAllowed("An anonymous visitor needs an owner id to start a run.")
        network = limited_address(owner, address)
        agent = load_agent(agent)
        backend = self.backend
        # Starts from one address take turns (in this process), so that
        # simultaneous ones cannot all pass the count before any is counted.
        by_address: contextlib.AbstractAsyncContextManager[Any] = (
            self._start_lock(f"address {network}") if network else contextlib.nullcontext()
        )
        async with by_address, self._start_lock(session_key):
            current = await backend.get(session_key)
            if current is None and backend.rejoin_within is not None:
                current = await self._rejoined(backend, session_key, backend.rejoin_within)
            if current is not None and not may_access(
                requester, current.meta.get("owner", ""), session_key
            ):
                raise RunNotFound("No such session.")
            limit = get_config()["MAX_ACTIVE_RUNS_PER_OWNER"]
            if limit is not None and requester:
                active = await backend.count_running(requester)
                if current is not None and current.status == RUNNING:
                    active -= current.meta.get("owner") == requester  # it is replaced
                if active >= limit:
                    raise TooManyRuns(f"You have {active} runs in flight; the limit is {limit}.")
            if network:
                await _check_address(backend, network, current)
            backend.check_accepting()  # before the row: a refused start leaves none
            # One trip to the database thread for the owner check, the user
            # and the row. With no run in flight the agent's history is final
            # already, so it comes along; otherwise the agent reads it once the
            # run it replaces is saved.
            run, history = await run_sync(
                _open_row,
                session_key,
                prompt,
                requester,
                owner.pk if getattr(owner, "is_authenticated", False) else None,
                check_owner=current is None,
                history=(
                    int(get_config()["HISTORY_LIMIT"])
                    if current is None or (current.status != RUNNING and current.saved)
                    else None
                ),
            )
            # Before the backend starts it, so receivers see the run before its
            # agent does and always before run_finished.
            await self._announce(run_started, run)
            recorder = _Recorder(self, backend, run, agent, history)
            meta = {
                "owner": run.owner,
                "prompt": prompt,
                "uuid": str(run.id),
                "started_at": run.started_at.timestamp(),
                # Counted by, for an anonymous owner; not kept in the row.
                **({"address": network} if network else {}),
            }
            try:
                await backend.start(
                    session_key,
                    run.id.hex,
                    recorder.source(),
                    start_data={"run": str(run.id), "prompt": prompt},
                    meta=meta,
                    finalize=recorder.finalize,
                    timeout=get_config()["RUN_TIMEOUT"],
                )
            except BaseException:
                # Refused (shutting down, Redis unreachable): a refused start
                # changes nothing, so its row goes. Shielded: it must go even
                # if the request was cancelled meanwhile.
                await asyncio.shield(run_sync(Run.objects.filter(pk=run.pk).delete))
                raise
            if meta["started_at"] != run.started_at.timestamp():
                # The backend ordered the session's starts (across processes):
                # the rows follow its order, so the latest row is the current run.
                run.started_at = datetime.fromtimestamp(meta["started_at"], UTC)
                try:
                    await run_sync(Run.objects.filter(pk=run.pk).update, started_at=run.started_at)
                except database_errors():
                    logger.warning("Could not store the start time of run %s", run.id.hex)
            if not self._signals_installed:
                self._signals_installed = install_signal_handlers(self.shutdown)
        logger.info("Run %s of session %s started", run.id.hex, session_key)
        return run

    def subscribe(
        self, session_key: str, *, after: str | None = None, owner: Any = None
    ) -> PendingSubscription:
        """Replay then follow the session's current run (after ``after``, an event id)."""
        return PendingSubscription(self, session_key, after, owner)

    async def open(
        self, session_key: str, *, after: str | None = None, owner: Any = None
    ) -> Subscription:
        validate_session_key(session_key)
        parsed = parse_id(after) if after else None
        requester = None if owner is None else owner_key(owner)
        backend = self.backend
        current = await backend.get(session_key)
        if current is not None:
            if not may_access(requester, current.meta.get("owner", ""), session_key):
                raise RunNotFound("No such session.")
            await self._reconcile(current)
            try:
                return await backend.subscribe(session_key, parsed)
            except RunNotFound:
                pass  # evicted in between: the database has it
        row = await run_sync(_latest_row, session_key, output=False)
        if row is None or not may_access(requester, row.owner, session_key):
            raise RunNotFound("No such session.")
        return await StoredSubscription.bind(self, await self.resolve(row, output=False), parsed)

    async def is_free(self, session_key: str) -> bool:
        """Whether the session has no run at all (in the backend or the
        database): nobody owns it yet, and its first start makes it the
        starter's."""
        if await self.backend.get(validate_session_key(session_key)) is not None:
            return False
        return await self._latest_row(session_key) is None

    async def stop(self, session_key: str, *, owner: Any = None) -> bool:
        """Stop the session's run in flight; False if there was none."""
        validate_session_key(session_key)
        requester = None if owner is None else owner_key(owner)
        current = await self.backend.get(session_key)
        if current is None:
            row = await self._latest_row(session_key)
            if row is None or not may_access(requester, row.owner, session_key):
                raise RunNotFound("No such session.")
            return False
        if not may_access(requester, current.meta.get("owner", ""), session_key):
            raise RunNotFound("No such session.")
        stopped = await self.backend.stop(session_key, current.run_id)
        if stopped:
            logger.info("Run %s of session %s stopping", current.run_id, session_key)
        return stopped

    async def stop_run(self, run_id: uuid.UUID | str) -> bool:
        """Stop one run by id, whatever its session (the admin's action)."""
        row = await run_sync(Run.objects.filter(pk=run_id).first)
        if row is None:
            return False
        return await self.backend.stop(row.session_key, row.id.hex)

    async def status(self, session_key: str, *, owner: Any = None) -> Run | None:
        """The session's latest run (live state if in flight), or None."""
        validate_session_key(session_key)
        requester = None if owner is None else owner_key(owner)
        current = await self.backend.get(session_key)
        if current is not None:
            meta = current.meta
            if not may_access(requester, meta.get("owner", ""), session_key):
                return None
            await self._reconcile(current)
            return Run(
                id=uuid.UUID(meta["uuid"]),
                session_key=session_key,
                owner=meta.get("owner", ""),
                prompt=meta.get("prompt", ""),
                output=current.output,
                status=current.status,
                error=current.error,
                last_event_id=current.last_id,
                started_at=datetime.fromtimestamp(meta["started_at"], UTC),
                finished_at=(
                    datetime.fromtimestamp(current.finished_at, UTC)
                    if current.finished_at
                    else None
                ),
            )
        row = await self._latest_row(session_key)
        if row is None or not may_access(requester, row.owner, session_key):
            return None
        return await self.resolve(row)

    async def history(self, run: Run) -> tuple[Turn, ...]:
        """The session's runs before ``run``, oldest first."""
        limit = int(get_config()["HISTORY_LIMIT"])
        rows = Run.objects.filter(session_key=run.session_key, started_at__lte=run.started_at)
        rows = rows.exclude(pk=run.pk).order_by("-started_at")[:limit]
        return _turns(await run_sync(list, rows))

    async def resolve(self, row: Run, *, output: bool = True) -> Run:
        """Re-read a row. A ``running`` row that no live process holds is marked
        ``interrupted`` with the output of its last checkpoint, and its terminal
        event id, so that it is never shown running forever; unless the
        backend still holds the run (`BaseBackend.find`): then its end, if it
        has one, is saved instead (`_save_ended_elsewhere`), and a run it has
        in flight is left running.

        How a process knows a row is orphaned when several share the database:
        each row names the process that runs it (``worker``: host, pid, a
        random boot id) and carries a heartbeat (``updated_at``, refreshed at
        least every ``max(CHECKPOINT_EVERY, 2)`` s). A row of this host whose
        pid is gone is orphaned at once (a restart after ``kill -9``); any other
        row once its heartbeat is older than three beats plus 5 s.

        With ``output=False`` the row's output is deferred (not read) unless
        this call marked it interrupted.
        """
        fresh = await run_sync(_fresh_row, row, output=output)
        if fresh.status != RUNNING or not _orphaned(fresh):
            return fresh
        # Its process is gone, but a shared backend may hold its end and whole
        # text (its worker died while retrying the final save), or the run may
        # be in flight there: the backend's end wins over the checkpoint.
        state = await self.backend.find(fresh.session_key, fresh.id.hex)
        if state is not None:
            if state.status != RUNNING:
                await self._save_ended_elsewhere(state)
            return await run_sync(_fresh_row, fresh, output=output)
        resolved, updated = await run_sync(_mark_orphaned, fresh)
        if updated:
            logger.warning(
                "Run %s of session %s was orphaned (worker %s): marked interrupted",
                resolved.id.hex,
                resolved.session_key,
                resolved.worker,
            )
            await self._announce(
                run_finished, resolved, status=resolved.status, output=resolved.output
            )
        return resolved

    async def sweep(self, limit: int = 100) -> int:
        """Resolve the rows left ``running`` whose heartbeat is stale (`resolve`:
        marked ``interrupted`` with their last checkpoint) and that the backend
        does not hold, without waiting for someone to read them; return how
        many were ended. A backend whose log outlives its workers (Redis) ends
        their runs itself; this finds what it lost too (a worker killed while
        Redis restarted empty). The Redis backend calls it about every 30 s
        (`BaseBackend.on_sweep`); call it from a periodic job otherwise."""
        ended = 0
        for row in await run_sync(_stale_rows, limit):
            if (await self.resolve(row, output=False)).status != RUNNING:
                ended += 1
        return ended

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop every run in flight and wait for their saves (graceful shutdown)."""
        if timeout is None:
            timeout = float(get_config()["SHUTDOWN_TIMEOUT"])
        if self._backend is not None or self._fixed is not None:
            await self.backend.shutdown(timeout)
        if self._announcing:
            await asyncio.wait(self._announcing, timeout=timeout)

    async def _announce(self, signal: Signal, run: Run, **kwargs: Any) -> None:
        """Send ``signal`` (`detached_runs.signals`) about ``run`` to its receivers.

        A receiver that raises is logged and changes nothing else. The sending
        is shielded: a caller cancelled meanwhile (a client that went away)
        does not cut the receivers short, since nobody sends it again.
        """
        if not signal.has_listeners(Run):
            return
        task = asyncio.create_task(
            _send_robust(signal, run, **kwargs), name=f"detached_runs:signal:{run.id.hex}"
        )
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)
        await asyncio.shield(task)

    # -- internals ---------------------------------------------------------

    async def _reconcile(self, state: RunState) -> None:
        """A run the backend ended for a dead worker (``interrupted``, rebuilt
        from a shared log) is saved with that output: its worker never will."""
        if state.status == INTERRUPTED:
            await self._save_ended_elsewhere(state)

    async def _save_ended_elsewhere(self, state: RunState) -> bool:
        """Save the end of a run whose worker is gone (`BaseBackend.on_reaped`),
        as a shared backend holds it: ``interrupted`` with its log's output for
        a run the backend reaped, or the run's own end for one whose worker
        died while retrying its final save. Only a row still ``running`` is
        written, so that the run is saved, and announced, once.

        False if the row holds another end already: its worker saved it, but
        died before its log reached the backend (a shutdown while Redis paused
        its writes), so the row, not the backend's copy, is the run's end."""
        if state.status == RUNNING or "uuid" not in state.meta:
            return True
        row, ended = await run_sync(
            _save_reaped,
            state.meta["uuid"],
            state.output,
            state.last_id,
            status=state.status,
            error=state.error,
        )
        if ended and row is not None:
            await self._announce(run_finished, row, status=row.status, output=row.output)
        return row is None or row.last_event_id == state.last_id or ended

    async def _saved_end(self, pk: str) -> tuple[str, str, str, str] | None:
        """`BaseBackend.saved_end`: the end the row of run ``pk`` holds, if any."""
        row = await run_sync(Run.objects.filter(pk=pk).exclude(status=RUNNING).first)
        if row is None:
            return None
        return row.status, row.error, row.output, row.last_event_id

    async def _rejoined(
        self, backend: BaseBackend, session_key: str, within: float
    ) -> RunState | None:
        """The session's run in flight that a shared backend lost, once its
        worker wrote it back; None if there is none or it did not come back.

        The database shows the session's latest run ``running`` and its
        process alive (`_orphaned`), yet the backend does not know it: Redis
        restarted empty, and the worker running it has not written it back
        yet. Starting now would put two runs of the session in flight, so the
        start waits (up to ``within`` s) for the run to be back, and then
        replaces it as usual. A run whose worker is gone never comes back:
        the start goes on after the wait, and the row is resolved as orphaned.
        """
        row = await run_sync(_latest_row, session_key, output=False)
        if row is None or row.status != RUNNING or _orphaned(row):
            return None
        logger.warning(
            "Run %s of session %s is in flight in the database but unknown to the backend "
            "(did Redis lose its data?); waiting up to %s s for its worker to bring it back",
            row.id.hex,
            session_key,
            within,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            await asyncio.sleep(0.1)
            state = await backend.get(session_key)
            if state is not None:
                return state
            if not await run_sync(Run.objects.filter(pk=row.pk, status=RUNNING).exists):
                return None
        logger.warning("Run %s did not come back; starting the next run anyway", row.id.hex)
        return None

    async def _stored_output(self, row: Run) -> tuple[Run, _Output]:
        """``row`` without its output, and the output as UTF-8 bytes, shared by
        the stored subscriptions of that run in that saved state for as long
        as any of them holds it. The output is read from the database only if
        none does (``row``'s own output may be deferred), and once however
        many subscribers ask for it at the same time."""
        cached = self._outputs.get((row.pk, row.status, row.last_event_id))
        if cached is not None:
            row.output = ""
            return row, cached
        pk = row.pk
        loading = self._loading.get(pk)
        if loading is None:
            loading = self._loading[pk] = asyncio.ensure_future(self._load_output(pk))
            loading.add_done_callback(lambda _: self._loading.pop(pk, None))
        full, output = await asyncio.shield(loading)
        return copy.copy(full), output  # each subscription keeps a row of its own

    async def _load_output(self, pk: uuid.UUID) -> tuple[Run, _Output]:
        full: Run | None = await run_sync(Run.objects.filter(pk=pk).first)
        if full is None:
            raise RunNotFound("No such session.")
        output = _Output(full.output.encode())
        full.output = ""
        self._outputs[(full.pk, full.status, full.last_event_id)] = output
        return full, output

    async def _latest_row(self, session_key: str) -> Run | None:
        return await run_sync(_latest_row, session_key)

    def _start_lock(self, session_key: str) -> _StartLock:
        return _StartLock(self._start_locks, session_key)


async def _check_address(backend: BaseBackend, network: str, current: RunState | None) -> None:
    """`RunService.start`'s limit of anonymous runs per client address."""
    limit = get_config()["MAX_ACTIVE_ANONYMOUS_RUNS_PER_ADDRESS"]
    active = await backend.count_running(address=network)
    if current is not None and current.status == RUNNING:
        active -= current.meta.get("address") == network  # it is replaced
    if active >= limit:
        raise TooManyRuns(
            f"There are {active} runs in flight from your network address without a login; "
            f"the limit is {limit}. Wait for one of them to finish, or log in."
        )


async def _send_robust(signal: Signal, run: Run, **kwargs: Any) -> None:
    name = "run_started" if signal is run_started else "run_finished"
    for receiver, result in await signal.asend_robust(sender=Run, run=run, **kwargs):
        if isinstance(result, Exception):
            logger.error(
                "Receiver %r of %s failed for run %s",
                receiver,
                name,
                run.id.hex,
                exc_info=(type(result), result, result.__traceback__),
            )


def _open_row(
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
    turns = None
    if history is not None:
        turns = _turns(rows[:history])
    return run, turns


def _save_end(pk: uuid.UUID, fields: dict[str, Any]) -> int:
    """A run's final save (sync, on the database thread); 1 if it ended the row."""
    ended = Run.objects.filter(pk=pk, status=RUNNING).update(**fields)
    if not ended:
        # Another process found the run orphaned, ended its row and announced
        # it: this save still has the last word, but the run is not announced
        # twice.
        Run.objects.filter(pk=pk).update(**fields)
    return ended


def _save_reaped(
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


def _stale_rows(limit: int) -> list[Run]:
    """Up to ``limit`` running rows whose heartbeat is older than `_stale_after`
    (their output deferred), the oldest first."""
    stale = timezone.now() - _stale_after()
    rows = Run.objects.filter(status=RUNNING, updated_at__lt=stale).defer("output")
    return list(rows.order_by("updated_at")[:limit])


def _latest_row(session_key: str, *, output: bool = True) -> Run | None:
    rows = Run.objects.filter(session_key=session_key).order_by("-started_at")
    return (rows if output else rows.defer("output")).first()


def _fresh_row(row: Run, *, output: bool = True) -> Run:
    """``row`` read again (its output deferred, unless ``output``); ``row``
    itself if it is gone."""
    rows = Run.objects.filter(pk=row.pk)
    return (rows if output else rows.defer("output")).first() or row


def _mark_orphaned(fresh: Run) -> tuple[Run, bool]:
    """`RunService.resolve`'s write (sync, on the database thread): mark the
    orphaned ``fresh`` row interrupted at its last checkpoint, unless it
    changed since it was read; the row read again (with its output), and
    whether this call marked it."""
    terminal = make_id(fresh.id.hex, terminal_position(fresh))
    updated = Run.objects.filter(pk=fresh.pk, status=RUNNING, updated_at=fresh.updated_at).update(
        status=Run.Status.INTERRUPTED, finished_at=timezone.now(), last_event_id=terminal
    )
    return Run.objects.get(pk=fresh.pk), bool(updated)


def _turns(rows: list[Run]) -> tuple[Turn, ...]:
    """A session's rows, newest first, as the agent's history: oldest first."""
    return tuple(Turn(r.prompt, r.output, r.status) for r in reversed(rows))


class _StartLock:
    """A per-session lock that disappears when nobody holds or waits for it,
    so starts of one session are ordered (row creation, then backend start)."""

    def __init__(self, locks: dict[str, tuple[asyncio.Lock, int]], key: str) -> None:
        self._locks, self._key = locks, key

    async def __aenter__(self) -> None:
        lock, users = self._locks.get(self._key) or (asyncio.Lock(), 0)
        self._locks[self._key] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._release_user()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._locks[self._key][0].release()
        self._release_user()

    def _release_user(self) -> None:
        lock, users = self._locks[self._key]
        if users <= 1:
            del self._locks[self._key]
        else:
            self._locks[self._key] = (lock, users - 1)


_service = RunService()


def get_service() -> RunService:
    return _service


async def start(
    session_key: str,
    *,
    prompt: Any,
    owner: Any = None,
    agent: Agent | str | None = None,
    address: str | None = None,
) -> Run:
    return await _service.start(
        session_key, prompt=prompt, owner=owner, agent=agent, address=address
    )


def subscribe(
    session_key: str, *, after: str | None = None, owner: Any = None
) -> PendingSubscription:
    return _service.subscribe(session_key, after=after, owner=owner)


async def stop(session_key: str, *, owner: Any = None) -> bool:
    return await _service.stop(session_key, owner=owner)


async def status(session_key: str, *, owner: Any = None) -> Run | None:
    return await _service.status(session_key, owner=owner)

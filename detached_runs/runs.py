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

The service is this module; its parts live beside it, each with one job:
`detached_runs.agents.base` (what an agent is and is called with),
`detached_runs.validation` (session keys and prompts),
`detached_runs.recording` (a run's agent fed to the backend, its row's
checkpoints and final save), `detached_runs.rows` (every database read and
write of runs), `detached_runs.stored` (a run served from its row) and
`detached_runs.workers` (this process's id, and whether another's is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Generator
from datetime import UTC, datetime
from typing import Any

from django.dispatch import Signal

from . import rows
from .agents.base import Agent, AgentContext, Turn, load_agent
from .backends import load_backend
from .backends.base import INTERRUPTED, RUNNING, BaseBackend, RunState, Subscription
from .conf import get_config
from .db import database_errors, run_sync
from .events import Event, parse_id
from .exceptions import NotAllowed, RunNotFound, TooManyRuns
from .lifecycle import install_signal_handlers
from .models import Run
from .owners import ANONYMOUS, limited_address, may_access, owner_key
from .recording import SAVE_RETRY_DELAYS, Checkpoints, Recorder
from .rows import terminal_position
from .signals import run_finished, run_started
from .stored import StoredOutputs, StoredSubscription
from .validation import SESSION_KEY_RE, validate_prompt, validate_session_key
from .workers import worker_id

__all__ = [
    "SAVE_RETRY_DELAYS",
    "SESSION_KEY_RE",
    "Agent",
    "AgentContext",
    "PendingSubscription",
    "RunService",
    "StoredSubscription",
    "Turn",
    "get_service",
    "load_agent",
    "start",
    "status",
    "stop",
    "subscribe",
    "terminal_position",
    "validate_prompt",
    "validate_session_key",
    "worker_id",
]

logger = logging.getLogger(__name__)


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
        self._checkpoints = Checkpoints()
        self._outputs = StoredOutputs()

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
                rows.open_row,
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
            recorder = Recorder(
                backend,
                run,
                agent,
                checkpoints=self._checkpoints,
                announce=self._announce,
                read_history=self.history,
                history=history,
            )
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
                await asyncio.shield(run_sync(rows.delete_row, run.pk))
                raise
            if meta["started_at"] != run.started_at.timestamp():
                # The backend ordered the session's starts (across processes):
                # the rows follow its order, so the latest row is the current run.
                run.started_at = datetime.fromtimestamp(meta["started_at"], UTC)
                try:
                    await run_sync(rows.set_started_at, run.pk, run.started_at)
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
        row = await run_sync(rows.latest_row, session_key, output=False)
        if row is None or not may_access(requester, row.owner, session_key):
            raise RunNotFound("No such session.")
        return await StoredSubscription.bind(
            self._resolve_deferred, self._outputs, await self.resolve(row, output=False), parsed
        )

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
        return await run_sync(rows.earlier_turns, run, int(get_config()["HISTORY_LIMIT"]))

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
        fresh = await run_sync(rows.fresh_row, row, output=output)
        if fresh.status != RUNNING or not rows.orphaned(fresh):
            return fresh
        # Its process is gone, but a shared backend may hold its end and whole
        # text (its worker died while retrying the final save), or the run may
        # be in flight there: the backend's end wins over the checkpoint.
        state = await self.backend.find(fresh.session_key, fresh.id.hex)
        if state is not None:
            if state.status != RUNNING:
                await self._save_ended_elsewhere(state)
            return await run_sync(rows.fresh_row, fresh, output=output)
        resolved, updated = await run_sync(rows.mark_orphaned, fresh)
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

    async def _resolve_deferred(self, row: Run) -> Run:
        return await self.resolve(row, output=False)

    async def sweep(self, limit: int = 100) -> int:
        """Resolve the rows left ``running`` whose heartbeat is stale (`resolve`:
        marked ``interrupted`` with their last checkpoint) and that the backend
        does not hold, without waiting for someone to read them; return how
        many were ended. A backend whose log outlives its workers (Redis) ends
        their runs itself; this finds what it lost too (a worker killed while
        Redis restarted empty). The Redis backend calls it about every 30 s
        (`BaseBackend.on_sweep`); call it from a periodic job otherwise."""
        ended = 0
        for row in await run_sync(rows.stale_rows, limit):
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
            rows.save_reaped,
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
        row = await run_sync(rows.ended_row, pk)
        if row is None:
            return None
        return row.status, row.error, row.output, row.last_event_id

    async def _rejoined(
        self, backend: BaseBackend, session_key: str, within: float
    ) -> RunState | None:
        """The session's run in flight that a shared backend lost, once its
        worker wrote it back; None if there is none or it did not come back.

        The database shows the session's latest run ``running`` and its
        process alive (`rows.orphaned`), yet the backend does not know it: Redis
        restarted empty, and the worker running it has not written it back
        yet. Starting now would put two runs of the session in flight, so the
        start waits (up to ``within`` s) for the run to be back, and then
        replaces it as usual. A run whose worker is gone never comes back:
        the start goes on after the wait, and the row is resolved as orphaned.
        """
        row = await run_sync(rows.latest_row, session_key, output=False)
        if row is None or row.status != RUNNING or rows.orphaned(row):
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
            if not await run_sync(rows.is_running, row.pk):
                return None
        logger.warning("Run %s did not come back; starting the next run anyway", row.id.hex)
        return None

    async def _latest_row(self, session_key: str) -> Run | None:
        return await run_sync(rows.latest_row, session_key)

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

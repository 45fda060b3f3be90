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
    page = await runs.sessions(owner=request.user)            # the conversations
    page = await runs.session_runs("chat-1", owner=request.user)
    await runs.delete("chat-1", owner=request.user)

``owner=None`` means a trusted caller (your own code, the admin): no
ownership check, and a run it starts belongs to nobody in particular.

The service is this module; its parts live beside it, each with one job:
`detached_runs.agents.base` (what an agent is and is called with),
`detached_runs.validation` (session keys and prompts),
`detached_runs.listing` (the conversations, a page at a time),
`detached_runs.recording` (a run's agent fed to the backend, its row's
checkpoints and final save), `detached_runs.rows` (every database read and
write of runs), `detached_runs.stored` (a run served from its row) and
`detached_runs.workers` (this process's id, and whether another's is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import functools
import logging
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Generator
from datetime import UTC, datetime
from typing import Any

from django.dispatch import Signal
from django.utils import timezone

from . import listing, metrics, rows
from .agents.base import Agent, AgentContext, Turn, load_agent
from .backends import load_backend
from .backends.base import ACTIVE, INTERRUPTED, BaseBackend, RunState, Subscription
from .backends.driver import call_in_loop
from .conf import get_config
from .db import database_errors, run_sync
from .events import Event, parse_id
from .exceptions import (
    BackendUnavailable,
    InputNotPending,
    NotAllowed,
    RunNotFound,
    SessionBusy,
    TooManyRuns,
)
from .lifecycle import install_signal_handlers
from .listing import RunsPage, SessionsPage, SessionSummary
from .models import Run
from .owners import ANONYMOUS, limited_address, may_access, owner_key
from .recording import SAVE_RETRY_DELAYS, Checkpoints, Recorder
from .rows import terminal_position
from .signals import run_finished, run_started
from .stored import StoredOutputs, StoredSubscription
from .validation import (
    SESSION_KEY_RE,
    clean_options,
    validate_answer,
    validate_multitask,
    validate_prompt,
    validate_session_key,
)
from .workers import stale_after, worker_id

__all__ = [
    "SAVE_RETRY_DELAYS",
    "SESSION_KEY_RE",
    "Agent",
    "AgentContext",
    "PendingSubscription",
    "RunService",
    "RunsPage",
    "SessionSummary",
    "SessionsPage",
    "StoredSubscription",
    "Turn",
    "delete",
    "get_service",
    "load_agent",
    "session_runs",
    "sessions",
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

QUEUED = Run.Status.QUEUED
#: Seconds of ``SHUTDOWN_TIMEOUT`` (at most half of it) that a ``"drain"``
#: shutdown keeps for interrupting the runs still in flight and saving them.
DRAIN_RESERVE = 5.0
#: Seconds a shutdown, once its runs ended, waits for the streaming responses
#: still open to close before it returns (`RunService.stream_opened`): their
#: clients have their runs' ends by then, or were hung up on.
STREAMS_CLOSE_WITHIN = 2.0

#: Seconds a subscriber past the end of a run waits for the next queued run to
#: start (`RunService.open`), before it is told the run ended.
QUEUE_WAIT = 5.0


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
        #: The subscriptions `open` handed out that had not ended then: a
        #: shutdown hangs up on those its runs' ends do not reach (`hang_up`).
        self._open: weakref.WeakSet[Subscription] = weakref.WeakSet()
        #: Tokens of the streaming responses open now (`stream_opened`), and
        #: what a shutdown waiting for them to close waits on.
        self._streams: set[object] = set()
        self._no_streams: asyncio.Event | None = None
        #: Tasks a shutdown waits for: signals being sent, queued runs being started.
        self._announcing: set[asyncio.Task[Any]] = set()
        self._checkpoints = Checkpoints()
        self._outputs = StoredOutputs()
        #: The agents given to `start` for runs this process queued, by session.
        self._queued_agents: dict[str, dict[uuid.UUID, Agent]] = {}
        #: The sessions this process saw queued runs of (wrote one, or a
        #: start's row showed one), until a look finds none: with a
        #: process-local backend, only their runs' ends look for the next one.
        self._queues: set[str] = set()
        # `hurry`: set once a second signal came; the event, while a drain waits.
        self._hurried = False
        self._hurry: asyncio.Event | None = None

    @property
    def backend(self) -> BaseBackend:
        """The backend of the running event loop (an in-process registry cannot be
        shared between loops, e.g. between tests)."""
        if self._fixed is not None:
            return self._fixed
        loop = asyncio.get_running_loop()
        if self._backend is None or self._loop is not loop:
            if self._loop is not loop:
                # What a former event loop held (its locks, tasks, streams) is gone with it.
                self._start_locks, self._announcing = {}, set()
                self._open, self._streams = weakref.WeakSet(), set()
            self._backend, self._loop = load_backend(), loop
            self._backend.on_reaped = self._save_ended_elsewhere
            self._backend.on_sweep = self.sweep
            self._backend.saved_end = self._saved_end
        return self._backend

    def reset(self) -> None:
        """Forget the backend (after settings change, in tests), and what this
        process held for its runs (start locks, agents of queued runs)."""
        self._backend, self._loop = None, None
        self._start_locks, self._queued_agents, self._queues = {}, {}, set()
        self._open, self._streams = weakref.WeakSet(), set()
        self._hurried, self._hurry = False, None

    # -- the API -----------------------------------------------------------

    async def start(
        self,
        session_key: str,
        *,
        prompt: Any,
        owner: Any = None,
        agent: Agent | str | None = None,
        address: str | None = None,
        options: Any = None,
        multitask: str | None = None,
    ) -> Run:
        """Start a run for ``prompt``; what happens to the session's run in
        flight (or queued) is ``multitask``'s (default: the ``MULTITASK``
        setting):

        * ``"interrupt"``: it is stopped (its partial output saved,
          ``stopped``) and the queued runs are cancelled (``stopped``, no
          output); then this run starts.
        * ``"reject"``: nothing changes; `SessionBusy` (409).
        * ``"enqueue"``: this run is queued (a row with status ``queued`` at
          once) and starts when every earlier run of the session has ended,
          in the order they were sent, on whichever process ends the run
          before it (`_promote`); `QueueFull` (429) past
          ``MAX_QUEUED_PER_SESSION``. With nothing in flight or queued it
          starts at once.
        * ``"rollback"``: as ``interrupt``, but the rows of the run in flight
          and of the queued runs are deleted: they are not in the history.

        ``options`` (a JSON object, default ``{}``) is cleaned by
        `detached_runs.validation.clean_options` (``MAX_OPTIONS_BYTES``,
        ``VALIDATE_OPTIONS``), stored on the row and handed to the agent as
        ``ctx.options``.

        ``address`` is the client address of whoever asks (``REMOTE_ADDR``,
        ``scope["client"][0]``): an anonymous owner's runs are limited per
        address too (``MAX_ACTIVE_ANONYMOUS_RUNS_PER_ADDRESS``; an IPv6 address
        counts as its /64, `detached_runs.owners.address_group`). The owner
        keys of `request_owner` and `scope_owner` carry it already.

        Returns the `Run` row (status ``running``, or ``queued``). Raises
        `BadSessionKey`, `BadPrompt`, `BadOptions`, `BadMultitask`,
        `RunNotFound` (a session of another owner), `TooManyRuns`,
        `SessionBusy`, `QueueFull`, `BackendUnavailable`.
        """
        validate_session_key(session_key)
        prompt = validate_prompt(prompt)
        multitask = validate_multitask(multitask)
        requester = None if owner is None else owner_key(owner)
        if requester == ANONYMOUS:
            # Shared by every visitor without an id: a run it started would be
            # everybody's.
            raise NotAllowed("An anonymous visitor needs an owner id to start a run.")
        options = await clean_options(options, requester or "")
        network = limited_address(owner, address)
        explicit_agent = agent is not None
        agent = load_agent(agent)
        backend = self.backend
        # Starts from one address take turns (in this process), so that
        # simultaneous ones cannot all pass the count before any is counted.
        by_address: contextlib.AbstractAsyncContextManager[Any] = (
            self._start_lock(f"address {network}") if network else contextlib.nullcontext()
        )
        async with by_address, self._start_lock(session_key), backend.ordered(session_key):
            current = await backend.get(session_key)
            if current is None and backend.rejoin_within is not None:
                current = await self._rejoined(backend, session_key, backend.rejoin_within)
            if current is not None and not may_access(
                requester, current.meta.get("owner", ""), session_key
            ):
                raise RunNotFound("No such session.")
            in_flight = current is not None and current.status in ACTIVE
            if in_flight and multitask == "reject":
                raise SessionBusy("The session has a run in flight; nothing was started.")
            replaces = in_flight and multitask in ("interrupt", "rollback")
            # Queued behind the session's run, the new run takes that run's
            # place when it ends: it never runs beside it, so it adds nothing
            # to what the owner or the address has in flight.
            queues = in_flight and multitask == "enqueue"
            limit = get_config()["MAX_ACTIVE_RUNS_PER_OWNER"]
            if limit is not None and requester and not queues:
                active = await backend.count_running(requester)
                if replaces and current is not None:
                    active -= current.meta.get("owner") == requester  # it is replaced
                if active >= limit:
                    raise TooManyRuns(f"You have {active} runs in flight; the limit is {limit}.")
            if network and not queues:
                await _check_address(backend, network, current if replaces else None)
            backend.check_accepting()  # before the row: a refused start leaves none
            # One trip to the database thread for the owner check, the queue,
            # the user and the row. With no run in flight the agent's history
            # is final already, so it comes along; otherwise the agent reads
            # it once the run it replaces is saved.
            try:
                run, history, had_queue = await run_sync(
                    rows.open_row,
                    session_key,
                    prompt,
                    requester,
                    owner if getattr(owner, "is_authenticated", False) else None,
                    check_owner=current is None,
                    history=(
                        int(get_config()["HISTORY_LIMIT"])
                        if current is None or (current.status not in ACTIVE and current.saved)
                        else None
                    ),
                    options=options,
                    multitask=multitask,
                    in_flight=in_flight,
                    started_at=(
                        datetime.fromtimestamp(await backend.now(), UTC) if queues else None
                    ),
                )
            except SessionBusy:
                self._queues.add(session_key)  # a reject, refused for the queue
                if not in_flight:
                    # Runs queued that nothing is starting (a restart): start them.
                    self._queue_next(session_key)
                raise
            if had_queue or run.status == QUEUED:
                # Under the session's start lock, as the end's look (`_promote`).
                self._queues.add(session_key)
            if run.status == QUEUED:
                if explicit_agent:
                    self._queued_agents.setdefault(session_key, {})[run.pk] = agent
                logger.info("Run %s of session %s queued", run.id.hex, session_key)
                if not in_flight:
                    # Queued behind runs that nothing is starting (the process
                    # that ended the run before them is gone): start them now.
                    self._queue_next(session_key)
                return run
            await self._launch(run, agent, history=history, network=network)
            if multitask in ("interrupt", "rollback"):
                # Once the backend took the run (a refused start changes
                # nothing): the queue it replaces, and a rolled back run's row.
                self._queued_agents.pop(session_key, None)
                rolled_back = (
                    uuid.UUID(current.meta["uuid"])
                    if current is not None and in_flight and multitask == "rollback"
                    else None
                )
                # Most starts have neither: no second trip to the database.
                # The queue cannot have grown since the row was made: every
                # start of the session, an enqueue too, takes its turn under
                # `backend.ordered`, as this one still does.
                if had_queue or rolled_back is not None:
                    await run_sync(
                        rows.replace_pending,
                        session_key,
                        delete=multitask == "rollback",
                        rolled_back=rolled_back,
                    )
        logger.info("Run %s of session %s started", run.id.hex, session_key)
        return run

    async def _launch(
        self,
        run: Run,
        agent: Agent,
        *,
        history: tuple[Turn, ...] | None,
        network: str | None,
        queued: bool = False,
    ) -> None:
        """Hand the run whose row is ``run`` (``running``) to the backend, under
        the session's start locks. A refused start deletes the row (or puts a
        ``queued`` run back in the queue) and raises."""
        session_key, backend = run.session_key, self.backend
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
            ended=self._ended,
        )
        meta: dict[str, Any] = {
            "owner": run.owner,
            "prompt": run.prompt,
            "uuid": str(run.id),
            "started_at": run.started_at.timestamp(),
            # Counted by, for an anonymous owner; not kept in the row.
            **({"address": network} if network else {}),
            **({"options": run.options} if run.options else {}),
            # Started from the queue: a WebSocket that followed the run before
            # it follows this one too (`detached_runs.consumers`).
            **({"queued": True} if queued else {}),
        }
        try:
            await backend.start(
                session_key,
                run.id.hex,
                recorder.source(),
                start_data={"run": str(run.id), "prompt": run.prompt},
                meta=meta,
                finalize=recorder.finalize,
                timeout=get_config()["RUN_TIMEOUT"],
            )
        except BaseException:
            # Refused (shutting down, Redis unreachable): a refused start
            # changes nothing, so its row goes, or back to the queue.
            # Shielded: it must go even if the request was cancelled meanwhile.
            undo = rows.requeue if queued else rows.delete_row
            await asyncio.shield(run_sync(undo, run.pk))
            raise
        metrics.run_started()
        if not queued and meta["started_at"] != run.started_at.timestamp():
            # The backend ordered the session's starts (across processes):
            # the rows follow its order, so the latest row is the current run.
            # (A queued run got its start time, by the same clock, when it was
            # claimed: `rows.claim_queued`.)
            run.started_at = datetime.fromtimestamp(meta["started_at"], UTC)
            try:
                await run_sync(rows.set_started_at, run.pk, run.started_at)
            except database_errors():
                logger.warning("Could not store the start time of run %s", run.id.hex)
        if not self._signals_installed:
            self._signals_installed = install_signal_handlers(self.shutdown, self.hurry)

    def _ended(self, run: Run) -> None:
        """`Recorder`'s ``ended``: ``run``'s end is saved; the session's next
        queued run, if any, starts once the backend shows it ended."""
        self._queue_next(run.session_key, run.id.hex, own_end=True)

    def _queue_next(
        self, session_key: str, ended: str | None = None, *, own_end: bool = False
    ) -> None:
        """Start the session's next queued run soon (`_promote`), in a task;
        not once the backend refuses new runs (a shutdown)."""
        try:
            self.backend.check_accepting()
        except BackendUnavailable:
            return
        task = asyncio.get_running_loop().create_task(
            self._promote(session_key, ended, own_end=own_end),
            name=f"detached_runs:queue:{session_key}",
        )
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    async def _promote(
        self, session_key: str, ended: str | None = None, *, own_end: bool = False
    ) -> Run | None:
        """Start the session's oldest queued run if no run of the session is in
        flight (``ended``, the hex id of a run whose end was just saved, does
        not count); return its row, or None. ``own_end``: called for the end
        of a run of this process (`_ended`): with a process-local backend the
        queue is looked for in the database only if this process saw one of
        the session's (`_queues`), which it did of every queued run it must
        start, since it alone writes them.

        Any process may do it: the one whose run ended before it, the one a
        client asks (`start`, `open`), or the sweep of any worker
        (`sweep`). Under the session's start locks (across processes with a
        shared backend, `BaseBackend.ordered`) and a conditional claim of the
        row (`rows.claim_queued`), so that a queued run starts once and
        never beside another run of its session. The agent is the one
        ``start()`` was given, if this process queued it, else
        ``DETACHED_RUNS["AGENT"]``."""
        backend = self.backend
        try:
            if ended is not None:
                await self._ended_in(backend, session_key, ended)
            async with self._start_lock(session_key):
                # Under this process's lock a start that saw the run in flight
                # has written its queued row by now (and noted it in _queues);
                # most ends find none.
                if (
                    own_end and backend.process_local and session_key not in self._queues
                ) or not await run_sync(rows.has_queued, session_key):
                    self._queued_agents.pop(session_key, None)
                    self._queues.discard(session_key)
                    return None
                async with backend.ordered(session_key):
                    current = await backend.get(session_key)
                    if current is None and backend.rejoin_within is not None:
                        # A run in flight that a shared backend lost (Redis
                        # restarted empty) is not over: as a start, the queue
                        # waits for its worker to write it back.
                        current = await self._rejoined(backend, session_key, backend.rejoin_within)
                    if current is not None and current.status in ACTIVE:
                        return None  # its own end starts the next one
                    backend.check_accepting()
                    run = await run_sync(rows.claim_queued, session_key, await backend.now())
                    if run is None:
                        return None
                    agents = self._queued_agents.get(session_key, {})
                    agent = agents.pop(run.pk, None) or load_agent()
                    if not agents:
                        self._queued_agents.pop(session_key, None)
                    # An anonymous owner's run counts against its address, as
                    # the run before it did (the address is never stored).
                    network = None
                    if current is not None and current.meta.get("owner") == run.owner:
                        network = current.meta.get("address")
                    await self._launch(run, agent, history=None, network=network, queued=True)
        except BackendUnavailable as exc:
            # Expected, not a fault: this worker drains or shuts down (another
            # worker, or this one after its restart, starts the queue), or
            # Redis is away (the sweep tries again).
            logger.warning("Did not start the next queued run of %s: %s", session_key, exc)
            return None
        except Exception:  # a task nobody awaits: the sweep tries again later
            logger.warning("Could not start the next queued run of %s", session_key, exc_info=True)
            return None
        logger.info("Queued run %s of session %s started", run.id.hex, session_key)
        return run

    def subscribe(
        self, session_key: str, *, after: str | None = None, owner: Any = None
    ) -> PendingSubscription:
        """Replay then follow the session's current run (after ``after``, an event id)."""
        return PendingSubscription(self, session_key, after, owner)

    async def open(
        self, session_key: str, *, after: str | None = None, owner: Any = None
    ) -> Subscription:
        """What `subscribe` binds: the subscription, after ``after``. One that
        has not ended is hung up on at this process's shutdown unless its
        run's end reaches it (`shutdown`); the signal handlers that begin the
        shutdown are installed at the first one, as at the first start."""
        subscription = await self._open_subscription(session_key, after, owner)
        if not subscription.ended:
            self._open.add(subscription)
            if not self._signals_installed:
                self._signals_installed = install_signal_handlers(self.shutdown, self.hurry)
        return subscription

    async def _open_subscription(
        self, session_key: str, after: str | None, owner: Any
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
                subscription = await backend.subscribe(session_key, parsed)
            except RunNotFound:
                pass  # evicted in between: the database has it
            else:
                if not subscription.ended:
                    return subscription
                return await self._next_of_queue(session_key, subscription, parsed)
        row = await run_sync(rows.latest_row, session_key, output=False)
        if row is None or not may_access(requester, row.owner, session_key):
            raise RunNotFound("No such session.")
        stored = await StoredSubscription.bind(
            self._resolve_deferred, self._outputs, await self.resolve(row, output=False), parsed
        )
        if not stored.ended:
            return stored
        return await self._next_of_queue(session_key, stored, parsed)

    async def _ended_in(self, backend: BaseBackend, session_key: str, run_id: str) -> None:
        """Wait (up to ``QUEUE_WAIT`` s) until the backend no longer shows run
        ``run_id`` in flight: its end is saved, and its terminal event follows
        at once. A start deciding meanwhile saw it in flight and queued."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + QUEUE_WAIT
        while loop.time() < deadline:
            state = await backend.find(session_key, run_id)
            if state is None or state.status not in ACTIVE:
                return
            await asyncio.sleep(0.01)

    async def _next_of_queue(
        self, session_key: str, ended: Subscription, after: tuple[str, Any] | None
    ) -> Subscription:
        """A subscriber past the end of the session's current run follows the
        next one if runs are queued behind it (it starts within ``QUEUE_WAIT``
        seconds); else it gets ``ended`` back (a ``204`` for the events URL).

        ``ended`` is this call's until it returns: if the wait fails, or is
        cancelled (the client went away), it is closed here, since nobody
        else holds it."""
        try:
            if not await run_sync(rows.is_next, session_key, ended.run_id):
                return ended
            self._queue_next(session_key, ended.run_id)
            backend = self.backend
            loop = asyncio.get_running_loop()
            deadline = loop.time() + QUEUE_WAIT
            while loop.time() < deadline:
                current = await backend.get(session_key)
                if current is not None and current.run_id != ended.run_id:
                    await ended.aclose()
                    return await backend.subscribe(session_key, after)
                await asyncio.sleep(0.05)
        except BaseException:
            ended.close()
            raise
        return ended

    async def is_free(self, session_key: str) -> bool:
        """Whether the session has no run at all (in the backend or the
        database): nobody owns it yet, and its first start makes it the
        starter's."""
        if await self.backend.get(validate_session_key(session_key)) is not None:
            return False
        return await self._latest_row(session_key) is None

    async def _current_for(self, session_key: str, requester: str | None) -> RunState | None:
        """The session's current run as the backend holds it (None if it holds
        none), once ``requester`` may act on the session: `RunNotFound` for an
        unknown session, or one they may not access (its run's owner, else its
        latest row's)."""
        current = await self.backend.get(session_key)
        if current is None:
            row = await self._latest_row(session_key)
            if row is None or not may_access(requester, row.owner, session_key):
                raise RunNotFound("No such session.")
        elif not may_access(requester, current.meta.get("owner", ""), session_key):
            raise RunNotFound("No such session.")
        return current

    async def stop(self, session_key: str, *, owner: Any = None, queued: bool = False) -> bool:
        """Stop the session's run in flight; False if there was none. With
        ``queued``, also cancel its queued runs (each saved ``stopped`` with no
        output) first, so that none of them starts instead."""
        validate_session_key(session_key)
        requester = None if owner is None else owner_key(owner)
        backend = self.backend
        current = await self._current_for(session_key, requester)
        if queued:
            # Under the start locks: a queued run being started meanwhile is
            # in flight by the time this looks, and is stopped.
            async with self._start_lock(session_key), backend.ordered(session_key):
                cancelled = await run_sync(rows.cancel_queued, session_key)
                self._queued_agents.pop(session_key, None)
                if cancelled:
                    logger.info("Cancelled %d queued runs of %s", len(cancelled), session_key)
                current = await backend.get(session_key)
        if current is None:
            return False
        stopped = await backend.stop(session_key, current.run_id)
        if stopped:
            logger.info("Run %s of session %s stopping", current.run_id, session_key)
        return stopped

    async def answer(self, session_key: str, payload: Any, *, owner: Any = None) -> None:
        """Answer the question the session's run waits for (``ctx.ask``):
        ``payload`` is ``{"request": "<id>", "value": <JSON>}``
        (`validate_answer`). Whichever process drives the run, it takes the
        value, logs ``input_received`` and goes on.

        Raises `BadInput` for a malformed payload (400), `RunNotFound` for an
        unknown session or one the requester may not access (404), and
        `InputNotPending` (409) if the run does not wait for that request:
        answered already (of two answers, anywhere, exactly one is taken),
        timed out, ended, or another run's. Nothing changes then."""
        validate_session_key(session_key)
        request, value = validate_answer(payload)
        requester = None if owner is None else owner_key(owner)
        current = await self._current_for(session_key, requester)
        if current is None or not await self.backend.answer(session_key, request, value):
            raise InputNotPending(
                "The run is not waiting for that request: it was answered, it timed out, "
                "or the run ended (or, with the memory backend, it runs in another process)."
            )
        logger.info(
            "Run %s of session %s: request %s answered", current.run_id, session_key, request
        )

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
            live = Run(
                id=uuid.UUID(meta["uuid"]),
                session_key=session_key,
                owner=meta.get("owner", ""),
                prompt=meta.get("prompt", ""),
                options=meta.get("options") or {},
                output=current.output,
                status=current.status,
                error=current.error,
                usage=current.usage,
                first_token_at=(
                    datetime.fromtimestamp(current.first_token_at, UTC)
                    if current.first_token_at
                    else None
                ),
                last_event_id=current.last_id,
                started_at=datetime.fromtimestamp(meta["started_at"], UTC),
                finished_at=(
                    datetime.fromtimestamp(current.finished_at, UTC)
                    if current.finished_at
                    else None
                ),
            )
            live.input_request = current.input_request
            return await self._started_if_stranded(live)
        row = await self._latest_row(session_key)
        if row is None or not may_access(requester, row.owner, session_key):
            return None
        return await self._started_if_stranded(await self.resolve(row))

    async def _started_if_stranded(self, latest: Run) -> Run:
        """``latest``, the session's current or last run; if it ended and runs
        are queued behind it that nothing is starting (this process restarted
        since they were queued, or lost a race with another worker), the next
        one is started (`_queue_next`)."""
        if latest.status not in ACTIVE and await run_sync(rows.has_queued, latest.session_key):
            self._queue_next(latest.session_key)
        return latest

    async def sessions(
        self, *, owner: Any = None, limit: int | str | None = None, cursor: str | None = None
    ) -> SessionsPage:
        """A page of the sessions whose latest run is ``owner``'s (every session
        for a trusted caller, ``owner=None``), most recently active first: up
        to ``limit`` (1 to `listing.MAX_LIMIT`, default `listing.SESSIONS_LIMIT`;
        an int, or its digits as a query string gives them) after ``cursor``
        (the ``next`` of the page before; None for the first page).

        Ownership follows the latest run, as everywhere (`owners.may_access`),
        but by owner alone: a ``PERMISSION`` that shares sessions does not list
        them. A visitor without an owner id yet owns nothing: an empty page. A
        current run left ``running`` by a process that is gone is resolved
        first (`resolve`), as `status` does. Raises `BadLimit`, `BadCursor`.
        """
        size = listing.parse_limit(limit, listing.SESSIONS_LIMIT)
        after = listing.decode_cursor(cursor, listing.SESSIONS)
        requester = None if owner is None else owner_key(owner)
        if requester == ANONYMOUS:
            return SessionsPage()
        page, more = await run_sync(listing.sessions_page, requester, size, after)
        summaries = []
        for latest, summary in page:
            if latest.status in ACTIVE and rows.orphaned(latest):
                resolved = await self.resolve(latest, output=False)
                summary = dataclasses.replace(summary, status=resolved.status)
            summaries.append(summary)
        return SessionsPage(
            summaries, listing.encode_cursor(more, listing.SESSIONS) if more else None
        )

    async def session_runs(
        self,
        session_key: str,
        *,
        owner: Any = None,
        limit: int | str | None = None,
        cursor: str | None = None,
    ) -> RunsPage:
        """A page of the session's runs, from the newest backwards: up to
        ``limit`` (1 to `listing.MAX_LIMIT`, default `listing.RUNS_LIMIT`)
        before ``cursor`` (the ``next`` of the page before; None for the
        newest), each page oldest first. The run in flight shows as `status`
        shows it: its live status and output. Raises `BadSessionKey`,
        `BadLimit`, `BadCursor`, and `RunNotFound` for a session that has no
        run or is not ``owner``'s (never says which)."""
        validate_session_key(session_key)
        size = listing.parse_limit(limit, listing.RUNS_LIMIT)
        name = listing.runs_list(session_key)
        after = listing.decode_cursor(cursor, name)
        latest = await self.status(session_key, owner=owner)
        if latest is None:
            raise RunNotFound("No such session.")
        page, more = await run_sync(listing.runs_page, session_key, size, after)
        shown = []
        for row in page:
            if row.pk == latest.pk:
                row = _with_live_state(row, latest)
            elif row.status in ACTIVE and rows.orphaned(row):
                row = await self.resolve(row)
            shown.append(row)
        return RunsPage(session_key, shown, listing.encode_cursor(more, name) if more else None)

    async def delete(self, session_key: str, *, owner: Any = None) -> int:
        """Delete the session: stop its run in flight and wait until it ended
        (saved: `run_finished` is sent before the rows go), then delete every
        run of it, queued ones included, rows and logs (`BaseBackend.delete`).
        Returns how many runs were deleted.

        Nothing of them comes back: a checkpoint or a final save that comes
        late is an update of a row that is gone, and the backend holds
        nothing of them any more. Starts of the session in this process wait
        until the delete is over; a start on another worker meanwhile is a
        run of its own, which is not deleted. Raises `BadSessionKey`,
        `RunNotFound` (unknown or not ``owner``'s: nothing changes),
        `BackendUnavailable` (the run did not stop in time, or Redis is
        unreachable: no row was deleted)."""
        validate_session_key(session_key)
        requester = None if owner is None else owner_key(owner)
        backend = self.backend
        async with self._start_lock(session_key), backend.ordered(session_key):
            current = await backend.get(session_key)
            if current is not None:
                run_owner: str | None = current.meta.get("owner", "")
            else:
                row = await run_sync(rows.latest_row, session_key, output=False)
                run_owner = None if row is None else row.owner
            if run_owner is None or not may_access(requester, run_owner, session_key):
                raise RunNotFound("No such session.")
            pks = await run_sync(rows.session_run_ids, session_key)
            ids = {pk.hex for pk in pks} | ({current.run_id} if current is not None else set())
            # Raises if the run in flight does not stop in time: nothing is
            # deleted then. Under the start locks, no queued run starts when
            # it ends; the queue goes with the rows.
            await backend.delete(session_key, ids)
            self._queued_agents.pop(session_key, None)
            deleted = await run_sync(rows.delete_rows, pks)
        logger.info("Session %s deleted: %d runs", session_key, deleted)
        return deleted

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
        if fresh.status not in ACTIVE or not rows.orphaned(fresh):
            return fresh
        # Its process is gone, but a shared backend may hold its end and whole
        # text (its worker died while retrying the final save), or the run may
        # be in flight there: the backend's end wins over the checkpoint.
        state = await self.backend.find(fresh.session_key, fresh.id.hex)
        if state is not None:
            if state.status not in ACTIVE:
                await self._save_ended_elsewhere(state)
            return await run_sync(rows.fresh_row, fresh, output=output)
        resolved, updated = await run_sync(rows.mark_orphaned, fresh)
        if updated:
            metrics.run_ended(resolved)
            logger.warning(
                "Run %s of session %s was orphaned (worker %s): marked interrupted",
                resolved.id.hex,
                resolved.session_key,
                resolved.worker,
            )
            await self._announce(
                run_finished, resolved, status=resolved.status, output=resolved.output
            )
            self._queue_next(resolved.session_key, resolved.id.hex)
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
            if (await self.resolve(row, output=False)).status not in ACTIVE:
                ended += 1
        # Queues that nothing starts: the process that ended the run before
        # them died before it started the next one.
        for session_key in await run_sync(
            rows.waiting_queues, timezone.now() - stale_after(), limit
        ):
            await self._promote(session_key)
        return ended

    async def shutdown(self, timeout: float | None = None, *, mode: str | None = None) -> None:
        """End this process's runs in flight and wait for their saves (a
        graceful shutdown), within ``timeout`` seconds (``SHUTDOWN_TIMEOUT``).

        ``mode`` (``SHUTDOWN_MODE``): ``"interrupt"`` stops every run at once
        (``interrupted``, its text so far saved); ``"drain"`` first refuses
        new runs (``503`` with ``Retry-After``) and lets the runs end by
        themselves for ``timeout`` less `DRAIN_RESERVE` seconds, then
        interrupts what is left within that reserve."""
        config = get_config()
        if timeout is None:
            timeout = float(config["SHUTDOWN_TIMEOUT"])
        if mode is None:
            mode = str(config["SHUTDOWN_MODE"])
        if self._backend is not None or self._fixed is not None:
            if mode == "drain":
                reserve = min(DRAIN_RESERVE, timeout / 2)
                await self._drain(timeout - reserve)
                timeout = reserve
            await self.backend.shutdown(timeout)
        # This process's runs ended, and their subscribers have their terminal
        # events to read. The subscribers of runs it does not drive (another
        # worker's, or a row another process runs) would wait for events it no
        # longer reads, and their connections keep a server that waits for
        # them to close (uvicorn) from exiting: their streams end now, before
        # a terminal event, and their clients resume elsewhere from their last id.
        for subscription in list(self._open):
            subscription.hang_up()
        if self._announcing:
            await asyncio.wait(self._announcing, timeout=timeout)
        await self._streams_closed(STREAMS_CLOSE_WITHIN)

    def stream_opened(self) -> Callable[[], None]:
        """Count a streaming response open (`detached_runs.views.Stream`)
        until the function returned is called, from any thread: when the
        server has closed it. A shutdown, once its runs ended, waits for the
        streams open to close (`STREAMS_CLOSE_WITHIN` seconds at most) before
        the server gets its signal: a server cancels the responses it still
        has (daphne), and Django's handler, cancelled mid-response, leaves a
        task whose exception nobody retrieves. On the event loop."""
        loop, streams, token = asyncio.get_running_loop(), self._streams, object()
        streams.add(token)
        return functools.partial(call_in_loop, loop, self._stream_closed, streams, token)

    def _stream_closed(self, streams: set[object], token: object) -> None:
        streams.discard(token)
        if not streams and streams is self._streams and self._no_streams is not None:
            self._no_streams.set()

    async def _streams_closed(self, timeout: float) -> None:
        if not self._streams:
            return
        self._no_streams = asyncio.Event()
        try:
            await asyncio.wait_for(self._no_streams.wait(), timeout)
        except TimeoutError:
            logger.info(
                "Shutdown: %d streams still open after %.1fs; the server ends them",
                len(self._streams),
                timeout,
            )
        finally:
            self._no_streams = None

    async def _drain(self, timeout: float) -> None:
        """The drain of a ``"drain"`` shutdown (`BaseBackend.drain`), cut
        short by `hurry`. New runs are refused either way."""
        if self._hurried:
            timeout = 0.0
        self._hurry = hurry = asyncio.Event()
        drain = asyncio.ensure_future(self.backend.drain(timeout))
        hurried = asyncio.ensure_future(hurry.wait())
        try:
            await asyncio.wait({drain, hurried}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._hurry = None
            hurried.cancel()
            if not drain.done():
                drain.cancel()
                await asyncio.wait({drain})
        if not drain.cancelled():
            drain.result()  # its failure is the shutdown's

    def hurry(self) -> None:
        """End a ``"drain"`` shutdown's drain now (a second signal): the runs
        still in flight are interrupted at once, not at the end of it. On
        the event loop."""
        self._hurried = True
        if self._hurry is not None:
            self._hurry.set()

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
        if state.status in ACTIVE or "uuid" not in state.meta:
            return True
        row, ended = await run_sync(
            rows.save_reaped,
            state.meta["uuid"],
            state.output,
            state.last_id,
            status=state.status,
            error=state.error,
            usage=state.usage,
            first_token_at=(
                datetime.fromtimestamp(state.first_token_at, UTC) if state.first_token_at else None
            ),
        )
        if ended and row is not None:
            metrics.run_ended(row)
            await self._announce(run_finished, row, status=row.status, output=row.output)
            self._queue_next(row.session_key, state.run_id)
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
        if row is None or row.status not in ACTIVE or rows.orphaned(row):
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
            # Only a run in flight, not stopped, claims the session when its
            # writer writes it back (`RedisBackend._resync`), and starts
            # elsewhere wait for the session's lock, which this one holds.
            if state is not None:
                logger.info(
                    "Run %s of session %s is back (%s); the start goes on",
                    state.run_id,
                    session_key,
                    state.status,
                )
                return state
            if not await run_sync(rows.is_running, row.pk):
                logger.info("Run %s ended meanwhile; the start goes on", row.id.hex)
                return None
        logger.warning("Run %s did not come back; starting the next run anyway", row.id.hex)
        return None

    async def _latest_row(self, session_key: str) -> Run | None:
        return await run_sync(rows.latest_row, session_key)

    def _start_lock(self, session_key: str) -> _StartLock:
        return _StartLock(self._start_locks, session_key)


def _with_live_state(row: Run, live: Run) -> Run:
    """``row`` as `RunService.status` shows its run (``live``): the backend's
    status, output and end over the row's last checkpoint."""
    shown = copy.copy(row)
    for name in ("status", "output", "error", "last_event_id", "finished_at"):
        setattr(shown, name, getattr(live, name))
    for name in ("usage", "first_token_at"):
        if getattr(live, name):
            setattr(shown, name, getattr(live, name))
    shown.input_request = live.input_request
    return shown


async def _check_address(backend: BaseBackend, network: str, current: RunState | None) -> None:
    """`RunService.start`'s limit of anonymous runs per client address."""
    limit = get_config()["MAX_ACTIVE_ANONYMOUS_RUNS_PER_ADDRESS"]
    active = await backend.count_running(address=network)
    if current is not None and current.status in ACTIVE:
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
    options: Any = None,
    multitask: str | None = None,
) -> Run:
    return await _service.start(
        session_key,
        prompt=prompt,
        owner=owner,
        agent=agent,
        address=address,
        options=options,
        multitask=multitask,
    )


def subscribe(
    session_key: str, *, after: str | None = None, owner: Any = None
) -> PendingSubscription:
    return _service.subscribe(session_key, after=after, owner=owner)


async def stop(session_key: str, *, owner: Any = None, queued: bool = False) -> bool:
    return await _service.stop(session_key, owner=owner, queued=queued)


async def answer(session_key: str, payload: Any, *, owner: Any = None) -> None:
    await _service.answer(session_key, payload, owner=owner)


async def status(session_key: str, *, owner: Any = None) -> Run | None:
    return await _service.status(session_key, owner=owner)


async def sessions(
    *, owner: Any = None, limit: int | str | None = None, cursor: str | None = None
) -> SessionsPage:
    return await _service.sessions(owner=owner, limit=limit, cursor=cursor)


async def session_runs(
    session_key: str,
    *,
    owner: Any = None,
    limit: int | str | None = None,
    cursor: str | None = None,
) -> RunsPage:
    return await _service.session_runs(session_key, owner=owner, limit=limit, cursor=cursor)


async def delete(session_key: str, *, owner: Any = None) -> int:
    return await _service.delete(session_key, owner=owner)

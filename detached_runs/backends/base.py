"""The backend interface: a per-session registry of runs, each with a log that
subscribers replay and follow.

A backend knows nothing of Django models, agents or HTTP. It is handed a
*source* (an async iterator of ``str`` text deltas and ``(event, data)`` pairs),
drives it in a task it owns, writes what it yields into the run's log, and
calls a *finalize* hook (the service's save) before it publishes the terminal
event. Pick one with ``DETACHED_RUNS["BACKEND"]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Hashable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from ..events import ORIGIN, Event, Position
from ..exceptions import RunNotFound, TooManySubscribers

if TYPE_CHECKING:
    from .log import RunLog

#: What a source yields: a text delta, or a custom ``(event type, data)``.
Item = str | tuple[str, dict[str, Any]]
#: What a backend drives. A source may also have a ``remaining()`` method:
#: the items it has for the log once it is closed (``aclose()``), which it
#: could not yield during its own clean-up (an async generator may not yield
#: then). They are logged after it closed, before the terminal event
#: (`detached_runs.backends.driver.RunDriver`); `remaining` is called once,
#: unless the run was abandoned (its agent never let go).
Source = AsyncIterator[Item]

RUNNING = "running"
#: In flight, its agent waiting for the user's answer (``ctx.ask``).
WAITING = "waiting"
#: The statuses of a run in flight.
ACTIVE = frozenset({RUNNING, WAITING})
DONE = "done"
ERROR = "error"
STOPPED = "stopped"
INTERRUPTED = "interrupted"
TERMINAL = frozenset({DONE, ERROR, STOPPED, INTERRUPTED})

#: Bytes a subscriber reads from a run's log at most in one batch (one write
#: to its client): a replay of a long answer goes out in pieces of this size,
#: each read once the previous one was written.
READ_CHUNK = 64 * 1024


def is_seconds(value: object) -> bool:
    """Whether ``value`` is a finite number (an int or a float, not a bool):
    what a backend option in seconds must be."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def piece_end(data: bytes | bytearray, begin: int, size: int) -> int:
    """Where a piece of UTF-8 ``data`` that starts at ``begin`` and holds at
    most ``size`` bytes ends: at a character boundary, so that the piece
    decodes and its end is a valid resume point. Never before one whole
    character (a size under 4 bytes is taken as 4)."""
    stop = min(len(data), begin + max(size, 4))
    while stop < len(data) and (data[stop] & 0xC0) == 0x80:
        stop -= 1
    return stop


@dataclass(frozen=True, slots=True)
class RunEnd:
    """What the finalize hook gets: everything needed to save the run."""

    run_id: str
    session_key: str
    status: str
    error: str
    output: str
    terminal_id: str
    meta: dict[str, Any] = field(default_factory=dict)
    #: The merge of the run's ``usage`` events, as its log holds them
    #: (`detached_runs.backends.log.RunLog.usage`).
    usage: dict[str, Any] = field(default_factory=dict)
    #: Wall-clock (time.time()) moment its first text delta was logged; None
    #: if it logged none.
    first_token_at: float | None = None


#: The service's save of a run's end. It returns ``False`` if the end could not
#: be saved yet (the database refuses): the backend then says so in the
#: terminal event (``"saved": false``), keeps the run in memory (no eviction)
#: and calls it again with back-off (`SAVE_AGAIN_DELAYS`) until it returns
#: anything else, for as long as the process lives. ``None`` means saved.
Finalize = Callable[[RunEnd], Awaitable[bool | None]]

#: Seconds between later attempts of a final save that failed (the last one
#: repeats): a run's end the database refused is kept and saved again.
SAVE_AGAIN_DELAYS = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)

#: Seconds `BaseBackend.delete` waits for the run it stopped to end: more than
#: an agent that will not let go is given (``STOP_GRACE``), and than a Redis
#: lease of a worker that died (``LEASE_MS``).
DELETE_TIMEOUT = 30.0


class RunState:
    """A snapshot of a run the backend holds.

    ``output`` may be given as the text (``str``) or as a function of no
    arguments that makes it: a backend's log then joins and decodes a long
    answer only for the callers that read `output`, once, and not for the
    many that read a run's status, owner or last event id (each subscriber
    that opens a run asks for its state first). The function must give the
    text as of the snapshot (up to `last_id`), whenever it is called.
    """

    __slots__ = (
        "_output",
        "error",
        "finished_at",
        "first_token_at",
        "input_request",
        "last_id",
        "meta",
        "run_id",
        "saved",
        "session_key",
        "status",
        "usage",
    )

    def __init__(
        self,
        run_id: str,
        session_key: str,
        status: str,
        error: str,
        output: str | Callable[[], str],
        last_id: str,
        meta: dict[str, Any],
        finished_at: float | None,
        saved: bool = True,
        usage: dict[str, Any] | None = None,
        first_token_at: float | None = None,
        input_request: dict[str, Any] | None = None,
    ) -> None:
        self.run_id = run_id
        self.session_key = session_key
        self.status = status
        self.error = error
        self._output = output
        self.last_id = last_id
        self.meta = meta
        #: Wall-clock (time.time()) end of the run, None while it runs.
        self.finished_at = finished_at
        #: False while the run's end is not saved in the database (its final
        #: save failed and is being retried: `Finalize`).
        self.saved = saved
        #: The merge of the ``usage`` events in the run's log so far: a
        #: backend whose log outlives its workers (Redis) rebuilds it from the
        #: log, so the usage of a run whose worker died is saved with its end.
        self.usage = {} if usage is None else usage
        #: Wall-clock (time.time()) moment its first text delta was logged, by
        #: the process that drives it; None before that, or if unknown.
        self.first_token_at = first_token_at
        #: While its agent waits for the user (status ``waiting``): the data of
        #: the pending ``input_required`` event, ``{"request": "<id>", ...}``;
        #: else None.
        self.input_request = input_request

    @property
    def output(self) -> str:
        """The run's text up to `last_id` (made at the first read if the
        backend gave a function)."""
        if not isinstance(self._output, str):
            self._output = self._output()
        return self._output

    def __repr__(self) -> str:
        return (
            f"RunState(run_id={self.run_id!r}, session_key={self.session_key!r}, "
            f"status={self.status!r}, last_id={self.last_id!r})"
        )


class Subscription:
    """One subscriber's view of one run: a cursor into the shared log.

    Iterate it for single events, or use `batches` for everything that piled up
    since the last read at once (what the views write in one go). The
    subscription ends after the terminal event. Always close it (``aclose``,
    or use it as an async context manager) so the run can be evicted.
    """

    run_id: str
    meta: dict[str, Any]

    @property
    def ended(self) -> bool:
        """True once the cursor is at or past the terminal event."""
        raise NotImplementedError("subclasses of Subscription must provide ended")

    async def next_batch(self, timeout: float | None = None) -> list[Event]:
        """Events after the cursor, waiting for some if there are none yet.

        Returns ``[]`` if ``timeout`` seconds pass with nothing new (so callers
        can send a keep-alive), and raises `StopAsyncIteration` once ended.
        """
        raise NotImplementedError("subclasses of Subscription must provide next_batch()")

    def close(self) -> None:
        """Release the subscriber now (idempotent; safe outside the event loop's tasks)."""
        raise NotImplementedError("subclasses of Subscription must provide close()")

    def hang_up(self) -> None:
        """End the subscription before its run's terminal event, unless that
        event is in the log already, or the run is this process's own (its
        end reaches the subscription, as usual): a wait in
        `next_batch` returns, which then raises `StopAsyncIteration`, as at
        the end. For a process that shuts down while the run goes on
        elsewhere: the client resumes on another process from its last id.
        On the event loop; idempotent."""
        self.close()

    async def aclose(self) -> None:
        self.close()

    async def batches(self, keepalive: float | None = None) -> AsyncIterator[list[Event]]:
        try:
            while True:
                try:
                    batch = await self.next_batch(keepalive)
                except StopAsyncIteration:
                    return
                yield batch
        finally:
            await self.aclose()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        async for batch in self.batches():
            for event in batch:
                yield event

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class BaseBackend:
    """What every backend supplies. See DESIGN.md, "Behaviour every backend must keep"."""

    #: Called with the state of a run whose process died, as a shared backend
    #: (Redis) holds it: ended ``interrupted`` by this backend, with its log's
    #: output; or ended by its process, which died while retrying the final
    #: save. The service sets it, to save the row; it may raise (the database
    #: refuses: it is called again later). It returns False if the row holds
    #: another end of the run (its worker saved it, but its log never reached
    #: the backend): the backend then drops its copy, and the row is served.
    on_reaped: Callable[[RunState], Awaitable[bool]] | None = None
    #: Given a run's uuid (``meta["uuid"]``), the end its row holds if the row
    #: is no longer running: ``(status, error, output, terminal event id)``;
    #: else None. A backend that reaps a dead worker's run asks it first: the
    #: worker may have saved more than reached the backend's log. The service
    #: sets it.
    saved_end: Callable[[str], Awaitable[tuple[str, str, str, str] | None]] | None = None
    #: Called now and then by a backend that sweeps for dead workers' runs
    #: (Redis, about every 30 s): the service's sweep of the rows left running
    #: by a process that died while the backend lost its run as well
    #: (`RunService.sweep`). The service sets it.
    on_sweep: Callable[[], Awaitable[object]] | None = None
    #: For a backend that processes share (Redis): seconds within which a live
    #: worker writes back a run the backend lost (Redis restarted empty). A
    #: start then waits that long for a run the database shows in flight but
    #: the backend does not know (`RunService.start`). None: one process.
    rejoin_within: float | None = None
    #: Whether this process alone writes the runs of the sessions it serves
    #: (the memory backend): then it saw every queued run of those sessions
    #: being written or read, and the end of a run of a session it saw none
    #: for does not look for one in the database. False, the safe default,
    #: for a backend that processes share: every end looks.
    process_local: bool = False

    def __init__(self, *, evict_after: float = 180.0, max_subscribers: int | None = None) -> None:
        """``evict_after``: seconds an ended run stays after its end (and its
        last subscriber); ``max_subscribers``: subscribers per run, or None
        for no limit (`TooManySubscribers`). A subclass takes options of its
        own as keyword arguments (``DETACHED_RUNS["BACKEND_OPTIONS"]``); an
        unknown one is an error, not dropped (`option_names`)."""
        if not is_seconds(evict_after) or evict_after < 0:
            raise ValueError(f"evict_after must be a number of seconds >= 0, not {evict_after!r}")
        if max_subscribers is not None and (
            isinstance(max_subscribers, bool)
            or not isinstance(max_subscribers, int)
            or max_subscribers < 1
        ):
            raise ValueError(
                f"max_subscribers must be a positive integer or None, not {max_subscribers!r}"
            )
        self.evict_after = evict_after
        self.max_subscribers = max_subscribers

    @classmethod
    def options_from_settings(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """The options this backend takes from ``DETACHED_RUNS``'s own keys
        (``config``, merged with the defaults), which ``BACKEND_OPTIONS``
        then overrides: ``EVICT_AFTER`` and ``MAX_SUBSCRIBERS_PER_RUN`` here."""
        return {
            "evict_after": float(config["EVICT_AFTER"]),
            "max_subscribers": config["MAX_SUBSCRIBERS_PER_RUN"],
        }

    @classmethod
    def option_names(cls) -> frozenset[str]:
        """The keyword options the constructor accepts: the parameters of each
        ``__init__`` up the class's MRO, as far as they pass ``**kwargs`` on."""
        names: set[str] = set()
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            parameters = list(inspect.signature(init).parameters.values())[1:]
            names |= {
                p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
            }
            if not any(p.kind is p.VAR_KEYWORD for p in parameters):
                break
        return frozenset(names)

    async def start(
        self,
        session_key: str,
        run_id: str,
        source: Source,
        *,
        start_data: dict[str, Any],
        meta: dict[str, Any],
        finalize: Finalize,
        timeout: float | None = None,
    ) -> None:
        """Register a new run as the session's current one and drive ``source``.

        A run already in flight for the session is stopped; the new run's
        source is not iterated before the old run's finalize has returned
        (its first attempt: see `Finalize`).
        The ``start`` event (with ``start_data``) is in the log at once. A
        source still going ``timeout`` seconds after it began ends as
        ``error``. Raises `BackendUnavailable` once `shutdown` has begun.

        A backend that orders the starts of a session across processes sets
        ``meta["started_at"]`` (epoch seconds) to when the run became the
        session's current one, by its own clock; the service then stores it
        on the run's row, so that the latest row is the current run.
        """
        raise NotImplementedError("subclasses of BaseBackend must provide start()")

    def ordered(self, session_key: str) -> contextlib.AbstractAsyncContextManager[None]:
        """An async context manager inside which the starts of the session are
        ordered across every process sharing this backend: the service takes
        it around a start's decision (what is in flight, the queue, the row)
        and the `start` itself, and around a queued run's start. A `start`
        inside it does not take it again. By default (one process: the
        service's own per-session lock orders its starts) it does nothing.
        `BackendUnavailable` if it cannot be taken."""
        return contextlib.nullcontext()

    async def now(self) -> float:
        """The time (epoch seconds) by the clock that orders the session's
        starts: this process's (`time.time`) by default; a backend shared by
        processes on several hosts answers with its own (Redis's ``TIME``), so
        that a queued run's place is comparable with the start times the
        backend set (``meta["started_at"]``)."""
        return time.time()

    def check_accepting(self) -> None:
        """Raise `BackendUnavailable` if `start` would refuse a new run now
        (`shutdown` has begun), so the service can refuse before it writes
        anything. `start` still raises it if that changes meanwhile."""
        raise NotImplementedError("subclasses of BaseBackend must provide check_accepting()")

    async def subscribe(
        self, session_key: str, after: tuple[str, Position] | None = None
    ) -> Subscription:
        """Bind to the session's current run now; `RunNotFound` if it has none.

        ``after`` is a parsed event id: if it names this run, only what follows
        it is delivered; if it names another run, the run is replayed from its
        start. `BadEventId` if it names this run but no position of its log
        (after waiting, `catch_up`, for a position ahead of the log), and
        `TooManySubscribers` past ``max_subscribers``.

        The same for every backend: the session's current log, whatever holds
        it (`current_log`), read through a `detached_runs.backends.log.LogSubscription`.
        """
        from .log import LogSubscription  # log.py builds on this module

        log = await self.current_log(session_key)
        if log is None:
            raise RunNotFound("No run for this session.")
        if self.max_subscribers is not None and log.subscribers >= self.max_subscribers:
            raise TooManySubscribers("Too many subscribers for this run.")
        cursor = ORIGIN
        if after is not None and after[0] == log.id:
            try:
                if after[1] > log.position:
                    await self.catch_up(log, after[1])
                log.check_after(after[1])
            except BaseException:
                if log.subscribers == 0:
                    self.released(log)  # a log fetched for this subscriber alone
                raise
            cursor = after[1]
        return LogSubscription(log, cursor, self.released)

    async def current_log(self, session_key: str) -> RunLog | None:
        """The log of the session's current run as this process holds it (the
        run it drives, or its copy of a run another process drives), or None
        if the backend has no run for the session."""
        raise NotImplementedError("subclasses of BaseBackend must provide current_log()")

    async def catch_up(self, log: RunLog, position: Position) -> None:
        """Wait (bounded) until ``log`` reaches ``position``, an id ahead of it:
        for a backend whose copy of a log may lag behind the process writing
        it. By default it returns at once."""

    def released(self, log: RunLog) -> None:
        """``log``'s last subscriber left (`subscribe`); called from whatever
        thread closed it. By default nothing happens."""

    async def stop(self, session_key: str, run_id: str | None = None) -> bool:
        """Ask the session's run in flight (only ``run_id``, if given) to stop.

        True if a run was in flight and is now stopping; False if there was
        nothing to stop (no run, already finished, already finishing).
        """
        raise NotImplementedError("subclasses of BaseBackend must provide stop()")

    async def get(self, session_key: str) -> RunState | None:
        """The session's current run, if the backend still holds it."""
        raise NotImplementedError("subclasses of BaseBackend must provide get()")

    async def find(self, session_key: str, run_id: str) -> RunState | None:
        """The run ``run_id`` (hex) of the session, if the backend still holds
        it, in flight or ended, whether or not it is the session's current
        run; None otherwise.

        The service asks before it marks a row whose process is gone
        ``interrupted`` (`RunService.resolve`): a backend whose log outlives
        its workers (Redis) may hold that run's end and whole text, or the run
        may still be in flight. This default knows the current run only.
        """
        state = await self.get(session_key)
        return state if state is not None and state.run_id == run_id else None

    async def count_running(self, owner: str | None = None, *, address: str | None = None) -> int:
        """How many runs are in flight of ``owner`` (``meta["owner"]``) or, given
        ``address`` instead, from that client address (``meta["address"]``,
        which the service sets for anonymous owners only: see
        `detached_runs.owners.address_group`). Pass exactly one (`_counted`)."""
        raise NotImplementedError("subclasses of BaseBackend must provide count_running()")

    async def adopt(self, owner: str, new_owner: str, session_keys: Collection[str] = ()) -> int:
        """Give the runs of ``owner`` that the backend holds, in flight or ended
        and in their grace period, to ``new_owner`` (an anonymous visitor who
        logs in: `detached_runs.owners.adopt_anonymous_runs`).

        Their ``meta["owner"]`` becomes ``new_owner`` and their
        ``meta["address"]`` goes (`_adopt_meta`): from then on ``new_owner``
        may follow and stop them, and `count_running` counts them for
        ``new_owner`` and no longer for their address. A run goes on streaming
        to the subscribers it has. ``session_keys`` are the sessions ``owner``
        has runs in (the database knows them); a backend that finds an owner's
        runs by itself may ignore them. Returns how many runs changed hands.
        """
        raise NotImplementedError("subclasses of BaseBackend must provide adopt()")

    async def delete(
        self, session_key: str, run_ids: Collection[str], *, timeout: float = DELETE_TIMEOUT
    ) -> None:
        """Delete the runs ``run_ids`` (hex) of the session, wherever they are
        (a conversation deleted: `RunService.delete`).

        The session's run in flight, if it is one of them, is stopped first,
        and this waits until it ended: its finalize returned and its terminal
        event is in the log, so every subscriber gets that event and closes
        (with Redis, those on other workers too). Then everything the backend
        holds of those runs goes: their logs and state, and the session's
        current run if it is one of them. Nothing of theirs is written again
        afterwards, and no task of theirs is left. A run of the session that
        is not in ``run_ids`` (started meanwhile by another worker) is left
        alone. `BackendUnavailable` if the run did not end within ``timeout``
        seconds (nothing is deleted then), or the backend is unreachable.
        """
        raise NotImplementedError("subclasses of BaseBackend must provide delete()")

    async def ask(
        self, session_key: str, run_id: str, data: Mapping[str, Any], timeout: float | None
    ) -> Any:
        """For the agent of run ``run_id``, which this process drives (its
        ``ctx.ask``): log ``input_required`` ``{"request": "<id>", **data}``
        (a new id), so that the run is ``waiting``; wait for the answer
        (`answer`, in any process sharing this backend), log
        ``input_received`` ``{"request": "<id>"}`` and return the answer's
        value. After ``timeout`` seconds (None: no limit) without one, log
        ``input_timeout`` and raise `detached_runs.exceptions.InputTimeout`.
        ``RUN_TIMEOUT`` does not count the wait. A stop cancels it
        (`asyncio.CancelledError`). ``data`` is checked already (a JSON
        object, cleaned and bounded: the service's `Recorder`)."""
        raise NotImplementedError("subclasses of BaseBackend must provide ask()")

    async def answer(self, session_key: str, request: str, value: Any) -> bool:
        """Answer the question ``request`` of the session's run with ``value``
        (JSON data, checked already), whichever process drives it: True if
        the run waited for it and takes this answer; False if it does not
        wait for it (answered already, timed out, ended, another run's). Of
        two answers to one request, in any processes, exactly one is taken."""
        raise NotImplementedError("subclasses of BaseBackend must provide answer()")

    def driven(self, session_key: str, run_id: str) -> RunState | None:
        """The state of run ``run_id`` if this process drives it (its text so
        far, last event id, usage, first token), read without I/O: what the
        service checkpoints; None if this process does not drive it."""
        raise NotImplementedError("subclasses of BaseBackend must provide driven()")

    def output(self, session_key: str, run_id: str) -> tuple[str, str] | None:
        """``(text so far, id of the last event)`` of a run this process drives."""
        state = self.driven(session_key, run_id)
        return None if state is None else (state.output, state.last_id)

    async def drain(self, timeout: float) -> None:
        """Refuse new runs (`check_accepting` raises `BackendUnavailable`
        from now on) and wait up to ``timeout`` seconds for this process's
        runs in flight to end by themselves: the first part of a shutdown in
        ``SHUTDOWN_MODE = "drain"``, which `shutdown` follows. Runs driven by
        other workers are not waited for. The default refuses nothing and
        returns at once (a backend without it interrupts its runs, as in
        ``"interrupt"`` mode)."""

    async def shutdown(self, timeout: float) -> None:
        """Refuse new runs, end every run in flight as ``interrupted`` and wait
        (up to ``timeout``) for their saves and terminal events, and for the
        saves that failed before (tried once more at once); an end still
        unsaved then is logged as lost."""
        raise NotImplementedError("subclasses of BaseBackend must provide shutdown()")


_K = TypeVar("_K", bound=Hashable)
_T = TypeVar("_T")


async def shared_result(
    table: dict[_K, asyncio.Future[_T]], key: _K, make: Callable[[], Awaitable[_T]]
) -> _T:
    """``make()``'s result, made once for every caller meanwhile (a long
    run's text read once for ten clients that ask at once): the first
    caller starts it and keeps it in ``table`` under ``key`` until it is
    done; later ones wait for the same result (or exception). Shielded: a
    caller that is cancelled (its client went away) does not cut it short
    for the others."""
    future = table.get(key)
    if future is None:
        future = table[key] = asyncio.ensure_future(make())

        def done(_: asyncio.Future[_T], made: asyncio.Future[_T] = future) -> None:
            if table.get(key) is made:
                del table[key]
            if not made.cancelled():
                made.exception()  # retrieved: every caller that waited has it

        future.add_done_callback(done)
    return await asyncio.shield(future)


def _counted(owner: str | None, address: str | None) -> tuple[str, str]:
    """`BaseBackend.count_running`'s arguments as ``(meta key, value)``."""
    if owner is not None and address is None:
        return "owner", owner
    if address is not None and owner is None:
        return "address", address
    raise TypeError("count_running() takes an owner or an address (one of them)")


def _adopt_meta(meta: dict[str, Any], new_owner: str) -> None:
    """A run's meta once ``new_owner`` adopted it (in place: subscriptions share it)."""
    meta["owner"] = new_owner
    meta.pop("address", None)

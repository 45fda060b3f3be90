"""The runs a process drives, whichever backend holds their logs.

Both backends drive their runs the same way (`RunDriver`): the agent runs
here, in this process's event loop, and its items go into the run's log
(`detached_runs.backends.log.RunLog`); the Redis backend also copies that
log to Redis, for the other workers.

How it keeps DESIGN.md's promises:

* Runs of a session form a chain: each waits for its predecessor's
  ``finished`` before its source is iterated, so saves never interleave
  (a FIFO lock per session, without a lock object that could be cancelled
  out of order).
* Stop is a flag plus a cancel of the task only while the agent runs; a run
  stopped before its task ran, or while it waits for its predecessor, still
  goes through the same ending: finalize, terminal event, eviction.
* An agent that will not let go is abandoned ``STOP_GRACE`` seconds after
  its stop: the run ends without it.
* A final save the database refuses is retried, with back-off, for as long
  as the process lives; meanwhile the run is not evicted.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

from .. import metrics
from ..events import (
    DONE,
    INPUT_RECEIVED,
    INPUT_REQUIRED,
    INPUT_TIMEOUT,
    START,
    Event,
    Position,
    make_id,
)
from ..exceptions import AgentError, BackendUnavailable, InputTimeout
from ..text import clean_text
from .base import DONE as STATUS_DONE
from .base import (
    ERROR,
    INTERRUPTED,
    SAVE_AGAIN_DELAYS,
    STOPPED,
    BaseBackend,
    Finalize,
    RunEnd,
    RunState,
    Source,
    _adopt_meta,
)
from .log import RunLog

logger = logging.getLogger(__name__)

#: Seconds an agent has to let go after a stop, a timeout or a shutdown
#: cancelled it, before its run ends without it (`RunDriver._abandon`).
STOP_GRACE = 5.0
#: Seconds a run waits, before its agent begins, for the end of the session's
#: previous run to be saved, if its first save failed (`_save_again`).
UNSAVED_WAIT = 10.0

# Phases of a run's task.
# _CLOSING: the agent's own clean-up (``aclose``) runs; a stop changes nothing
# then, but the run may still be abandoned if the clean-up does not end.
_WAITING, _RUNNING, _CLOSING, _FINISHING, _FINISHED = range(5)


class DrivenRun(RunLog):
    """A run this process drives: its log, and the state of its driving."""

    driven = True

    __slots__ = (
        "abandon",
        "deadline",
        "finalize",
        "pending",
        "phase",
        "previous",
        "retry",
        "stop_asked_at",
        "stop_reason",
        "stored",
        "task",
        "timer",
        "waits_for",
    )

    def __init__(self, run_id: str, session_key: str, meta: dict[str, Any]) -> None:
        super().__init__(run_id, session_key, meta)
        self.phase = _WAITING
        # Why it must end early: (status, error) of a stop, a timeout or a shutdown.
        self.stop_reason: tuple[str, str] | None = None
        #: Loop time at which a user's stop first reached it (the stop latency).
        self.stop_asked_at: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        #: Loop time at which RUN_TIMEOUT ends it (None: no limit); while its
        #: agent waits for an answer, the seconds it has left (the timer is
        #: paused: waiting does not count).
        self.deadline: float | None = None
        #: Its agent's question waiting for an answer: (request id, the
        #: future the answer's value is set on).
        self.pending: tuple[str, asyncio.Future[Any]] | None = None
        # Set once stopped while its agent runs: ends the run without the
        # agent if the agent has not let go after STOP_GRACE seconds.
        self.abandon: asyncio.TimerHandle | None = None
        self.finalize: Finalize | None = None
        self.task: asyncio.Task[None] | None = None
        #: The session's previous run in this process, whose end (and save)
        #: this run's agent waits for.
        self.previous: DrivenRun | None = None
        #: Set once the session's previous run elsewhere (another worker's)
        #: ended: this run's agent waits for it too.
        self.waits_for: asyncio.Event | None = None
        # Set to ask for another attempt of a failed final save at once (a
        # shutdown; the session's next run, which waits for it).
        self.retry = asyncio.Event()
        # Set once its end is saved (at once, or by `RunDriver._save_again`).
        self.stored = asyncio.Event()

    def append_text(self, text: str) -> None:
        if self.first_text_at is None and text:
            self.first_text_at = time.time()  # the first token, as this process logs it
        super().append_text(text)
        metrics.text_logged(len(text.encode()))

    def append_event(self, event: str, data: dict[str, Any]) -> Event:
        item = super().append_event(event, data)
        metrics.event_logged(event)
        return item


class RunDriver:
    """The runs this process drives, for a backend (`BaseBackend`), one per
    session: their tasks, the chain of a session's runs (each agent begins
    once the previous run's end is saved), stop and abandon, ``RUN_TIMEOUT``,
    the final save and its retries, and eviction ``backend.evict_after``
    seconds after the end.

    ``on_unsaved(run)`` is called when a run's final save failed (it is
    retried with back-off), ``on_saved_after_all(run)`` when such a save
    succeeds at last: a backend whose log outlives the process (Redis) keeps
    the run for another process to save meanwhile.
    """

    def __init__(
        self,
        backend: BaseBackend,
        *,
        on_unsaved: Callable[[DrivenRun], None] | None = None,
        on_saved_after_all: Callable[[DrivenRun], None] | None = None,
    ) -> None:
        self.backend = backend
        self._on_unsaved = on_unsaved
        self._on_saved_after_all = on_saved_after_all
        self._sessions: dict[str, DrivenRun] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        # Set by refuse_new_runs (a drain, then the shutdown): starts refused.
        self._refusing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set by shutdown: saves that failed before are tried again at once.
        self._save_now: asyncio.Event | None = None
        # Set by drain: saves that failed are tried again every half second.
        self._draining = False

    # -- driving -----------------------------------------------------------

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
        after: asyncio.Event | None = None,
    ) -> DrivenRun:
        """Register and drive a new run as the session's current one
        (`BaseBackend.start`); its agent begins once the session's previous
        run here has ended (and been saved) and, if given, once ``after`` is
        set (the session's previous run on another worker ended)."""
        self.check_accepting()
        self._loop = asyncio.get_running_loop()
        run = DrivenRun(run_id, session_key, meta)
        run.waits_for = after
        run.append_event(START, start_data)
        previous = self._sessions.get(session_key)
        if previous is not None:
            if previous.evict_handle is not None:
                previous.evict_handle.cancel()
                previous.evict_handle = None
            if previous.phase != _FINISHED:
                run.previous = previous
                self.request_stop(previous)
            elif previous.unsaved:
                run.previous = previous  # waited for until its end is saved after all
        self._sessions[session_key] = run
        # A context of its own: the run outlives the request that starts it, and
        # under Django's ASGI handler the request's context carries asgiref's
        # per-request database thread. Inherited, every run would keep (or
        # re-create) a thread and a database connection of its own once that
        # request ends; with a fresh context its database work shares the one
        # thread of sync_to_async.
        task = asyncio.create_task(
            self._drive(run, source, finalize, timeout),
            name=f"detached_runs:{session_key}:{run_id}",
            context=contextvars.Context(),
        )
        run.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return run

    def check_accepting(self) -> None:
        """`BackendUnavailable` once `shutdown` has begun."""
        if self._refusing:
            raise BackendUnavailable("The server is shutting down; try again in a moment.")

    def stop(self, session_key: str, run_id: str | None = None) -> bool:
        """Ask the session's run here (only ``run_id``, if given) to stop
        (`BaseBackend.stop`)."""
        run = self._sessions.get(session_key)
        if run is None or (run_id is not None and run.id != run_id):
            return False
        return self.request_stop(run)

    async def end(
        self, session_key: str, run_ids: Collection[str], timeout: float
    ) -> DrivenRun | None:
        """Stop the session's run here if it is one of ``run_ids`` and wait (up
        to ``timeout`` s) until it finished: its finalize returned (its first
        attempt) and its terminal event is in its log. Returns it; None if
        the session has none of them here. `BackendUnavailable` on timeout."""
        run = self._sessions.get(session_key)
        if run is None or run.id not in run_ids:
            return None
        self.request_stop(run)
        try:
            await asyncio.wait_for(run.finished.wait(), timeout)
        except TimeoutError:
            raise BackendUnavailable(
                "The session's run did not stop in time; nothing was deleted. Try again."
            ) from None
        return run

    def forget(self, session_key: str, run_ids: Collection[str]) -> DrivenRun | None:
        """Drop the session's run here if it is one of ``run_ids`` and it has
        ended (`BaseBackend.delete`); return it. Its subscribers keep reading
        the log they hold (they have its terminal event); a new one finds
        nothing here. A final save that is being retried is tried at once:
        with its row gone it has nothing left to write."""
        run = self._sessions.get(session_key)
        if run is None or run.id not in run_ids or run.phase != _FINISHED:
            return None
        if run.evict_handle is not None:
            run.evict_handle.cancel()
            run.evict_handle = None
        del self._sessions[session_key]
        if run.unsaved:
            run.retry.set()
        logger.debug("Forgot run %s of session %s", run.id, session_key)
        return run

    def count(self, key: str, value: str) -> int:
        """How many runs here are in flight whose ``meta[key]`` is ``value``."""
        return sum(
            1
            for run in self._sessions.values()
            if run.phase < _FINISHING and run.stop_reason is None and run.meta.get(key) == value
        )

    def adopt(self, owner: str, new_owner: str) -> list[DrivenRun]:
        """Give the runs here of ``owner`` to ``new_owner`` (`BaseBackend.adopt`);
        return them."""
        # Every run the registry holds (in flight or in its grace period) is in
        # _sessions: no need of the session keys. A run that a newer one
        # replaced is stopping; its meta no longer decides anything.
        adopted = [run for run in self._sessions.values() if run.meta.get("owner") == owner]
        for run in adopted:
            _adopt_meta(run.meta, new_owner)
        return adopted

    def driven(self, session_key: str, run_id: str) -> RunState | None:
        """The state of run ``run_id`` here (`BaseBackend.driven`)."""
        run = self._sessions.get(session_key)
        if run is None or run.id != run_id:
            return None
        return run.state()

    def refuse_new_runs(self) -> None:
        """From now on `start` (and `check_accepting`) refuse: the first step
        of `shutdown`, which a backend may take before anything else of its
        own shutdown, or the whole of a drain (`drain`), during which
        everything else goes on as usual."""
        self._refusing = True

    async def drain(self, timeout: float) -> None:
        """`BaseBackend.drain` for the runs here: refuse new runs, then wait
        up to ``timeout`` s until every run here has ended and its end is
        saved (a run waiting for its user's answer is waited for too: the
        answer may come). A run is over once its end is in the database, not
        once it is sent: a final save the database refused is tried again
        every half second meanwhile, as during `shutdown`, so that the whole
        drain, not only the reserve after it, is there to save it."""
        self.refuse_new_runs()
        self._draining = True
        if self._save_now is not None:
            self._save_now.set()  # saves waiting out a long back-off: now
        left = [run for run in self._sessions.values() if not run.stored.is_set()]
        if not left:
            return
        logger.info(
            "Draining: waiting up to %ss for %d run%s to end",
            timeout,
            len(left),
            "" if len(left) == 1 else "s",
        )
        tasks = [asyncio.ensure_future(_ended_and_saved(run)) for run in left]
        try:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
        finally:
            for task in tasks:
                task.cancel()
        if pending:
            logger.warning(
                "Drained for %ss; %d runs are still in flight or unsaved", timeout, len(pending)
            )

    async def shutdown(self, timeout: float) -> None:
        """`BaseBackend.shutdown` for the runs here."""
        self.refuse_new_runs()
        self._closing = True
        if self._save_now is not None:
            self._save_now.set()
        # Agents that will not let go are abandoned halfway through the
        # timeout, so that their runs still end (terminal event, save) in it.
        grace = min(STOP_GRACE, timeout / 2)
        for run in list(self._sessions.values()):
            self.request_stop(run, (INTERRUPTED, ""), grace)
        tasks = [t for t in self._tasks if not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        for run in self._sessions.values():
            if run.unsaved:
                logger.error(
                    "Run %s of session %s is lost: its end (%s, %d characters) could not be "
                    "saved before the process exits",
                    run.id,
                    run.session_key,
                    run.status,
                    len(run.output()),
                )

    def __len__(self) -> int:
        """How many runs the registry holds."""
        return len(self._sessions)

    @property
    def runs(self) -> Mapping[str, DrivenRun]:
        """The session's current run here, by session key (read only)."""
        return self._sessions

    @property
    def closing(self) -> bool:
        """Whether `shutdown` has begun."""
        return self._closing

    # -- stopping ----------------------------------------------------------

    def request_stop(
        self, run: DrivenRun, reason: tuple[str, str] = (STOPPED, ""), grace: float | None = None
    ) -> bool:
        """Ask a run to stop for ``reason``; its agent is abandoned if it has
        not let go ``grace`` seconds (`STOP_GRACE`) later. False if it is
        ending already."""
        if grace is None:
            grace = STOP_GRACE
        if run.phase == _CLOSING:
            self._arm_abandon(run, grace)  # its clean-up may never end either
        if run.phase >= _CLOSING:
            return False
        first = run.stop_reason is None
        if first and reason[0] == STOPPED:
            run.stop_asked_at = asyncio.get_running_loop().time()
        if first or reason[0] != STOPPED:
            run.stop_reason = reason  # a shutdown's or a timeout's reason wins
        # Only a task inside the agent is cancelled; a waiting one (or one that
        # has not run yet: cancelling it would skip its ending) sees the flag.
        # Only once: a second cancel would cut short the agent's own clean-up
        # (its finally, its aclose), which the first one started.
        if run.phase == _RUNNING and run.task is not None:
            if first:
                run.task.cancel()
            self._arm_abandon(run, grace)
        return first

    def _arm_timeout(self, run: DrivenRun, seconds: float) -> None:
        """``RUN_TIMEOUT``: stop the run as ``error`` in ``seconds``."""
        run.timer = asyncio.get_running_loop().call_later(
            seconds, self.request_stop, run, (ERROR, "The run took too long.")
        )

    # -- questions (ctx.ask) -------------------------------------------------

    async def ask(
        self,
        session_key: str,
        run_id: str,
        data: Mapping[str, Any],
        timeout: float | None,
        shared: SharedQuestions | None = None,
    ) -> Any:
        """`BaseBackend.ask` for a run here: log ``input_required``, wait for
        the answer (`answer`, or ``shared``'s for a backend whose answers may
        reach another process), log ``input_received`` and return its value;
        on ``timeout``, log ``input_timeout`` and raise `InputTimeout`. The
        run's ``RUN_TIMEOUT`` is paused while it waits. `RuntimeError` unless
        the run's agent is running here with no question pending;
        `asyncio.CancelledError` if the run is being stopped."""
        run = self._sessions.get(session_key)
        if (
            run is None
            or run.id != run_id
            or run.phase != _RUNNING
            or asyncio.current_task() is not run.task
        ):
            # From a task the agent started, a question could outlive its run.
            raise RuntimeError(
                "ctx.ask() is for the agent of a run in flight, from the run's own task."
            )
        if run.stop_reason is not None:
            raise asyncio.CancelledError  # it is ending: the wait is cut short, as by a stop
        if run.pending is not None:
            raise RuntimeError("ctx.ask(): one question at a time; this run waits for one.")
        request = uuid.uuid4().hex
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        run.pending = (request, future)  # before any await: a second question is refused
        try:
            if shared is not None:
                await shared.opened(run, request)  # before any client can see it
        except BaseException:
            run.pending = None
            raise
        self._pause_timeout(run)
        run.append_event(INPUT_REQUIRED, {"request": request, **data})
        watch = None if shared is None else asyncio.ensure_future(shared.watch(run, request))
        ended = False
        try:
            # asyncio.wait, not wait_for: on Python 3.11 wait_for returns the
            # result and swallows a cancel (a stop) that lands in the same turn
            # as the answer, and the agent would go on past its stop.
            try:
                done, _ = await asyncio.wait({future}, timeout=timeout)
            except asyncio.CancelledError:
                if not future.done() or future.cancelled() or future.exception() is not None:
                    raise
                # Answered in the same turn as the stop, and the answer was
                # accepted: the agent takes it, and the stop cancels the
                # agent at its next await instead.
                asyncio.current_task().cancel()  # type: ignore[union-attr]  # the run's
                done = {future}
            if not done:
                if shared is not None:
                    # An answer accepted as it timed out is delivered: it wins.
                    await shared.withdraw(run, request)
                if not future.done():
                    run.append_event(INPUT_TIMEOUT, {"request": request})
                    raise InputTimeout(request, float(timeout or 0))
            ended = True
            return future.result()
        finally:
            if watch is not None:
                watch.cancel()
            if run.pending is not None and run.pending[0] == request:
                run.pending = None
            if not ended and shared is not None and not future.done():
                shared.abandoned(run, request)  # stopped while waiting: no answer is taken now
            if run.phase == _RUNNING:
                self._resume_timeout(run)

    def answer(self, session_key: str, request: str, value: Any) -> bool:
        """Give ``value`` to the question ``request`` of the session's run
        here, if it waits for it; False if it does not (answered, timed out,
        ended, another run's, or not here)."""
        run = self._sessions.get(session_key)
        return run is not None and self.deliver(run, request, value)

    def deliver(self, run: DrivenRun, request: str, value: Any) -> bool:
        """Wake the agent of ``run`` waiting for ``request`` with ``value`` and
        log ``input_received``; False if it does not wait for it."""
        pending = run.pending
        if (
            pending is None
            or pending[0] != request
            or pending[1].done()
            or run.phase != _RUNNING
            or run.stop_reason is not None
        ):
            return False
        pending[1].set_result(value)
        run.append_event(INPUT_RECEIVED, {"request": request})
        return True

    def _pause_timeout(self, run: DrivenRun) -> None:
        if run.timer is not None and run.deadline is not None:
            run.timer.cancel()
            run.timer = None
            run.deadline -= asyncio.get_running_loop().time()  # seconds left

    def _resume_timeout(self, run: DrivenRun) -> None:
        if run.timer is None and run.deadline is not None:
            left = max(run.deadline, 0.0)
            run.deadline = asyncio.get_running_loop().time() + left
            self._arm_timeout(run, left)

    def _arm_abandon(self, run: DrivenRun, grace: float) -> None:
        loop = asyncio.get_running_loop()
        if run.abandon is not None:
            if run.abandon.when() <= loop.time() + grace:
                return  # armed already, as soon or sooner
            run.abandon.cancel()
        run.abandon = loop.call_later(grace, self._abandon, run, grace)

    def _abandon(self, run: DrivenRun, grace: float) -> None:
        """The agent did not let go within ``grace`` seconds of its stop
        (`STOP_GRACE`, or half the shutdown's timeout if that is less: it
        swallows the cancellation and never yields again): end the run
        without it, so its subscribers get the terminal event, its row is
        saved and the session's next run begins. Its task is left to itself,
        logged, and no longer awaited (not by a shutdown either)."""
        task = run.task
        if run.phase >= _FINISHING or task is None or run.finalize is None:
            return
        logger.error(
            "Run %s of session %s: its agent did not stop within %s s of being asked; "
            "the run ends without it",
            run.id,
            run.session_key,
            grace,
        )
        run.phase = _FINISHING  # the agent's task, if it ever ends, finishes nothing
        self._tasks.discard(task)
        task.cancel()
        status, error = run.stop_reason or (STOPPED, "")
        ending = asyncio.ensure_future(self._finish(run, status, error, run.finalize))
        self._tasks.add(ending)
        ending.add_done_callback(self._tasks.discard)

    async def _drive(
        self, run: DrivenRun, source: Source, finalize: Finalize, timeout: float | None
    ) -> None:
        status, error, interrupted = STATUS_DONE, "", False
        run.finalize = finalize
        try:
            previous, run.previous = run.previous, None
            if previous is not None:
                # Wait even if cancelled: saves of one session must not overlap.
                while not previous.finished.is_set():
                    try:
                        await previous.finished.wait()
                    except asyncio.CancelledError:
                        interrupted = True
                if previous.unsaved and not interrupted:
                    # Its end is not saved yet: one more attempt now (the
                    # database took this run's row a moment ago), and this
                    # run waits for it a while, so that the two saves keep
                    # their order and this agent's history has that answer.
                    previous.retry.set()
                    try:
                        await asyncio.wait_for(previous.stored.wait(), UNSAVED_WAIT)
                    except TimeoutError:
                        logger.warning(
                            "Run %s starts before run %s of its session is saved",
                            run.id,
                            previous.id,
                        )
                    except asyncio.CancelledError:
                        interrupted = True
                del previous
            # The session's run on another worker: wait for its end too (a
            # double send from two tabs balanced to two workers).
            waits_for, run.waits_for = run.waits_for, None
            while waits_for is not None and not waits_for.is_set():
                try:
                    await waits_for.wait()
                except asyncio.CancelledError:
                    interrupted = True
            if run.stop_reason is None and not interrupted:
                run.phase = _RUNNING
                if timeout is not None:
                    run.deadline = asyncio.get_running_loop().time() + timeout
                    self._arm_timeout(run, timeout)
                status, error, interrupted = await self._consume(run, source)
        finally:
            # Abandoned (_abandon): ended without this task, nothing is its to do.
            if run.phase < _FINISHING:
                run.phase = _CLOSING
                if run.timer is not None:
                    run.timer.cancel()
                    run.timer = None
                task = asyncio.current_task()
                stopped = run.stop_reason is not None
                if stopped and task is not None and task.cancelling() and not interrupted:
                    task.uncancel()  # our own stop's cancel was swallowed by the agent
                if run.stop_reason is not None:
                    status, error = run.stop_reason
                elif interrupted:
                    status, error = INTERRUPTED, ""
                try:
                    await _close(source)  # may be abandoned meanwhile, if it never ends
                except asyncio.CancelledError:
                    interrupted = True
            if run.phase < _FINISHING:
                # What the source had to say during its clean-up (an agent's
                # usage, reported in its finally while stopped), before the end.
                _log_remaining(run, source)
                run.phase = _FINISHING
                if run.abandon is not None:
                    run.abandon.cancel()
                await self._finish(run, status, error, finalize)
        if interrupted:
            raise asyncio.CancelledError

    async def _consume(self, run: DrivenRun, source: Source) -> tuple[str, str, bool]:
        """Iterate the source into the log; return (status, error, interrupted)."""
        task = asyncio.current_task()
        try:
            async for item in source:
                if isinstance(item, str):
                    run.append_text(item)
                else:
                    run.append_event(*item)
                if run.stop_reason is not None:
                    break
        except asyncio.CancelledError:
            if run.stop_reason is not None:
                if task is not None:
                    task.uncancel()
                return STOPPED, "", False
            return INTERRUPTED, "", True
        except AgentError as exc:
            # The agent's deliberate end, with a message for clients: no traceback,
            # and the message as they see it (cleaned: a log file's encoder
            # refuses a lone surrogate, and the line would be lost).
            error = _safe_error(exc)
            logger.warning("Run %s of session %s failed: %s", run.id, run.session_key, error)
            return ERROR, error, False
        except BaseException as exc:
            logger.exception("Run %s of session %s failed", run.id, run.session_key)
            return ERROR, _safe_error(exc), False
        return STATUS_DONE, "", False

    async def _finish(self, run: DrivenRun, status: str, error: str, finalize: Finalize) -> None:
        terminal = Position(run.position.text, run.position.seq + 1)
        end = RunEnd(
            run_id=run.id,
            session_key=run.session_key,
            status=status,
            error=error,
            output=run.output(),
            terminal_id=make_id(run.id, terminal),
            meta=run.meta,
            usage=dict(run.usage),
            first_token_at=run.first_text_at,
        )
        saved = await _save(run, end, finalize)
        run.status, run.error = status, error
        data: dict[str, Any] = {"status": status}
        if error:
            data["error"] = error
        if not saved:
            # The database refused the end (after the service's own quick
            # retries). Subscribers are told that what they got is not saved
            # yet; the run stays here and is saved again (`_save_again`).
            data["saved"] = False
        if saved:
            run.stored.set()
        if saved is False:
            run.unsaved = True
            again = asyncio.ensure_future(self._save_again(run, end, finalize))
            again.set_name(f"detached_runs:save-again:{run.id}")
            self._tasks.add(again)
            again.add_done_callback(self._tasks.discard)
        run.finished_at = time.time()
        run.ended_at = asyncio.get_running_loop().time()
        run.phase = _FINISHED
        run.closed = True  # before its terminal event: subscribers woken by it see the end
        run.append_event(DONE, data)
        if status == STOPPED and run.stop_asked_at is not None:
            metrics.stop_latency.observe(run.ended_at - run.stop_asked_at)
        run.compact()
        run.finished.set()
        logger.info("Run %s of session %s ended: %s", run.id, run.session_key, status)
        if run.subscribers == 0:
            self._schedule_eviction(run)

    async def _save_again(self, run: DrivenRun, end: RunEnd, finalize: Finalize) -> None:
        """Save the end of a run whose final save failed, with back-off
        (`SAVE_AGAIN_DELAYS`), for as long as the process lives (at once, then
        every half second, once shutdown began); then let it be evicted."""
        if self._save_now is None:
            self._save_now = asyncio.Event()
        # A shutdown (every run) or the session's next run (this one) asks
        # for an attempt at once.
        retry = asyncio.ensure_future(_either(self._save_now, run.retry))
        logger.warning(
            "Run %s of session %s ended (%s) but could not be saved; it stays in memory "
            "and is saved again later",
            run.id,
            run.session_key,
            end.status,
        )
        if self._on_unsaved is not None:
            self._on_unsaved(run)
        delays = iter(SAVE_AGAIN_DELAYS)
        while True:
            if self._closing or self._draining:
                await asyncio.sleep(0.5)
            else:
                delay = next(delays, SAVE_AGAIN_DELAYS[-1])
                await asyncio.wait({retry}, timeout=delay)
                if retry.done():
                    run.retry.clear()
                    retry = asyncio.ensure_future(_either(self._save_now, run.retry))
            saved = await _save(run, end, finalize)
            if saved:
                break
            if saved is None:
                retry.cancel()
                return  # cancelled: the loop is closing
        retry.cancel()
        run.unsaved = False
        run.stored.set()
        logger.warning("Run %s of session %s is saved after all", run.id, run.session_key)
        if self._on_saved_after_all is not None:
            self._on_saved_after_all(run)
        if run.subscribers == 0:
            self._schedule_eviction(run)

    def released(self, run: RunLog) -> None:
        """The last subscriber of ``run`` (one of these runs) left, from any
        thread: an ended run is evicted once its grace period is over."""
        call_in_loop(self._loop, self._released, run)

    def _released(self, run: RunLog) -> None:
        if run.closed:
            self._schedule_eviction(run)

    def _schedule_eviction(self, run: RunLog) -> None:
        if run.evict_handle is not None:
            run.evict_handle.cancel()
        if run.unsaved:
            return  # the database does not hold it yet: memory is all there is
        if self._sessions.get(run.session_key) is not run or run.ended_at is None:
            return  # a newer run took the session; this one goes with its last reference
        loop = asyncio.get_running_loop()
        # The grace period counts from the run's end, not from the last visit.
        deadline = run.ended_at + self.backend.evict_after
        if deadline <= loop.time():
            self._evict(run)
        else:
            run.evict_handle = loop.call_at(deadline, self._evict, run)

    def _evict(self, run: RunLog) -> None:
        run.evict_handle = None
        if run.subscribers == 0 and self._sessions.get(run.session_key) is run:
            del self._sessions[run.session_key]
            logger.debug("Evicted run %s of session %s", run.id, run.session_key)


class SharedQuestions(Protocol):
    """What a backend whose answers may reach another process (Redis) adds to
    `RunDriver.ask`: it records the pending question where every process
    sees it, watches for its answer, and takes it back."""

    async def opened(self, run: DrivenRun, request: str) -> None:
        """Record that ``run`` waits for ``request`` (before it is logged)."""

    async def watch(self, run: DrivenRun, request: str) -> None:
        """Until cancelled: `RunDriver.deliver` the answer accepted elsewhere."""

    async def withdraw(self, run: DrivenRun, request: str) -> None:
        """The question timed out: take it back, so that no answer is accepted
        any more; an answer accepted before that, and any being taken here,
        is `RunDriver.deliver`-ed before this returns. Where every process
        sees the question, only they can say which came first: this waits
        for them (a shared store that is unreachable is tried again), so that
        an answer is taken or refused, never both."""

    def abandoned(self, run: DrivenRun, request: str) -> None:
        """The run stopped while waiting: take the question back, soon (not
        awaited: the run is ending)."""


def call_in_loop(loop: asyncio.AbstractEventLoop | None, function: Any, *args: Any) -> None:
    """Call ``function`` on ``loop``: now if we are on it (or there is none
    yet), else soon (a stream released by the garbage collector may be
    outside it)."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is not None and (loop is None or running is loop):
        function(*args)
    elif loop is not None and not loop.is_closed():
        loop.call_soon_threadsafe(function, *args)


async def _ended_and_saved(run: DrivenRun) -> None:
    """Return once ``run`` has ended and its end is saved (at once, or by
    `RunDriver._save_again`)."""
    await run.finished.wait()
    await run.stored.wait()


async def _either(*events: asyncio.Event) -> None:
    """Return once any of ``events`` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def _save(run: DrivenRun, end: RunEnd, finalize: Finalize) -> bool | None:
    """Call the finalize hook; False if it could not save (it said so, or
    raised), None if it was cancelled (the event loop is closing: there is
    no later to save it in)."""
    saving = asyncio.ensure_future(finalize(end))  # a task (named below), owned here
    if isinstance(saving, asyncio.Task):
        saving.set_name(f"detached_runs:finalize:{run.id}")
    # The save must finish even if this task is cancelled again meanwhile.
    while not saving.done():
        try:
            await asyncio.shield(saving)
        except asyncio.CancelledError:
            continue
        except Exception:  # noqa: BLE001 - logged just below
            break
    if saving.cancelled():
        return None
    if saving.exception() is not None:
        logger.error("Saving run %s failed", run.id, exc_info=saving.exception())
        return False
    return saving.result() is not False


async def _close(source: Source) -> None:
    """Run the source's own clean-up (``aclose``); its failure is logged, not raised."""
    aclose = getattr(source, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except asyncio.CancelledError:
        raise
    except BaseException:
        logger.exception("Closing a run's source failed")


def _log_remaining(run: DrivenRun, source: Source) -> None:
    """Log the items a closed source still has (``remaining()``, see `Source`).
    Its failure is logged, not raised: the run still ends."""
    remaining = getattr(source, "remaining", None)
    if remaining is None:
        return
    try:
        for item in remaining():
            if isinstance(item, str):
                run.append_text(item)
            else:
                run.append_event(*item)
    except Exception:
        logger.exception("Run %s: logging what its source had left failed", run.id)


def _safe_error(exc: BaseException) -> str:
    if isinstance(exc, AgentError):
        # The agent's own words: cleaned like its text, since they are saved too.
        return clean_text(str(exc)) or "The agent failed."
    return "The agent failed."

"""The recording of a run: its agent's output fed to the backend's log, and
its row saved, every ``CHECKPOINT_EVERY`` seconds (all runs of a process in
one trip, `Checkpoints`) and at its end (`Recorder.finalize`).

Besides the text, the row gets the run's usage (the merge of the agent's
usage reports, `detached_runs.usage`) and when its first text delta was
logged (``first_token_at``), with each checkpoint and at the end."""

from __future__ import annotations

import asyncio
import copy
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from django.utils import timezone

from . import metrics, rows
from .agents.base import Agent, AgentContext, Turn
from .backends.base import BaseBackend, Item, RunEnd, is_seconds
from .conf import get_config
from .db import data_errors, database_errors, run_sync
from .events import DELTA, RESERVED, USAGE
from .exceptions import AgentError
from .models import Run
from .signals import run_finished
from .text import clean_json, clean_text
from .usage import MAX_USAGE_BYTES, clean_usage, merge_usage, usage_size
from .validation import validate_question
from .workers import heartbeat_every

logger = logging.getLogger(__name__)

_EVENT_TYPE_RE = re.compile(r"\A[A-Za-z0-9_.:-]{1,64}\Z")
#: Delays between attempts of the final save.
SAVE_RETRY_DELAYS = (0.05, 0.2, 0.5, 1.0, 2.0)


#: The row writes of ctx.ask (`Recorder._mark`), held until done.
_MARKS: set[asyncio.Future[None]] = set()


def _log_mark_failure(marking: asyncio.Future[None]) -> None:
    if not marking.cancelled() and marking.exception() is not None:
        # The backend has the status that counts while the run lives; the end
        # is saved over it.
        logger.warning("Could not mark a run waiting or running", exc_info=marking.exception())


#: ``announce(signal, run, **kwargs)``: send a signal about a run (`RunService`'s).
Announce = Callable[..., Awaitable[None]]


class Recorder:
    """The service's side of one run: feeds the agent to the backend
    (`source`), keeps its row's checkpoints due (`checkpoint`) and saves its
    end (`finalize`).

    ``history`` is the agent's history if the service had it at the start;
    otherwise ``read_history(run)`` reads it once the agent starts (after the
    run it replaces is saved)."""

    def __init__(
        self,
        backend: BaseBackend,
        run: Run,
        agent: Agent,
        *,
        checkpoints: Checkpoints,
        announce: Announce,
        read_history: Callable[[Run], Awaitable[tuple[Turn, ...]]],
        history: tuple[Turn, ...] | None = None,
        ended: Callable[[Run], None] | None = None,
    ) -> None:
        self.backend = backend
        self.run = run
        self.agent = agent
        self.checkpoints = checkpoints
        self.announce = announce
        self.read_history = read_history
        self.history = history
        self.ended = ended
        # What the last checkpoint saved, and when.
        self.saved_id, self.beat = "", time.monotonic()
        #: The merge of every usage report accepted so far (yielded, or
        #: reported with ``ctx.report_usage``): what `MAX_USAGE_BYTES` bounds.
        self.usage: dict[str, Any] = {}
        # Reports made with ctx.report_usage, not in the log yet.
        self._reports: list[dict[str, Any]] = []
        # Whether its agent's question (ctx.ask) is pending.
        self._asking = False

    def source(self) -> AgentSource:
        """What the backend drives: the agent's items, checked (`_normalise`),
        and the usage it reports without yielding (`AgentSource.remaining`)."""
        return AgentSource(self._items(), self._reported_items)

    async def _items(self) -> AsyncIterator[Item]:
        run = self.run
        history = self.history
        if history is None:
            history = await self.read_history(run)
        ctx = AgentContext(
            run.session_key,
            run.prompt,
            history,
            run.owner,
            str(run.id),
            options=copy.deepcopy(run.options),
            # Loaded with the row (`rows.open_row`): no query on the event loop.
            user=run.user if run.user_id is not None else None,
            on_usage=self._report,
            on_ask=self._ask,
        )
        stream = self.agent(ctx)
        if not hasattr(stream, "__anext__"):
            if asyncio.iscoroutine(stream):
                stream.close()
            raise AgentError("The agent must return an async iterator (an async generator).")
        self.checkpoints.add(self)
        try:
            async for item in stream:
                for report in self._reported_items():
                    yield report
                try:
                    normalised = _normalise(item)
                except _RefusedUsage as exc:
                    self._refused(str(exc))
                    continue
                if normalised is None:
                    continue
                if (
                    not isinstance(normalised, str)
                    and normalised[0] == USAGE
                    and not self._accept(normalised[1])
                ):
                    continue  # over the bound once merged: dropped
                yield normalised
            for report in self._reported_items():
                yield report
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _ask(self, data: Mapping[str, Any], timeout: float | None) -> Any:
        """``ctx.ask``: the question checked (`validate_question`), asked
        through the backend (`BaseBackend.ask`), and the row ``waiting``
        meanwhile. The row's two writes are queued on the database thread in
        order, and not awaited: a row that ended meanwhile is left alone."""
        question = validate_question(data)
        if timeout is None:
            timeout = get_config()["INPUT_TIMEOUT"]
        if timeout is not None and (not is_seconds(timeout) or timeout <= 0):
            raise ValueError(f"ctx.ask(): timeout must be a number of seconds > 0, not {timeout!r}")
        if self._asking:
            # Refused here, before the row is touched: it says waiting for the
            # question that is pending.
            raise RuntimeError("ctx.ask(): one question at a time; this run waits for one.")
        self._asking = True
        self._mark(waiting=True)
        try:
            return await self.backend.ask(self.run.session_key, self.run.id.hex, question, timeout)
        finally:
            self._asking = False
            self._mark(waiting=False)

    def _mark(self, *, waiting: bool) -> None:
        marking = asyncio.ensure_future(run_sync(rows.mark_waiting, self.run.pk, waiting))
        marking.add_done_callback(_log_mark_failure)
        _MARKS.add(marking)
        marking.add_done_callback(_MARKS.discard)

    def _report(self, data: Mapping[str, Any]) -> None:
        """``ctx.report_usage``: check and accept a report, to be logged with
        the agent's next item or once it has ended (`AgentSource.remaining`)."""
        try:
            usage = clean_usage(data)
        except ValueError as exc:
            self._refused(str(exc))
            return
        if self._accept(usage):
            self._reports.append(usage)

    def _accept(self, usage: dict[str, Any]) -> bool:
        """Merge a checked report into the run's usage, unless the merge would
        be over `MAX_USAGE_BYTES` (then it is dropped, and said so)."""
        merged = merge_usage(self.usage, usage)
        size = usage_size(merged)
        if size > MAX_USAGE_BYTES:
            self._refused(f"the run's usage would be {size} bytes of JSON, over {MAX_USAGE_BYTES}")
            return False
        self.usage = merged
        return True

    def _refused(self, reason: str) -> None:
        logger.warning("Run %s: dropped a usage report of its agent: %s", self.run.id.hex, reason)

    def _take_reports(self) -> list[dict[str, Any]]:
        reports, self._reports = self._reports, []
        return reports

    def _reported_items(self) -> list[Item]:
        """The reports not logged yet, as ``usage`` items (to be logged now)."""
        return [(USAGE, report) for report in self._take_reports()]

    def checkpoint(self) -> rows.Checkpoint | None:
        """What to write of the row if it is due a checkpoint (new events, or a
        heartbeat to show its process is alive), else None: the run's text,
        usage and first token as its log holds them."""
        state = self.backend.driven(self.run.session_key, self.run.id.hex)
        if state is None:
            return None
        if state.last_id == self.saved_id and time.monotonic() - self.beat < heartbeat_every():
            return None
        return rows.Checkpoint(
            self.run.pk, state.output, state.last_id, state.usage, _moment(state.first_token_at)
        )

    async def finalize(self, end: RunEnd) -> bool:
        """Save the run's end (`detached_runs.backends.base.Finalize`), trying
        again a few times (`SAVE_RETRY_DELAYS`) while the database fails;
        False if it still failed (the backend keeps the run and calls again)."""
        # A checkpoint written after this save finds the row no longer running.
        self.checkpoints.discard(self)
        now = timezone.now()
        # The usage the log holds; and reports that never reached it (made by
        # an agent that was abandoned, STOP_GRACE after its stop), so that
        # the row has every report the agent made before its end was saved.
        usage = end.usage
        for report in self._take_reports():
            usage = merge_usage(usage, report)
        fields = {
            "status": end.status,
            "output": end.output,
            "error": end.error,
            "last_event_id": end.terminal_id,
            "usage": usage,
            "first_token_at": _moment(end.first_token_at),
            "finished_at": now,
            "updated_at": now,
        }
        ended, gone, escaped = 0, False, False
        delays = iter((*SAVE_RETRY_DELAYS, None))
        while True:
            try:
                ended, gone = await run_sync(rows.save_end, self.run.pk, fields)
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
            metrics.save_failures.labels(save="final").inc()
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
        if ended or gone:
            # Gone: a rollback deleted its row as it stopped it; the run
            # still ran, and its receivers hear of its end.
            run = copy.copy(self.run)  # the caller of start() keeps its own
            for name, value in fields.items():
                setattr(run, name, value)
            metrics.run_ended(run)
            await self.announce(run_finished, run, status=end.status, output=end.output)
        if self.ended is not None:
            self.ended(self.run)
        return True


class Checkpoints:
    """Checkpoints of every run this service drives, written together: one
    task and one trip to the database per ``CHECKPOINT_EVERY``, however many
    runs are in flight (a task and a transaction per run would cost a thousand
    commits a second at a thousand runs)."""

    def __init__(self) -> None:
        self._recorders: set[Recorder] = set()
        self._task: asyncio.Task[None] | None = None

    def add(self, recorder: Recorder) -> None:
        loop = asyncio.get_running_loop()
        if self._task is not None and self._task.get_loop() is not loop:
            # A new event loop (tests run one each): what the old one held is gone.
            self._recorders, self._task = set(), None
        self._recorders.add(recorder)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._loop(), name="detached_runs:checkpoints")

    def discard(self, recorder: Recorder) -> None:
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
                refused = await run_sync(rows.write_checkpoints, list(due.values()))
            except Exception:  # one task serves every run: it must go on
                metrics.save_failures.labels(save="checkpoint").inc(len(due))
                logger.warning(
                    "Checkpoint of run %s failed; will retry",
                    ", ".join(r.run.id.hex for r in due),
                    exc_info=True,
                )
                continue
            now = time.monotonic()
            for recorder, checkpoint in due.items():
                if recorder.run.pk in refused:
                    # Its data, not the database: the others' rows were written.
                    metrics.save_failures.labels(save="checkpoint").inc()
                    logger.warning(
                        "The database refused the checkpoint of run %s; will retry",
                        recorder.run.id.hex,
                    )
                    continue
                metrics.checkpoint_lag.observe(now - recorder.beat)
                recorder.saved_id, recorder.beat = checkpoint.last_id, now


class AgentSource:
    """A run's source (`detached_runs.backends.base.Source`): the agent's
    items as the recorder checks them, and, once closed, the usage the agent
    reported during its clean-up (`remaining`), which it could not yield."""

    def __init__(self, items: AsyncIterator[Item], remaining: Callable[[], list[Item]]) -> None:
        self._items = items
        self._remaining = remaining

    def __aiter__(self) -> AgentSource:
        return self

    async def __anext__(self) -> Item:
        return await anext(self._items)

    async def aclose(self) -> None:
        aclose = getattr(self._items, "aclose", None)
        if aclose is not None:
            await aclose()

    def remaining(self) -> list[Item]:
        """The agent's usage reports not logged yet (made in its ``finally``
        while it was stopped, or after its last item), as ``usage`` items."""
        return self._remaining()


class _RefusedUsage(ValueError):
    """A usage report that breaks a rule of `detached_runs.usage.clean_usage`."""


def _moment(timestamp: float | None) -> datetime | None:
    """A backend's wall-clock moment (``time.time()``) as an aware datetime."""
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC)


def _escaped(text: str) -> str:
    """``text`` as ASCII with backslash escapes: what a final save stores when
    the database refuses the text itself, so that it is kept, if not pretty."""
    return text.encode("ascii", "backslashreplace").decode("ascii")


def _normalise(item: Any) -> Item | None:
    """An agent's item as a log item, or None to skip it (empty text).

    The boundary of the agent's output: text and event data are cleaned here
    (`detached_runs.text`), once, so that the log, clients and the saved row
    can encode and store them on every database. A ``usage`` event's data is
    checked by `detached_runs.usage.clean_usage`; a bad one raises
    `_RefusedUsage` (the recorder drops it), not `AgentError`.
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
        if event == USAGE:
            # Accounting never ends the answer: a bad report is dropped (and
            # said so in the log, `_RefusedUsage`), not an AgentError.
            try:
                return (USAGE, clean_usage(data))
            except ValueError as exc:
                raise _RefusedUsage(str(exc)) from None
        try:
            data = clean_json(data)
        except (TypeError, ValueError) as exc:
            raise AgentError(f"The agent yielded a {event} event whose data is not JSON.") from exc
        if not isinstance(data, dict):
            data = {"value": data}
        return (event, data)
    raise AgentError("The agent yielded something that is neither text nor an event.")

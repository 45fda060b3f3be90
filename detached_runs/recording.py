"""The recording of a run: its agent's output fed to the backend's log, and
its row saved, every ``CHECKPOINT_EVERY`` seconds (all runs of a process in
one trip, `Checkpoints`) and at its end (`Recorder.finalize`)."""

from __future__ import annotations

import asyncio
import copy
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from django.utils import timezone

from . import rows
from .agents.base import Agent, AgentContext, Turn
from .backends.base import BaseBackend, Item, RunEnd
from .conf import get_config
from .db import data_errors, database_errors, run_sync
from .events import DELTA, RESERVED
from .exceptions import AgentError
from .models import Run
from .signals import run_finished
from .text import clean_json, clean_text
from .workers import heartbeat_every

logger = logging.getLogger(__name__)

_EVENT_TYPE_RE = re.compile(r"\A[A-Za-z0-9_.:-]{1,64}\Z")
#: Delays between attempts of the final save.
SAVE_RETRY_DELAYS = (0.05, 0.2, 0.5, 1.0, 2.0)


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
    ) -> None:
        self.backend = backend
        self.run = run
        self.agent = agent
        self.checkpoints = checkpoints
        self.announce = announce
        self.read_history = read_history
        self.history = history
        # What the last checkpoint saved, and when.
        self.saved_id, self.beat = "", time.monotonic()

    async def source(self) -> AsyncIterator[Item]:
        run = self.run
        history = self.history
        if history is None:
            history = await self.read_history(run)
        ctx = AgentContext(run.session_key, run.prompt, history, run.owner, str(run.id))
        stream = self.agent(ctx)
        if not hasattr(stream, "__anext__"):
            if asyncio.iscoroutine(stream):
                stream.close()
            raise AgentError("The agent must return an async iterator (an async generator).")
        self.checkpoints.add(self)
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
        if snapshot[1] == self.saved_id and time.monotonic() - self.beat < heartbeat_every():
            return None
        return snapshot

    async def finalize(self, end: RunEnd) -> bool:
        """Save the run's end (`detached_runs.backends.base.Finalize`), trying
        again a few times (`SAVE_RETRY_DELAYS`) while the database fails;
        False if it still failed (the backend keeps the run and calls again)."""
        # A checkpoint written after this save finds the row no longer running.
        self.checkpoints.discard(self)
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
                ended = await run_sync(rows.save_end, self.run.pk, fields)
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
            await self.announce(run_finished, run, status=end.status, output=end.output)
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
                refused = await run_sync(
                    rows.write_checkpoints,
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

"""A run served from its row once the backend no longer holds it
(`StoredSubscription`), and the saved outputs its subscribers share
(`StoredOutputs`)."""

from __future__ import annotations

import asyncio
import copy
import uuid
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from . import rows
from .backends.base import ACTIVE, READ_CHUNK, Subscription, piece_end, shared_result
from .conf import get_config
from .db import run_sync
from .events import DELTA, DONE, ORIGIN, START, Event, Position, make_id
from .exceptions import RunNotFound
from .models import Run


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
        resolve: Callable[[Run], Awaitable[Run]],
        outputs: StoredOutputs,
        row: Run,
        output: _Output,
        after: tuple[str, Position] | None,
    ) -> None:
        self._resolve, self._outputs = resolve, outputs
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
            if row.status not in ACTIVE and self._cursor > terminal:
                # The client saw more than the last checkpoint before the process
                # died: nothing of the text is left to send, only the end.
                self._cursor = Position(terminal.text, terminal.seq - 1)
        self._closed = False

    @classmethod
    async def bind(
        cls,
        resolve: Callable[[Run], Awaitable[Run]],
        outputs: StoredOutputs,
        row: Run,
        after: tuple[str, Position] | None,
    ) -> StoredSubscription:
        """A subscription to ``row`` (its output may be deferred), after
        ``after`` (``(run id, position)``). ``resolve`` reads the row again
        while it is running (`RunService.resolve`, its output deferred)."""
        return cls(resolve, outputs, *await outputs.get(row), after)

    def _terminal(self) -> Position:
        return rows.terminal_position(self._row, len(self._output.data))

    @property
    def ended(self) -> bool:
        return self._row.status not in ACTIVE and self._cursor >= self._terminal()

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
            self._row, self._output = await self._outputs.get(await self._resolve(self._row))

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
        if row.status not in ACTIVE:
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

    def hang_up(self) -> None:
        if self._row.status in ACTIVE:  # else its terminal event is there to read
            self.close()

    def close(self) -> None:
        self._closed = True


class StoredOutputs:
    """Saved outputs as UTF-8 bytes, each shared by the stored subscriptions
    of a run in one saved state for as long as any of them holds it."""

    def __init__(self) -> None:
        self._outputs: weakref.WeakValueDictionary[tuple[Any, ...], _Output] = (
            weakref.WeakValueDictionary()
        )
        self._loading: dict[uuid.UUID, asyncio.Future[tuple[Run, _Output]]] = {}

    async def get(self, row: Run) -> tuple[Run, _Output]:
        """``row`` without its output, and the output. The output is read from
        the database only if no subscription holds it (``row``'s own output
        may be deferred), and once however many subscribers ask for it at the
        same time. `RunNotFound` if the row is gone."""
        cached = self._outputs.get((row.pk, row.status, row.last_event_id))
        if cached is not None:
            row.output = ""
            return row, cached
        pk = row.pk
        full, output = await shared_result(self._loading, pk, lambda: self._load(pk))
        return copy.copy(full), output  # each subscription keeps a row of its own

    async def _load(self, pk: uuid.UUID) -> tuple[Run, _Output]:
        full = await run_sync(rows.load_row, pk)
        if full is None:
            raise RunNotFound("No such session.")
        output = _Output(full.output.encode())
        full.output = ""
        self._outputs[(full.pk, full.status, full.last_event_id)] = output
        return full, output

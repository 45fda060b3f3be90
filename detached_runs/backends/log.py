"""A run's log, as both backends hold it in a process: the run a worker
drives (`detached_runs.backends.memory`), and a worker's mirror of a run that
another worker drives (`detached_runs.backends.redis`).

* The log is `Event` entries and text blocks: consecutive deltas are one
  UTF-8 buffer, so memory is O(output) and a replay is compact by
  construction (`RunLog.read` merges them into one ``delta``, cut at
  ``READ_CHUNK`` bytes on a character boundary).
* Positions (`detached_runs.events.Position`): ``(text, seq)``, the UTF-8
  bytes of text and the number of other events before a point; each event's
  id is its run and the position its last byte ends at.
* A subscriber (`LogSubscription`) is a cursor into the log and a wake-up
  future while it waits; it holds no queue. Whatever piled up while it was
  busy is read in one go.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_right
from collections.abc import Callable
from typing import Any

from .. import metrics
from ..events import (
    DELTA,
    DONE,
    INPUT_RECEIVED,
    INPUT_REQUIRED,
    INPUT_TIMEOUT,
    ORIGIN,
    USAGE,
    Event,
    Position,
    make_id,
)
from ..exceptions import BadEventId
from ..usage import merge_usage
from .base import READ_CHUNK, RUNNING, WAITING, RunState, Subscription, piece_end

#: How long subscribers may be kept waiting while a producer appends on every
#: turn of the loop, so that they take a burst in one write (seconds).
COALESCE_FOR = 0.01
#: Up to this many subscribers waiting on a run are woken at each append.
WAKE_AT_ONCE_UP_TO = 8


class TextBlock:
    """Consecutive deltas: positions ``(start, seq)`` exclusive to ``(start+len, seq)``."""

    __slots__ = ("buf", "seq", "start")

    def __init__(self, start: int, seq: int) -> None:
        self.start = start
        self.seq = seq
        self.buf: bytearray | bytes = bytearray()


class RunLog:
    """One run's log, its state (status, error, usage, whether it ended) and
    the subscribers that wait on it. Used from one event loop."""

    #: Whether this process drives the run (`detached_runs.backends.driver.DrivenRun`);
    #: else it is a copy of another process's log (a Redis mirror).
    driven = False

    __slots__ = (
        "__weakref__",
        "_cache",
        "_flush",
        "closed",
        "ended_at",
        "ends",
        "entries",
        "error",
        "evict_handle",
        "finished",
        "finished_at",
        "first_text_at",
        "id",
        "input_request",
        "meta",
        "position",
        "session_key",
        "status",
        "subscribers",
        "unsaved",
        "usage",
        "waiters",
    )

    def __init__(self, run_id: str, session_key: str, meta: dict[str, Any]) -> None:
        self.id = run_id
        self.session_key = session_key
        self.meta = meta
        # The log: Events and TextBlocks; ends[i] is the position of entries[i]'s last byte.
        self.entries: list[Event | TextBlock] = []
        self.ends: list[Position] = []
        self.position = ORIGIN
        self.status = RUNNING
        self.error = ""
        #: Its terminal event is in the log: nothing more is appended.
        self.closed = False
        self.finished = asyncio.Event()
        self.finished_at: float | None = None  # wall clock
        self.ended_at: float | None = None  # loop time
        #: Its end is not in the database yet (the final save failed).
        self.unsaved = False
        #: The merge of its ``usage`` events so far, later keys winning
        #: (`detached_runs.usage.merge_usage`): every copy of the log, a
        #: worker's own or another's mirror of it, merges the same events.
        self.usage: dict[str, Any] = {}
        #: Wall-clock moment its first text delta was logged (time.time()):
        #: set by the process that drives the run (`DrivenRun`), or copied
        #: from where that process wrote it (a Redis mirror); None before.
        self.first_text_at: float | None = None
        #: The data of its pending ``input_required`` event (``{"request":
        #: "<id>", ...}``) until its ``input_received`` or ``input_timeout``
        #: (or the run's end): the run is ``waiting`` meanwhile. Every copy of
        #: the log sees the same events, so every worker agrees.
        self.input_request: dict[str, Any] | None = None
        self.waiters: list[asyncio.Future[None]] = []
        self._flush: asyncio.Handle | None = None
        self.subscribers = 0
        #: The backend's timer that drops the log once it is idle (eviction):
        #: a new subscriber cancels it.
        self.evict_handle: asyncio.TimerHandle | None = None
        # The last read: (after, position, events, end). Subscribers that are
        # level share it, so a fan-out encodes each event once.
        self._cache: tuple[Position, Position, list[Event], Position] | None = None

    # -- writing -----------------------------------------------------------

    def append_text(self, text: str) -> None:
        data = text.encode()
        if not data:
            return
        last = self.entries[-1] if self.entries else None
        if isinstance(last, TextBlock) and isinstance(last.buf, bytearray):
            last.buf += data
            self.position = Position(self.position.text + len(data), self.position.seq)
            self.ends[-1] = self.position
        else:
            block = TextBlock(self.position.text, self.position.seq)
            block.buf += data
            self.position = Position(self.position.text + len(data), self.position.seq)
            self.entries.append(block)
            self.ends.append(self.position)
        self._wake()

    def append_event(self, event: str, data: dict[str, Any]) -> Event:
        position = Position(self.position.text, self.position.seq + 1)
        item = Event(make_id(self.id, position), event, data)
        item.sse  # encoded once, here; raises TypeError for data that is not JSON  # noqa: B018
        if event == USAGE:
            self.usage = merge_usage(self.usage, data)
        elif event == INPUT_REQUIRED:
            self.input_request = data
        elif event == DONE or (
            event in (INPUT_RECEIVED, INPUT_TIMEOUT)
            and self.input_request is not None
            and self.input_request.get("request") == data.get("request")
        ):
            self.input_request = None
        self.position = position
        self.entries.append(item)
        self.ends.append(self.position)
        self._wake()
        return item

    def _wake(self) -> None:
        # Subscribers are woken from the loop: their tasks run on its next
        # turn, after whatever else the producer appends in this one. A few
        # (a chat's tab or two) are woken at each append, so a paced agent's
        # token goes out on the next turn. Many are not woken on every turn
        # while the producer appends on every turn (a burst): each would
        # write a sliver per turn, and the turns, busy with their writes,
        # would hold the producer back. They wake when it pauses for a turn,
        # or after COALESCE_FOR at most, and take what piled up as one write.
        if not self.waiters or self._flush is not None:
            return
        if len(self.waiters) <= WAKE_AT_ONCE_UP_TO:
            self._wake_waiters()
        else:
            loop = asyncio.get_running_loop()
            self._flush = loop.call_soon(self._flush_waiters, self.position, loop.time())

    def _flush_waiters(self, seen: Position, since: float) -> None:
        loop = asyncio.get_running_loop()
        if self.position != seen and loop.time() - since < COALESCE_FOR:
            self._flush = loop.call_soon(self._flush_waiters, self.position, since)
            return
        self._flush = None
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        waiters, self.waiters = self.waiters, []
        for future in waiters:
            set_if_pending(future)

    def mark_finished(self, status: str, error: str) -> None:
        """End the run's state (after its terminal event is in the log)."""
        self.status, self.error = status, error
        self.finished_at = time.time()
        self.ended_at = asyncio.get_running_loop().time()
        self.closed = True
        self.finished.set()

    def compact(self) -> None:
        """Once finished, text blocks shrink to exact-size immutable bytes."""
        for entry in self.entries:
            if isinstance(entry, TextBlock):
                entry.buf = bytes(entry.buf)
        self._cache = None

    # -- reading -----------------------------------------------------------

    def terminal(self) -> Position | None:
        """The position of the terminal event, once it is in the log."""
        return self.position if self.closed else None

    def check_after(self, after: Position) -> None:
        """`BadEventId` unless ``after`` is a position of this log: the end of
        an entry, or a character boundary inside a text block (whose events
        count, ``seq``, is the block's). A position of another log of the same
        run (one that a worker cut off from Redis and the worker that reaped
        it each ended) is refused, not read as a point in this one."""
        if after > self.position:
            raise BadEventId("Unknown event id.")
        index = bisect_right(self.ends, after)
        if after == ORIGIN or (index > 0 and self.ends[index - 1] == after):
            return  # the start, or the end of an entry
        entry = self.entries[index]
        if not isinstance(entry, TextBlock) or after.seq != entry.seq:
            raise BadEventId("Unknown event id.")
        offset = after.text - entry.start
        if offset < len(entry.buf) and (entry.buf[offset] & 0xC0) == 0x80:
            raise BadEventId("Unknown event id.")

    def read(self, after: Position, limit: int = READ_CHUNK) -> tuple[list[Event], Position]:
        """The events after ``after``, consecutive deltas merged into one, up
        to about ``limit`` bytes (of text, and of the other events' encoding:
        always at least one event); and the position the last one ends at.

        So a replay of a long answer goes out as pieces of at most ``limit``
        bytes, each read once the previous one was written: a subscriber
        whose client does not read holds one piece, not a copy of the answer.
        A delta cut short ends at a character boundary, at a position that is
        a valid resume point like any other delta's.
        """
        if after >= self.position:
            return [], after
        cache = self._cache
        if cache is not None and cache[0] == after and cache[1] == self.position:
            return cache[2], cache[3]
        events: list[Event] = []
        size, end = 0, after
        first = bisect_right(self.ends, after)
        for index in range(first, len(self.entries)):
            if size >= limit:
                break
            entry = self.entries[index]
            if isinstance(entry, Event):
                events.append(entry)
                size += len(entry.sse)
                end = self.ends[index]
                continue
            begin = 0
            if after.seq == entry.seq and after.text > entry.start:
                begin = after.text - entry.start
            stop = piece_end(entry.buf, begin, limit - size)
            end = Position(entry.start + stop, entry.seq)
            text = bytes(entry.buf[begin:stop]).decode()
            events.append(Event(make_id(self.id, end), DELTA, {"text": text}))
            size += stop - begin
            if stop < len(entry.buf):
                break  # cut short: the rest of it, and what follows, is the next read's
        self._cache = (after, self.position, events, end)
        return events, end

    def output(self) -> str:
        return b"".join(e.buf for e in self.entries if isinstance(e, TextBlock)).decode()

    def output_until_now(self) -> Callable[[], str]:
        """A function that gives `output` as it is now, whenever it is called:
        the text blocks so far and their length are taken now (references, no
        copy), their bytes joined and decoded only if the function is called.
        A block only grows at its end, so what it holds now stays its prefix."""
        blocks = [e.buf for e in self.entries if isinstance(e, TextBlock)]
        length = self.position.text

        def output() -> str:
            return b"".join(blocks)[:length].decode()

        return output

    def last_id(self) -> str:
        return make_id(self.id, self.position)

    def state(self) -> RunState:
        return RunState(
            run_id=self.id,
            session_key=self.session_key,
            status=self.live_status,
            error=self.error,
            output=self.output_until_now(),
            last_id=self.last_id(),
            meta=self.meta,
            finished_at=self.finished_at,
            saved=not self.unsaved,
            usage=dict(self.usage),
            first_token_at=self.first_text_at,
            input_request=self.input_request,
        )

    @property
    def live_status(self) -> str:
        """Its status as clients see it: ``waiting`` while a request is
        pending (`input_request`), else `status` (``running`` until it ends)."""
        if self.status == RUNNING and self.input_request is not None:
            return WAITING
        return self.status

    async def wait_for_change(self, timeout: float) -> None:
        """Return at the next append, or after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self.waiters.append(future)
        timer = loop.call_later(timeout, set_if_pending, future)
        try:
            await future
        finally:
            timer.cancel()


class LogSubscription(Subscription):
    """A subscriber of a `RunLog`: a cursor (``cursor``, the position it has
    read up to) and, while it waits, one future in ``log.waiters``.
    ``released(log)`` is called when it closes as the log's last subscriber
    (from whatever thread closes it: a stream dropped by the garbage
    collector may be outside the loop)."""

    def __init__(self, log: RunLog, cursor: Position, released: Callable[[RunLog], None]) -> None:
        self._released = released
        run = log
        self._run = run
        self._cursor = cursor
        self._closed = False
        # Keep-alive: one timer per quiet spell, not one per wait (a wait per
        # token would cost a timer per token); see _keepalive_due.
        self._waiting: asyncio.Future[None] | None = None
        self._quiet_since: float | None = None
        self._timeout = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timed_out = False
        self.run_id = run.id
        self.meta = run.meta
        run.subscribers += 1
        metrics.subscribers.inc()
        if run.evict_handle is not None:
            run.evict_handle.cancel()
            run.evict_handle = None

    @property
    def ended(self) -> bool:
        terminal = self._run.terminal()
        return terminal is not None and self._cursor >= terminal

    async def next_batch(self, timeout: float | None = None) -> list[Event]:
        run = self._run
        while True:
            if self._closed or self.ended:
                raise StopAsyncIteration
            batch, end = run.read(self._cursor)
            if batch:
                self._cursor = end
                self._quiet_since = None
                return batch
            loop = asyncio.get_running_loop()
            future: asyncio.Future[None] = loop.create_future()
            run.waiters.append(future)
            if timeout:
                self._timeout = timeout
                if self._quiet_since is None:
                    self._quiet_since = loop.time()
                if self._timer is None:
                    self._timer = loop.call_at(self._quiet_since + timeout, self._keepalive_due)
            self._waiting = future
            try:
                await future
            finally:
                self._waiting = None
            if self._timed_out:
                self._timed_out = False
                if self._cursor >= run.position and not self.ended:
                    self._quiet_since = None
                    return []

    def _keepalive_due(self) -> None:
        self._timer = None
        if self._waiting is None or self._quiet_since is None:
            return  # not waiting now: the next wait arms the timer again
        loop = asyncio.get_running_loop()
        due = self._quiet_since + self._timeout
        if loop.time() < due:  # it went quiet again since the timer was set
            self._timer = loop.call_at(due, self._keepalive_due)
            return
        self._timed_out = True
        set_if_pending(self._waiting)

    def hang_up(self) -> None:
        if self._run.closed or self._run.driven:
            return  # its terminal event is there to read, or will be: its run is this process's
        self.close()
        if self._waiting is not None:
            set_if_pending(self._waiting)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._run.subscribers -= 1
        metrics.subscribers.dec()
        if self._run.subscribers == 0:
            self._released(self._run)


def set_if_pending(future: asyncio.Future[None]) -> None:
    """Wake ``future``'s waiter, unless it was woken or cancelled already."""
    if not future.done():
        future.set_result(None)

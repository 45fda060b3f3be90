"""The event type of a run's log and its wire encodings (SSE and JSON).

An event id names its run and a *position* in that run's log::

    <run uuid hex>:<text>-<seq>

``text`` is how many UTF-8 bytes of assistant text the log holds up to and
including the event, ``seq`` how many non-text events (``start``, custom
events, ``done``). Every event raises one of the two, so ids are strictly
increasing within a run (compared as the pair ``(text, seq)``), and an id says
exactly how much of the text a client has already seen. That is what lets a
backend store a run's text as one buffer (memory O(output), not O(tokens)),
merge consecutive deltas on replay, and serve a resume after eviction from the
saved output alone. Clients must treat ids as opaque.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .exceptions import BadEventId

START = "start"
DELTA = "delta"
DONE = "done"
#: An agent's report of its usage (tokens, cost): logged like its other events,
#: and merged into the run's usage by the log (`detached_runs.usage`).
USAGE = "usage"
#: The agent asks the user something (``ctx.ask``): ``{"request": "<id>", ...}``.
INPUT_REQUIRED = "input_required"
#: The answer to a request was accepted: ``{"request": "<id>"}`` (its value is
#: the agent's, not every subscriber's).
INPUT_RECEIVED = "input_received"
#: No answer came in time: ``{"request": "<id>"}``; the request is no longer pending.
INPUT_TIMEOUT = "input_timeout"
#: Event types an agent may not yield itself: the service emits them.
RESERVED = frozenset({START, DONE, INPUT_REQUIRED, INPUT_RECEIVED, INPUT_TIMEOUT})

_ID_RE = re.compile(r"\A([0-9a-f]{32}):([0-9]{1,15})-([0-9]{1,15})\Z")


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """A point in a run's log; see the module docstring."""

    text: int = 0
    seq: int = 0

    def __str__(self) -> str:
        return f"{self.text}-{self.seq}"


#: Before the first event of any run.
ORIGIN = Position(0, 0)


def make_id(run: str, position: Position) -> str:
    return f"{run}:{position.text}-{position.seq}"


def parse_id(value: str) -> tuple[str, Position]:
    """Split an event id into ``(run hex, position)``; `BadEventId` if malformed."""
    match = _ID_RE.match(value.strip())
    if match is None:
        raise BadEventId("Malformed event id.")
    return match[1], Position(int(match[2]), int(match[3]))


#: Compact, one line (json escapes newlines inside strings), UTF-8 kept as is.
#: One encoder for all: json.dumps() with options builds a new one per call,
#: which was 40% of the cost of encoding a token's event. Strict JSON: data
#: reaches it cleaned (`detached_runs.text`), so a NaN here is a bug, not a
#: value to send that no browser's JSON.parse accepts.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def dumps(data: Any) -> str:
    """``data`` as compact, strict JSON with UTF-8 kept (the wire encodings'):
    `ValueError` for a NaN or an infinity."""
    return _ENCODER.encode(data)


@dataclass(frozen=True, slots=True)
class Event:
    """One item of a run's log.

    The SSE bytes are computed once and cached on the event, so a batch read by
    many subscribers is encoded once, not once per subscriber.
    """

    id: str
    event: str
    data: dict[str, Any]
    _sse: list[bytes] = field(default_factory=list, repr=False, compare=False)
    _frame: list[str] = field(default_factory=list, repr=False, compare=False)

    @property
    def sse(self) -> bytes:
        """This event in the SSE wire format, ending with the blank line."""
        if not self._sse:
            self._sse.append(
                f"id: {self.id}\nevent: {self.event}\ndata: {dumps(self.data)}\n\n".encode()
            )
        return self._sse[0]

    def as_json(self) -> dict[str, Any]:
        """The WebSocket frame as a dict: ``{"id", "event", "data"}``."""
        return {"id": self.id, "event": self.event, "data": self.data}

    @property
    def frame(self) -> str:
        """The WebSocket text frame, encoded once like `sse`."""
        if not self._frame:
            self._frame.append(dumps(self.as_json()))
        return self._frame[0]

    @property
    def is_terminal(self) -> bool:
        return self.event == DONE


def encode_sse(events: list[Event]) -> bytes:
    """Several events as one write."""
    if len(events) == 1:
        return events[0].sse
    return b"".join(event.sse for event in events)


KEEPALIVE_SSE = b": keep-alive\n\n"

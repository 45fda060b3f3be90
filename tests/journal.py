"""A witness of when each agent ran, across worker processes, for the fault test.

The rows cannot say whether two runs of a session were in flight at once: a
run's row is created (``started_at``) before the run it replaces is stopped, by
design, and so is its ``start`` event. What the contract promises is about
the agents: a run's agent begins only after the previous run's agent let go
and its final save was made. So the server processes of
`tests.test_fault_injection` run the agent `journaled` (``TEST_AGENT``) and,
with ``TEST_AGENT_JOURNAL`` naming a file, append one JSON line per fact to
it, with the wall-clock time and the process id:

* ``begin``: the agent's body began (the backend iterates it only once the
  session's previous run ended);
* ``end``: the agent let go (its ``finally`` ran: done, stopped, interrupted);
* ``saved``: ``run_finished`` was sent in this process, i.e. a save here ended
  the run's row (its own final save, or the reaping of a dead worker's run);
  written by a process once it has loaded the agent, so always by the
  process that ran the run.

A process killed with SIGKILL writes nothing more: its agents' end is its death,
which the test knows. Lines are short and appended with ``O_APPEND`` in one
``write``, so the processes' lines never mix.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from detached_runs.models import Run
from detached_runs.signals import run_finished

from .agents import words

#: The file the facts go to; unset: nothing is written (and no receiver connected).
PATH = os.environ.get("TEST_AGENT_JOURNAL")


@dataclass(frozen=True, slots=True)
class Fact:
    """One line of the journal."""

    what: str  # begin, end or saved
    time: float  # time.time() when it happened
    pid: int
    session: str
    run: str  # the run's id, as hex
    status: str = ""  # for saved: the status the row was ended with


def _write(what: str, session: str, run: str, status: str = "") -> None:
    if PATH is None:
        return
    line = json.dumps(
        {"what": what, "time": time.time(), "pid": os.getpid(), "session": session, "run": run}
        | ({"status": status} if status else {})
    )
    fd = os.open(PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


async def journaled(ctx: Any) -> AsyncIterator[str | dict[str, Any]]:
    """`tests.agents.words`, with its beginning and its end written down."""
    run = uuid.UUID(ctx.run_id).hex
    _write("begin", ctx.session_key, run)
    try:
        async for item in words(ctx):
            yield item
    finally:
        _write("end", ctx.session_key, run)


def _saved(sender: Any, run: Run, status: str, **kwargs: Any) -> None:
    _write("saved", run.session_key, run.id.hex, status)


if PATH is not None:
    # Connected when the agent is first loaded in a server process, which is
    # before any run it drives can end.
    run_finished.connect(_saved, sender=Run, dispatch_uid="tests.journal")


def read(path: str) -> list[Fact]:
    """Every fact written to the journal at ``path`` so far, in file order."""
    try:
        with open(path) as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return []
    facts = []
    for line in lines:
        if not line.strip():
            continue
        data = json.loads(line)
        facts.append(
            Fact(
                data["what"],
                data["time"],
                data["pid"],
                data["session"],
                data["run"],
                data.get("status", ""),
            )
        )
    return facts

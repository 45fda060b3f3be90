"""The agent's side of a run: what an agent is, what it is called with, and
how the app loads the one ``DETACHED_RUNS["AGENT"]`` names.

An agent is an async generator function taking an `AgentContext`; it yields
text (``str``) and events (``{"event": name, "data": {...}}``). Nothing here
imports the service, so an agent module can import these types freely.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from ..conf import get_config

Agent = Callable[["AgentContext"], AsyncIterator[Any]]


@dataclass(frozen=True, slots=True)
class Turn:
    """An earlier run of the session, as the agent sees it in ``ctx.history``."""

    prompt: str
    output: str
    status: str


@dataclass(frozen=True, slots=True)
class AgentContext:
    """What the agent is called with: the session, the prompt (cleaned), the
    session's earlier runs oldest first (at most ``HISTORY_LIMIT``), the
    owner key (``"user:<pk>"``, ``"anon:<id>"`` or ``""``), the run's
    uuid as a string, the options sent with the prompt (a dict, as
    ``VALIDATE_OPTIONS`` cleaned them; ``{}`` if none) and the ``User`` who
    started the run (None for an anonymous visitor or a trusted caller).

    ``on_usage`` and ``on_ask`` are where `report_usage` and `ask` go: the
    service sets them; an agent has no use for them."""

    session_key: str
    prompt: str
    history: tuple[Turn, ...]
    owner: str
    run_id: str
    options: dict[str, Any] = field(default_factory=dict)
    user: Any = None
    on_usage: Callable[[Mapping[str, Any]], None] | None = field(
        default=None, repr=False, compare=False
    )
    on_ask: Callable[[Mapping[str, Any], float | None], Awaitable[Any]] | None = field(
        default=None, repr=False, compare=False
    )

    async def ask(self, data: Mapping[str, Any], timeout: float | None = None) -> Any:
        """Ask the user something and wait for the answer; return its value
        (any JSON value the client sent: a string, a number, an object...).

        ``data`` is a JSON object that says what is asked (``{"question":
        "Run this SQL?", "choices": ["yes", "no"]}``: its shape is between
        the agent and its frontend). It is logged as an ``input_required``
        event, ``{"request": "<id>", **data}``, which every subscriber gets
        (and a replay, a reload, ``GET <key>/``'s ``input_request``); the run
        is ``waiting`` until the answer comes (``POST <key>/input/``, or a
        WebSocket ``input`` frame), whichever worker it reaches. The answer
        is logged as ``input_received``, ``{"request": "<id>"}``, and the
        run is ``running`` again. One question at a time: an agent may ask
        again once it has the answer.

        ``timeout``: seconds to wait (default ``INPUT_TIMEOUT``, 3600; None
        there: no limit). Past it an ``input_timeout`` event is logged and
        `detached_runs.exceptions.InputTimeout` is raised here; the agent may
        catch it and go on, or let it end the run as ``error``. Time spent
        waiting does not count towards ``RUN_TIMEOUT``.

        A stop (or a shutdown) while waiting cancels the wait like any other
        ``await`` of the agent (`asyncio.CancelledError`). `ValueError` if
        ``data`` is not a JSON object, or its JSON is over ``MAX_INPUT_BYTES``;
        `RuntimeError` if called without a run (an agent called directly, as
        in its own tests, with no ``on_ask``), from a task other than the
        run's own (one the agent started: its question could outlive the
        run), or while a question is pending."""
        if self.on_ask is None:
            raise RuntimeError("ctx.ask() needs a run: this context has no on_ask.")
        return await self.on_ask(data, timeout)

    def report_usage(self, data: Mapping[str, Any]) -> None:
        """Report usage (``{"input_tokens": ..., "cost": ...}``) without
        yielding it: the same as yielding ``{"event": "usage", "data": data}``,
        but callable where an agent cannot yield, such as a ``finally`` that
        runs when the run is stopped (``aclose()`` raises `GeneratorExit` at
        the agent's ``yield``; a cancellation, `asyncio.CancelledError` at
        its ``await``). The report is checked at once
        (`detached_runs.usage.clean_usage`: a bad one is dropped with a
        warning in the log) and merged into the run's usage; it reaches the
        log, and clients, as a ``usage`` event before the agent's next item,
        or, once the agent has ended, before the run's terminal event.

        Never raises. Without a run (an agent called directly, as in its
        own tests, with no ``on_usage``), it does nothing."""
        if self.on_usage is not None:
            self.on_usage(data)


def load_agent(value: Any = None) -> Agent:
    """The agent ``value`` names (a dotted path, or the callable itself), by
    default ``DETACHED_RUNS["AGENT"]``; `ImproperlyConfigured` if there is
    none or it is not callable."""
    value = value if value is not None else get_config()["AGENT"]
    if value is None:
        raise ImproperlyConfigured("Set DETACHED_RUNS['AGENT'] to the dotted path of your agent.")
    agent = import_string(value) if isinstance(value, str) else value
    if not callable(agent):
        raise ImproperlyConfigured(f"DETACHED_RUNS['AGENT'] = {value!r} is not callable.")
    return agent

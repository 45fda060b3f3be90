"""The agent's side of a run: what an agent is, what it is called with, and
how the app loads the one ``DETACHED_RUNS["AGENT"]`` names.

An agent is an async generator function taking an `AgentContext`; it yields
text (``str``) and events (``{"event": name, "data": {...}}``). Nothing here
imports the service, so an agent module can import these types freely.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
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
    owner key (``"user:<pk>"``, ``"anon:<id>"`` or ``""``) and the run's
    uuid as a string."""

    session_key: str
    prompt: str
    history: tuple[Turn, ...]
    owner: str
    run_id: str


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

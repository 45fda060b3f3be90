"""Agents: the protocol every agent follows, and ready-made agents.

- `detached_runs.agents.base` — `AgentContext`, `Turn`, the `Agent` type and
  `load_agent` (also importable from here and from `detached_runs.runs`).
- `detached_runs.agents.openai` — any OpenAI-compatible chat-completions endpoint
  (``pip install openai``; the package's ``[openai]`` extra, once installed
  from a checkout), an optional dependency so the app itself needs none.
"""

from __future__ import annotations

from .base import Agent, AgentContext, Turn, load_agent

__all__ = ["Agent", "AgentContext", "Turn", "load_agent"]

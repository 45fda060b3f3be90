"""The demo's offline agent: no network, a canned answer streamed word by word
at a realistic pace (``DEMO_AGENT_DELAY`` seconds per word, default 0.06).

With a model named in the environment (``OPENAI_MODEL``, plus ``OPENAI_BASE_URL``
and/or ``OPENAI_API_KEY``) the demo's settings use the app's own
`detached_runs.agents.openai.agent` instead, e.g. against a local Ollama::

    OPENAI_BASE_URL=http://127.0.0.1:11434/v1 OPENAI_MODEL=qwen3:4b ./dev demo
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

ANSWER = """\
You asked: “{prompt}”. This is the offline demo agent, so instead of calling a
model it streams this canned answer, one word at a time, about as fast as a
real model would.

Try the thing this app exists for: reload the page, or close the tab and come
back, while these words are still arriving. The run never stopped — it kept
going on the server, every word went into the run's log, and your browser picked
up exactly where it left off, without a gap and without a repeated word.

Press Stop and the answer so far is saved with the status “stopped”. Send
another message while this one streams, and this run is stopped and saved
before the next one starts.

This session has {turns} earlier {turn_word}; a real agent would send them to
the model as the conversation so far. Every run, finished or not, is in the
Django admin.
"""


def _delay() -> float:
    try:
        return max(0.0, float(os.environ.get("DEMO_AGENT_DELAY", "0.06")))
    except ValueError:
        return 0.06


async def demo_agent(ctx: Any) -> AsyncIterator[str | dict[str, Any]]:
    yield {"event": "status", "data": {"note": "Composing an answer"}}
    turns = len(ctx.history)
    text = ANSWER.format(
        prompt=ctx.prompt[:200], turns=turns, turn_word="turn" if turns == 1 else "turns"
    )
    delay = _delay()
    for paragraph_index, paragraph in enumerate(text.split("\n\n")):
        if paragraph_index:
            yield "\n\n"
        words = paragraph.split()
        for index, word in enumerate(words):
            await asyncio.sleep(delay)
            yield word + (" " if index < len(words) - 1 else "")


async def echo_agent(ctx: Any) -> AsyncIterator[str]:
    """Repeats the prompt word by word with no delay (handy in tests)."""
    words = ctx.prompt.split()
    for index, word in enumerate(words):
        yield word + (" " if index < len(words) - 1 else "")

"""The demo's offline agent: no network, a canned answer streamed word by word
at a realistic pace (``DEMO_AGENT_DELAY`` seconds per word, default 0.06). It
reports its usage as a model would, its words counted as tokens (marked
estimated, no cost), so that runs show usage in the run objects and the admin.

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

from detached_runs.agents.openai import approves
from detached_runs.exceptions import InputTimeout

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


#: What the agent asks, after its first paragraph, when the prompt says "approve".
QUESTION = {"question": "May I go on with the rest of the answer?", "choices": ["yes", "no"]}
#: What it says instead of the rest when the answer is not "yes", or none came.
DECLINED = "As you wish: I stop here."
TIMED_OUT = "Nobody answered in time: I stop here."


def _delay() -> float:
    try:
        return max(0.0, float(os.environ.get("DEMO_AGENT_DELAY", "0.06")))
    except ValueError:
        return 0.06


async def demo_agent(ctx: Any) -> AsyncIterator[str | dict[str, Any]]:
    """The canned answer, word by word. A prompt with the word "approve" makes
    it ask (``ctx.ask``) whether to go on after its first paragraph: the run
    waits for the answer, which any tab may give, now or after a reload."""
    yield {"event": "status", "data": {"note": "Composing an answer"}}
    ask = "approve" in ctx.prompt.lower()
    turns = len(ctx.history)
    text = ANSWER.format(
        prompt=ctx.prompt[:200], turns=turns, turn_word="turn" if turns == 1 else "turns"
    )
    delay = _delay()
    written = 0
    try:
        for paragraph_index, paragraph in enumerate(text.split("\n\n")):
            if paragraph_index:
                yield "\n\n"
            if paragraph_index == 1 and ask:
                try:
                    answer = await ctx.ask(QUESTION)
                except InputTimeout:
                    answer = None
                if not approves(answer):  # "yes", or the AI SDK's {"approved": true}
                    yield TIMED_OUT if answer is None else DECLINED
                    break
            words = paragraph.split()
            for index, word in enumerate(words):
                await asyncio.sleep(delay)
                written += 1
                yield word + (" " if index < len(words) - 1 else "")
    except BaseException:
        # Stopped (cancelled at its sleep, or closed at a yield), where an
        # agent cannot yield: report what it wrote until then.
        ctx.report_usage(_usage(ctx.prompt, written))
        raise
    yield {"event": "usage", "data": _usage(ctx.prompt, written)}


def _usage(prompt: str, written: int) -> dict[str, Any]:
    """A usage report with words for tokens: an estimate, and no cost."""
    read = len(prompt.split())
    return {
        "input_tokens": read,
        "output_tokens": written,
        "total_tokens": read + written,
        "estimated": True,
    }


async def echo_agent(ctx: Any) -> AsyncIterator[str]:
    """Repeats the prompt word by word with no delay (handy in tests)."""
    words = ctx.prompt.split()
    for index, word in enumerate(words):
        yield word + (" " if index < len(words) - 1 else "")

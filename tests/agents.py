"""Agents the tests run. Real async generators, paced with real sleeps."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator
from typing import Any

from detached_runs.exceptions import AgentError, InputTimeout

#: Seconds between words of `words` (the e2e server reads it from its environment).
DELAY = float(os.environ.get("TEST_AGENT_DELAY", "0.01"))


#: A prompt that starts with this is a script for `words`: what to yield.
SCRIPT = "script:"


def numbered(count: int) -> list[str]:
    return [f"w{i} " for i in range(count)]


def script(items: list[Any]) -> str:
    """A prompt that makes `words` yield ``items`` (strings and event dicts),
    as they are: lone surrogates, NUL, NaN and all. The prompt itself is ASCII
    (base64 of JSON with escapes), so it survives the prompt's own cleaning.

    Some items are orders instead: ``{"raise": message}`` raises `AgentError`
    there; ``{"report_unless_done": usage}`` makes the agent report
    ``usage`` with ``ctx.report_usage`` in its ``finally`` if the script
    does not run to its end (a stop, a shutdown, an error); ``{"ask": data,
    "timeout": seconds}`` asks ``data`` (``ctx.ask``) and yields ``answer:<the
    value's JSON> ``, or, if the order has ``"catch": true`` and the
    question times out, ``timed out ``."""
    return SCRIPT + base64.b64encode(json.dumps(items).encode()).decode()


async def words(ctx: Any) -> AsyncIterator[str | dict[str, Any]]:
    """Yields ``w0 w1 ...``: as many words as the prompt's first number (default 20);
    for a `script` prompt, the script's items."""
    if ctx.prompt.startswith(SCRIPT):
        report, ended = None, False
        try:
            for item in json.loads(base64.b64decode(ctx.prompt.removeprefix(SCRIPT))):
                await asyncio.sleep(DELAY)
                if isinstance(item, dict) and "raise" in item:
                    raise AgentError(item["raise"])
                if isinstance(item, dict) and "report_unless_done" in item:
                    report = item["report_unless_done"]
                    continue
                if isinstance(item, dict) and "ask" in item:
                    try:
                        value = await ctx.ask(item["ask"], timeout=item.get("timeout"))
                    except InputTimeout:
                        if not item.get("catch"):
                            raise
                        yield "timed out "
                        continue
                    yield f"answer:{json.dumps(value)} "
                    continue
                yield item
            ended = True
        finally:
            if report is not None and not ended:
                ctx.report_usage(report)
        return
    if ctx.prompt.startswith("big "):
        # That many MiB of text, multibyte characters and all, as fast as it goes.
        piece = "añ€😀 " * 4096  # 49,152 bytes
        for _ in range(int(ctx.prompt.split()[1]) * 1024 * 1024 // len(piece.encode())):
            await asyncio.sleep(0)
            yield piece
        return
    if ctx.prompt == "stubborn":
        # Swallows every cancellation and never yields again (for 20 s, so
        # that the test server can still shut down in the end).
        yield "stubborn "
        deadline = asyncio.get_running_loop().time() + 20
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                await asyncio.sleep(left)
            except asyncio.CancelledError:
                pass
        return
    if ctx.prompt == "linger":
        # Takes 2 s to clean up when stopped: a shutdown waits that long.
        try:
            yield "lingering "
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(2)
        return
    if ctx.prompt == "context":
        # What the agent was handed besides the prompt.
        user = getattr(ctx.user, "username", None)
        yield {"event": "context", "data": {"options": ctx.options, "user": user}}
        yield "ok"
        return
    if ctx.prompt == "slow":
        await asyncio.sleep(0.5)
        yield "finally "
        await asyncio.sleep(10)
        return
    first = ctx.prompt.split()[0]
    count = int(first) if first.isdigit() else 20
    for word in numbered(count):
        await asyncio.sleep(DELAY)
        yield word


async def failing(ctx: Any) -> AsyncIterator[str]:
    yield "partial "
    await asyncio.sleep(0)
    raise AgentError("the model is overloaded")


def same_team(requester: str, run_owner: str, session_key: str) -> bool:
    """A PERMISSION hook for the tests: users 1 and 2 are one team."""
    team = {"user:1", "user:2"}
    return requester == run_owner or (requester in team and run_owner in team)


async def forever(ctx: Any) -> AsyncIterator[str]:
    """Says ``thinking`` and then nothing for 30 s: a run in flight until stopped."""
    yield "thinking "
    await asyncio.sleep(30)


async def validate_options(options: dict[str, Any], owner: str) -> dict[str, Any]:
    """A VALIDATE_OPTIONS hook for the tests: refuses the model "forbidden",
    and drops the key "secret" (a project's hook cleans as well as checks)."""
    from django.core.exceptions import ValidationError

    if options.get("model") == "forbidden":
        raise ValidationError("You may not use the model %(model)s.", params=options)
    return {key: value for key, value in options.items() if key != "secret"}

# mysite/agents.py: stands for your model. Yield the answer piece by piece.
import asyncio
from collections.abc import AsyncIterator

from detached_runs.agents import AgentContext


async def agent(ctx: AgentContext) -> AsyncIterator[str]:
    # Also ctx.session_key, ctx.owner, ctx.run_id, and ctx.history: the
    # session's earlier turns (.prompt, .output, .status), oldest first.
    for word in f"You asked: {ctx.prompt}".split():
        await asyncio.sleep(0.05)  # a model's next token
        yield word + " "

"""An agent for any OpenAI-compatible chat-completions endpoint: OpenAI itself,
vLLM, Ollama, llama.cpp, LM Studio, OpenRouter, DeepSeek...

Install the openai package (``pip install openai``, or the package's ``[openai]``
extra, once installed from a checkout: ``pip install -e 'path/to/checkout[openai]'``)
and point the setting at it::

    DETACHED_RUNS = {
        "AGENT": "detached_runs.agents.openai.agent",
        "OPENAI": {"BASE_URL": "http://127.0.0.1:8001/v1", "MODEL": "qwen3-8b"},
    }

Each key of ``DETACHED_RUNS["OPENAI"]`` falls back to the environment
(``OPENAI_BASE_URL``, ``OPENAI_API_KEY``, ``OPENAI_MODEL``); `OpenAIAgent`
takes the same keys as keyword arguments, for a second agent or a subclass.

What it yields: the answer's text as ``str`` deltas; ``{"event": "reasoning",
"data": {"text": ...}}`` for the model's thinking (``delta.reasoning_content``
or ``delta.reasoning``, merged over up to `REASONING_EVERY` seconds); and one
``{"event": "tool_call", "data": {"index", "id", "type", "name",
"arguments"}}`` per complete tool call (``arguments`` is the JSON text the
model wrote); and a ``{"event": "usage", "data": {...}}`` before the run
ends (see "Usage" below). Errors of the endpoint end the run with an
`AgentError` whose message names the problem but never the key.

Tools. The tools of ``TOOLS`` (`Tool`) are sent with the request; when the
model's answer ends with calls of them, each call is run in turn
(`OpenAIAgent._use_tool`): a tool with ``approval`` (the default) only if the
user says yes to ``ctx.ask({"kind": "tool_approval", ...})`` (`approves`
says what a yes is; no answer in time is a no); its function is called as
``function(ctx, **arguments)``, awaited if async, else on the database thread
(`detached_runs.db.run_sync`). Each call ends with a ``{"event":
"tool_result", "data": {"id", "name", "ok", "declined"}}``, and its result,
or why it did not run (unknown tool, arguments that are not a JSON object or
do not fit the function, a no, a `ToolError`'s message, a failure), goes to
the model as the tool's message; then the endpoint is asked again, with the
calls and their results, and its answer streams on (a paragraph apart). A
model still calling tools after ``MAX_TOOL_ROUNDS`` rounds is not run again:
the run ends ``done`` with ``{"event": "finish", "data": {"reason":
"max_tool_rounds"}}``. Tool calls are only told (not run) when ``TOOLS`` is
empty, as for tools passed in ``PARAMS["tools"]``.

How the answer ends, all decided in `_ending` (the text streamed before an
error is kept, as for any agent):

- the model's ``finish_reason`` ``stop``, ``tool_calls`` (or the legacy
  ``function_call``): the run is ``done``;
- any other ``finish_reason`` (``length``: it hit ``max_tokens``;
  ``content_filter``: the endpoint withheld the rest; a server's own reason):
  ``done`` too, the model ended its answer, but not as a whole one: the last
  event before ``done`` is ``{"event": "finish", "data": {"reason": ...}}``;
- ``finish_reason`` ``error`` (OpenRouter's for a generation that failed):
  `AgentError`, as an error object in the stream is;
- no ``finish_reason`` when the stream ends, even if it ends cleanly and with
  ``data: [DONE]``: the answer was cut short, `AgentError` `CUT_OFF`;
- the connection lost after the endpoint answered (a reset, a body cut
  short): `LOST`; nothing received for ``TIMEOUT`` seconds in the middle of the
  answer: `STALLED`; either after the ``finish_reason`` loses nothing of the
  answer, so the run is ``done``;
- no answer at all (refused, dropped, or no response in time): the messages
  of `_describe` ("Could not connect...", "...did not answer in time.").

Reasoning still held when the answer ends in an error is yielded; a tool call
whose ``finish_reason`` never came is not (its arguments may be half written).

Usage. The request asks the endpoint to send its usage in the stream
(``stream_options={"include_usage": true}``: a last chunk with no choices;
``"PARAMS": {"stream_options": None}`` leaves it out, for a server that
refuses it). Once the endpoint has answered, the run reports a usage event,
whatever the end (`_usage_of`); with tools, one after each request, each the
sum of the run's requests so far (`_Tally`), which replaces the last:
``input_tokens``, ``output_tokens`` and ``total_tokens`` (from
``prompt_tokens``, ``completion_tokens`` and ``total_tokens``),
``cached_input_tokens`` and ``reasoning_tokens`` when the endpoint gives
them, the ``model`` that answered last, and ``cost`` when ``PRICES`` names
the model. If the endpoint never said (the run was stopped first, the
connection was lost, or the server ignores ``include_usage``), a request's
counts are an estimate, and the sum is marked ``"estimated": true``: a token per four
characters (`detached_runs.usage.estimate_tokens`) of the messages sent and
of what the model wrote so far (text, reasoning, tool calls). A run stopped
once the request was sent cannot yield any more: it reports that estimate
with ``ctx.report_usage`` as it unwinds (the endpoint may have processed and
billed the prompt). A request the endpoint refused (an error status, no
connection) reports none.

Options. A run's ``ctx.options`` may set the model and sampling parameters
(`OPTIONS`), only those the project allows in ``ALLOWED_OPTIONS`` (none by
default: clients pick nothing that costs money or changes answers unless the
project says so), each checked (`OpenAIAgent.with_options`). An option the
project did not allow is ignored (``ctx.options`` may carry options meant for
something else); an allowed one with a bad value ends the run as ``error``
with a message that says what it must be. Refusing a request at once, with a
400, is the project's ``VALIDATE_OPTIONS`` hook's job.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ImproperlyConfigured
from django.core.serializers.json import DjangoJSONEncoder
from django.utils.module_loading import import_string

from ..conf import get_config
from ..db import run_sync
from ..exceptions import AgentError, InputTimeout
from ..usage import MAX_COUNT, estimate_tokens

logger = logging.getLogger(__name__)


class MissingDependency(ImproperlyConfigured, ImportError):
    """An optional package is not installed. An `ImportError` too, so that
    ``manage.py check`` reports it as an agent that does not import."""


try:
    import openai
except ImportError as exc:
    raise MissingDependency(
        "detached_runs.agents.openai needs the openai package: pip install openai (or the "
        "package's [openai] extra, once installed from a checkout: "
        "pip install -e 'path/to/checkout[openai]')"
    ) from exc

if TYPE_CHECKING:
    from openai.types import CompletionUsage
    from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam
    from openai.types.chat.chat_completion_chunk import ChoiceDeltaToolCall

    from .base import AgentContext

__all__ = [
    "KEYS",
    "OPTIONS",
    "MissingDependency",
    "OpenAIAgent",
    "OpenAIConfig",
    "Tool",
    "ToolError",
    "agent",
    "approves",
]

#: The keys of ``DETACHED_RUNS["OPENAI"]`` (lower-cased: `OpenAIAgent`'s keyword arguments).
KEYS = (
    "BASE_URL",
    "API_KEY",
    "MODEL",
    "SYSTEM_PROMPT",
    "TEMPERATURE",
    "PARAMS",
    "MAX_RETRIES",
    "TIMEOUT",
    "ALLOWED_OPTIONS",
    "PRICES",
    "TOOLS",
    "MAX_TOOL_ROUNDS",
)
#: Where requests go when only an API key is configured.
OPENAI_URL = "https://api.openai.com/v1"
#: The key sent to an endpoint configured without one: local servers (vLLM,
#: Ollama, llama.cpp) ignore it, but the client insists on some key.
NO_KEY = "EMPTY"
#: Seconds of reasoning text merged into one event: a long chain of thought is
#: a few events in the log, not one per token (only text deltas merge on replay).
REASONING_EVERY = 0.25
#: Attempts after the first on a connection error, 408, 409, 429 or 5xx (the
#: client's own back-off, which honours ``Retry-After``).
DEFAULT_MAX_RETRIES = 2
_RESERVED_PARAMS = frozenset({"model", "messages", "stream"})
#: Finish reasons of a whole answer; any other is told to clients as a
#: ``finish`` event (``length``, ``content_filter``...).
COMPLETE_REASONS = frozenset({"stop", "tool_calls", "function_call"})
#: The run's error when the stream ended without the model's finish_reason.
CUT_OFF = "The model's answer was cut off."
#: ... when the connection broke after the endpoint began to answer.
LOST = "The connection to the model endpoint was lost mid-answer."
#: ... when the endpoint sent nothing for TIMEOUT seconds in the middle of the answer.
STALLED = "The model endpoint stopped sending mid-answer (timed out)."
#: Rounds of tool calls run in one answer by default (``MAX_TOOL_ROUNDS``): a
#: model that keeps calling tools is stopped there, not left to loop.
DEFAULT_MAX_TOOL_ROUNDS = 8
#: The keys of a tool's entry in ``TOOLS``.
TOOL_KEYS = frozenset({"function", "description", "parameters", "approval"})
#: What the endpoints accept as a function's name (OpenAI's rule).
_TOOL_NAME_RE = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")
#: The ``finish`` reason told to clients when the model still called tools
#: after ``MAX_TOOL_ROUNDS`` rounds of them (those calls are not run).
MAX_TOOL_ROUNDS_REASON = "max_tool_rounds"
#: What the model is told, as the tool's result, when a call was not run.
DECLINED = "The user declined this call: it was not run."
NO_ANSWER = "The user did not answer in time: the call was not run."
TOO_LARGE_TO_ASK = (
    "The arguments are too large to show the user for approval: the call was not run."
)
#: A tool's result that is not a string goes to the model as this JSON
#: (dates, decimals and UUIDs as Django's serializers write them).
_RESULT_ENCODER = DjangoJSONEncoder(ensure_ascii=False)


class ToolError(Exception):
    """Raise it in a tool to tell the model why it failed: its message goes to
    the model as the tool's result, and the run goes on. Any other exception
    of a tool is logged and the model only learns that the tool failed (its
    message may hold what neither the model nor the user should see)."""


@dataclass(frozen=True, slots=True)
class Tool:
    """A tool of ``TOOLS``, checked: the model may call it by `name`; the
    agent calls `function` with the run's context and the arguments
    (``function(ctx, **arguments)``), after asking the user if `approval`."""

    name: str
    function: Callable[..., Any]
    description: str = ""
    #: The JSON schema of the arguments object, as sent to the model.
    parameters: Mapping[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )
    #: Ask the user before each call (``ctx.ask``); the default.
    approval: bool = True

    def definition(self) -> dict[str, Any]:
        """The tool as the request's ``tools`` list has it."""
        function: dict[str, Any] = {"name": self.name, "parameters": dict(self.parameters)}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


def _number_in(low: float, high: float) -> Callable[[Any], bool]:
    return lambda value: _is_number(value) and math.isfinite(value) and low <= value <= high


def _whole_in(low: int, high: int) -> Callable[[Any], bool]:
    return lambda value: (
        isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    )


def _short_string(most: int) -> Callable[[Any], bool]:
    return lambda value: (
        isinstance(value, str) and 0 < len(value) <= most and value.strip() == value
    )


#: The options of a run (``ctx.options``) that the agent can take, if the
#: project allows them (``ALLOWED_OPTIONS``): each with the check its value
#: must pass, and what that check asks for (the run's error message says it).
#: ``model`` replaces ``MODEL``, ``temperature`` ``TEMPERATURE``; the others
#: go to the request over ``PARAMS``.
OPTIONS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": (_short_string(200), "a model name (1 to 200 characters)"),
    "temperature": (_number_in(0, 2), "a number from 0 to 2"),
    "top_p": (_number_in(0, 1), "a number from 0 to 1"),
    "max_tokens": (_whole_in(1, 10_000_000), "a whole number from 1 to 10000000"),
    "max_completion_tokens": (_whole_in(1, 10_000_000), "a whole number from 1 to 10000000"),
    "presence_penalty": (_number_in(-2, 2), "a number from -2 to 2"),
    "frequency_penalty": (_number_in(-2, 2), "a number from -2 to 2"),
    "seed": (_whole_in(-(2**63), 2**63 - 1), "a whole number"),
    "reasoning_effort": (_short_string(20), "a word such as 'low', 'medium' or 'high'"),
}
#: The keys of a model's entry in ``PRICES``: what a million tokens cost.
PRICE_KEYS = frozenset({"input", "output", "cached_input"})


@dataclass(frozen=True, slots=True)
class OpenAIConfig:
    """The endpoint settings of one run, resolved and checked (`OpenAIAgent.config`)."""

    base_url: str
    api_key: str = field(repr=False)  # never in a log line or a traceback's repr
    model: str
    system_prompt: str = ""
    temperature: float | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    max_retries: int = DEFAULT_MAX_RETRIES
    timeout: float | None = None
    #: The options a run may set (`OPTIONS`), each with the values allowed
    #: (None: any value that passes the option's check).
    allowed_options: Mapping[str, tuple[Any, ...] | None] = field(default_factory=dict)
    #: Model name: what a million tokens cost, ``{"input", "output"}`` and
    #: optionally ``"cached_input"`` (in the project's currency).
    prices: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    #: The tools the agent runs for the model (``TOOLS``), by name.
    tools: Mapping[str, Tool] = field(default_factory=dict)
    #: Rounds of tool calls run in one answer at most (``MAX_TOOL_ROUNDS``).
    max_tool_rounds: int = DEFAULT_MAX_TOOL_ROUNDS


class OpenAIAgent:
    """``agent(ctx)`` streaming from an OpenAI-compatible endpoint.

    Keyword arguments (``model=``, ``system_prompt=``...) override
    ``DETACHED_RUNS["OPENAI"]``, which is read at each run, so a test's
    ``settings`` override applies. Subclasses may change `messages` (what is
    sent) or `client` (how the client is built; the agent closes it).
    """

    def __init__(self, **options: Any) -> None:
        unknown = sorted(name for name in options if name.upper() not in KEYS)
        if unknown:
            raise TypeError(
                f"OpenAIAgent() got unknown options: {', '.join(unknown)}; "
                f"known: {', '.join(k.lower() for k in KEYS)}."
            )
        self._options = {name.upper(): value for name, value in options.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(k.lower() for k in self._options)})"

    def config(self) -> OpenAIConfig:
        """The settings for a run: this agent's options, then ``DETACHED_RUNS["OPENAI"]``,
        then the environment. Raises `ImproperlyConfigured` saying what is missing."""
        configured = get_config().get("OPENAI") or {}
        if not isinstance(configured, Mapping):
            raise ImproperlyConfigured(
                "DETACHED_RUNS['OPENAI'] must be a dict, e.g. {'BASE_URL': ..., 'MODEL': ...}."
            )
        unknown = sorted(str(key) for key in configured if key not in KEYS)
        if unknown:
            raise ImproperlyConfigured(
                f"DETACHED_RUNS['OPENAI'] has unknown keys: {', '.join(unknown)} "
                f"(known: {', '.join(KEYS)})."
            )
        values = {**configured, **self._options}

        def value(key: str, env: str | None = None) -> Any:
            found = values.get(key)
            if (found is None or found == "") and env:
                found = os.environ.get(env) or None
            return found

        base_url = value("BASE_URL", "OPENAI_BASE_URL")
        api_key = value("API_KEY", "OPENAI_API_KEY")
        model = value("MODEL", "OPENAI_MODEL")
        if not model:
            raise ImproperlyConfigured(
                "The OpenAI agent has no model: set DETACHED_RUNS['OPENAI']['MODEL'] "
                "or the OPENAI_MODEL environment variable."
            )
        if not base_url and not api_key:
            raise ImproperlyConfigured(
                "The OpenAI agent has no endpoint: set DETACHED_RUNS['OPENAI']['BASE_URL'] "
                "(or OPENAI_BASE_URL) for a local or compatible server, or "
                "DETACHED_RUNS['OPENAI']['API_KEY'] (or OPENAI_API_KEY) for api.openai.com."
            )
        base_url = base_url or OPENAI_URL
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ImproperlyConfigured(
                f"The OpenAI agent's BASE_URL must be an http(s) URL, not {base_url!r}."
            )
        if not isinstance(model, str):
            raise ImproperlyConfigured(f"The OpenAI agent's MODEL must be a string, not {model!r}.")
        if api_key is not None and not isinstance(api_key, str):
            raise ImproperlyConfigured("The OpenAI agent's API_KEY must be a string.")
        system_prompt = value("SYSTEM_PROMPT") or ""
        if not isinstance(system_prompt, str):
            raise ImproperlyConfigured("The OpenAI agent's SYSTEM_PROMPT must be a string.")
        temperature = value("TEMPERATURE")
        if temperature is not None and not _is_number(temperature):
            raise ImproperlyConfigured(
                f"The OpenAI agent's TEMPERATURE must be a number, not {temperature!r}."
            )
        params = value("PARAMS") or {}
        if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
            raise ImproperlyConfigured(
                "The OpenAI agent's PARAMS must be a dict of keyword arguments for "
                "chat.completions.create(), e.g. {'max_tokens': 1024, 'extra_body': {...}}."
            )
        reserved = sorted(_RESERVED_PARAMS & set(params))
        if reserved:
            raise ImproperlyConfigured(
                f"The OpenAI agent sets {', '.join(reserved)} itself: remove it from PARAMS."
            )
        max_retries = value("MAX_RETRIES")
        max_retries = DEFAULT_MAX_RETRIES if max_retries is None else max_retries
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ImproperlyConfigured(
                f"The OpenAI agent's MAX_RETRIES must be an integer >= 0, not {max_retries!r}."
            )
        timeout = value("TIMEOUT")
        if timeout is not None and (not _is_number(timeout) or timeout <= 0):
            raise ImproperlyConfigured(
                f"The OpenAI agent's TIMEOUT must be a number of seconds > 0, not {timeout!r}."
            )
        tools = _tools(value("TOOLS"))
        if tools and "tools" in params:
            raise ImproperlyConfigured(
                "The OpenAI agent sends the tools of TOOLS itself: remove 'tools' from PARAMS."
            )
        max_tool_rounds = value("MAX_TOOL_ROUNDS")
        max_tool_rounds = DEFAULT_MAX_TOOL_ROUNDS if max_tool_rounds is None else max_tool_rounds
        if (
            isinstance(max_tool_rounds, bool)
            or not isinstance(max_tool_rounds, int)
            or max_tool_rounds < 1
        ):
            raise ImproperlyConfigured(
                "The OpenAI agent's MAX_TOOL_ROUNDS must be an integer >= 1, "
                f"not {max_tool_rounds!r}."
            )
        return OpenAIConfig(
            base_url=base_url,
            api_key=api_key or NO_KEY,
            model=model,
            system_prompt=system_prompt,
            temperature=None if temperature is None else float(temperature),
            params=dict(params),
            max_retries=max_retries,
            timeout=None if timeout is None else float(timeout),
            allowed_options=_allowed_options(value("ALLOWED_OPTIONS")),
            prices=_prices(value("PRICES")),
            tools=tools,
            max_tool_rounds=max_tool_rounds,
        )

    def with_options(self, ctx: AgentContext, config: OpenAIConfig) -> OpenAIConfig:
        """``config`` with the run's options (``ctx.options``) that the project
        allows (``ALLOWED_OPTIONS``) applied: ``model`` and ``temperature``
        replace the configured ones, the others go into ``params``. Options
        not allowed are ignored. Raises `AgentError` for an allowed option
        whose value fails its check (`OPTIONS`) or is not one of the values
        the project allows for it."""
        model, temperature = config.model, config.temperature
        params = dict(config.params)
        for name, allowed in config.allowed_options.items():
            if name not in ctx.options:
                continue
            value = ctx.options[name]
            check, wanted = OPTIONS[name]
            if not check(value):
                raise AgentError(f"The option {name!r} must be {wanted}.")
            if allowed is not None and value not in allowed:
                choices = ", ".join(repr(choice) for choice in allowed)
                raise AgentError(f"The option {name!r} must be one of {choices}.")
            if name == "model":
                model = value
            elif name == "temperature":
                temperature = float(value)
            else:
                params[name] = value
        return dataclasses.replace(config, model=model, temperature=temperature, params=params)

    def messages(self, ctx: AgentContext, config: OpenAIConfig) -> list[ChatCompletionMessageParam]:
        """The system prompt, the session's earlier turns (oldest first), the prompt.

        A turn without an answer (it failed or was stopped before the first
        word) is left out, question and all: roles keep alternating, which some
        chat templates require. A partial answer is sent as it was saved.
        """
        messages: list[ChatCompletionMessageParam] = []
        if config.system_prompt:
            messages.append({"role": "system", "content": config.system_prompt})
        for turn in ctx.history:
            if not turn.output.strip():
                continue
            messages.append({"role": "user", "content": turn.prompt})
            messages.append({"role": "assistant", "content": turn.output})
        messages.append({"role": "user", "content": ctx.prompt})
        return messages

    def client(self, config: OpenAIConfig) -> openai.AsyncOpenAI:
        """A new client for one run (the agent closes it when the run ends)."""
        options: dict[str, Any] = {}
        if config.timeout is not None:
            options["timeout"] = config.timeout
        return openai.AsyncOpenAI(
            base_url=config.base_url,
            api_key=config.api_key,
            max_retries=config.max_retries,
            **options,
        )

    async def __call__(self, ctx: AgentContext) -> AsyncIterator[str | dict[str, Any]]:
        try:
            config = self.config()
        except ImproperlyConfigured as exc:
            # The details are in the log (the run's traceback), not in front of users.
            raise AgentError("The model endpoint is not configured on the server.") from exc
        config = self.with_options(ctx, config)
        params = dict(config.params)
        if config.temperature is not None:
            params["temperature"] = config.temperature
        params.setdefault("stream_options", {"include_usage": True})
        if params["stream_options"] is None:
            del params["stream_options"]  # "PARAMS": {"stream_options": None}: not sent
        if config.tools:
            params["tools"] = [tool.definition() for tool in config.tools.values()]
        messages = self.messages(ctx, config)
        tally = _Tally()
        # The request sent whose usage is not reported yet: the endpoint may
        # bill its prompt even if the run is stopped before it answers.
        unreported: _Translator | None = None
        error: str | None = None
        failure: openai.OpenAIError | None = None
        wrote_text = False
        try:
            # Both context managers release the HTTP connection whatever ends
            # the run: the end of the answer, an error, or a stop (the run's
            # CancelledError at an await, or aclose() at a yield).
            async with self.client(config) as client:
                for round_number in range(config.max_tool_rounds + 1):
                    translator = _Translator()
                    # Text of a later round is a paragraph of its own.
                    separate = wrote_text
                    answering = False  # the endpoint answered 200: its stream has begun
                    failure = None
                    unreported = translator
                    try:
                        stream = await client.chat.completions.create(
                            model=config.model, messages=messages, stream=True, **params
                        )
                        answering = True
                        async with stream:
                            async for chunk in stream:
                                for item in translator.feed(chunk):
                                    if isinstance(item, str):
                                        if separate:
                                            separate = False
                                            yield "\n\n"
                                        wrote_text = True
                                    yield item
                    except openai.OpenAIError as exc:
                        failure = exc
                    error, finish = _ending(translator.finish_reason, failure, answering, config)
                    for item in translator.finish(complete=error is None):
                        yield item
                    unreported = None  # a refused request reports none
                    if answering:
                        # The run's usage so far: a later report replaces it.
                        tally.add(translator, messages, config)
                        yield {"event": "usage", "data": _usage_of(config, tally)}
                    if finish is not None:
                        yield finish
                    if error is not None or finish is not None:
                        break
                    if not config.tools or not translator.calls:
                        break
                    if round_number == config.max_tool_rounds:
                        yield {"event": "finish", "data": {"reason": MAX_TOOL_ROUNDS_REASON}}
                        break
                    calls = [
                        (call["id"] or f"call_{round_number}_{call['index']}", call)
                        for call in translator.calls
                    ]
                    messages.append(_assistant_message(translator, calls))
                    for call_id, call in calls:
                        content, result = await self._use_tool(
                            ctx, config, call_id, call["name"], call["arguments"]
                        )
                        messages.append(
                            {"role": "tool", "tool_call_id": call_id, "content": content}
                        )
                        yield {"event": "tool_result", "data": result}
        except BaseException:
            # Stopped: CancelledError at an await, or GeneratorExit at a yield
            # (aclose). The agent may not yield any more: the usage so far
            # goes to the run through the context.
            if unreported is not None:
                tally.add(unreported, messages, config)
                ctx.report_usage(_usage_of(config, tally))
            raise
        if error is not None:
            raise AgentError(error) from failure

    async def _use_tool(
        self, ctx: AgentContext, config: OpenAIConfig, call_id: str, name: str, arguments: str
    ) -> tuple[str, dict[str, Any]]:
        """Run one tool call of the model, asking the user first if its tool
        needs approval. Returns the tool message's content (what the model is
        told) and the ``tool_result`` event's data. A call that cannot or may
        not run is told to the model, never raised: the run goes on."""
        result = {"id": call_id, "name": name, "ok": False, "declined": False}
        tool = config.tools.get(name)
        if tool is None:
            known = ", ".join(config.tools)
            return f"There is no tool named {name!r}: the tools are {known}.", result
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            return f"The arguments are not valid JSON ({exc}): the call was not run.", result
        if not isinstance(parsed, dict):
            return "The arguments must be a JSON object: the call was not run.", result
        misfit = _misfit(tool, ctx, parsed)
        if misfit is not None:
            return f"The arguments do not fit {name}: {misfit}; the call was not run.", result
        if tool.approval:
            question = {
                "kind": "tool_approval",
                "question": f"Run the tool {name}?",
                "tool": name,
                "arguments": parsed,
                "tool_call_id": call_id,
                "choices": ["yes", "no"],
            }
            try:
                answer = await ctx.ask(question)
            except InputTimeout:
                return NO_ANSWER, {**result, "declined": True}
            except ValueError:  # over MAX_INPUT_BYTES: the user cannot be asked
                return TOO_LARGE_TO_ASK, result
            if not approves(answer):
                return DECLINED, {**result, "declined": True}
        try:
            if _is_async(tool.function):
                value = await tool.function(ctx, **parsed)
            else:
                # On the app's database thread, as Django runs sync code from
                # async code: a tool may query the database (keep it short:
                # a slow one holds up the app's saves; make it async def).
                value = await run_sync(tool.function, ctx, **parsed)
            content = value if isinstance(value, str) else _RESULT_ENCODER.encode(value)
        except ToolError as exc:
            return f"The tool {name} failed: {exc}", result
        except Exception:
            logger.exception("Run %s: the tool %s failed", ctx.run_id, name)
            return f"The tool {name} failed.", result
        return content, {**result, "ok": True}


#: The agent for ``DETACHED_RUNS["AGENT"] = "detached_runs.agents.openai.agent"``.
agent = OpenAIAgent()


class _Translator:
    """Chunks of a streamed chat completion to what the agent yields: text
    deltas at once, reasoning merged over `REASONING_EVERY` seconds, each tool
    call once it is complete (its arguments arrive in pieces)."""

    def __init__(self) -> None:
        self._reasoning: list[str] = []
        self._reasoning_since = 0.0
        self._tool_calls: dict[int, dict[str, Any]] = {}
        #: The first choice's finish_reason, once the model gave it.
        self.finish_reason: str | None = None
        #: The endpoint's usage (its last, if it sent several), and the model
        #: its chunks named.
        self.usage: CompletionUsage | None = None
        self.model: str | None = None
        #: Characters the model wrote so far: text, reasoning, tool calls.
        self.chars = 0
        #: The answer's text (``delta.content``), for the assistant message
        #: sent back with the results of its tool calls.
        self.text: list[str] = []
        #: The complete tool calls, as their ``tool_call`` events' data.
        self.calls: list[dict[str, Any]] = []

    def feed(self, chunk: ChatCompletionChunk) -> list[str | dict[str, Any]]:
        items: list[str | dict[str, Any]] = []
        if chunk.usage is not None:
            self.usage = chunk.usage
        if isinstance(chunk.model, str) and chunk.model:
            self.model = chunk.model
        for choice in chunk.choices or ():
            if choice.index not in (0, None):
                continue  # n > 1: only the first choice is the answer
            delta = choice.delta
            if delta is None:
                continue
            reasoning = _reasoning_of(delta)
            if reasoning:
                self.chars += len(reasoning)
                if not self._reasoning:
                    self._reasoning_since = time.monotonic()
                self._reasoning.append(reasoning)
            if (
                delta.content
                or delta.refusal
                or delta.tool_calls
                or choice.finish_reason
                or time.monotonic() - self._reasoning_since >= REASONING_EVERY
            ):
                items.extend(self._flush_reasoning())
            for call in delta.tool_calls or ():
                self._merge(call)
            for text in (delta.content, delta.refusal):
                if isinstance(text, str) and text:
                    self.chars += len(text)
                    items.append(text)
            if isinstance(delta.content, str) and delta.content:
                self.text.append(delta.content)
            if choice.finish_reason:
                self.finish_reason = self.finish_reason or str(choice.finish_reason)
                items.extend(self._flush_tool_calls())
        return items

    def finish(self, complete: bool) -> list[str | dict[str, Any]]:
        """What is still held when the stream ends: the reasoning, and the tool
        calls only if the answer is `complete` (else they may be half written)."""
        return [*self._flush_reasoning(), *(self._flush_tool_calls() if complete else ())]

    def _flush_reasoning(self) -> list[str | dict[str, Any]]:
        if not self._reasoning:
            return []
        text, self._reasoning = "".join(self._reasoning), []
        return [{"event": "reasoning", "data": {"text": text}}]

    def _flush_tool_calls(self) -> list[str | dict[str, Any]]:
        calls, self._tool_calls = self._tool_calls, {}
        complete = [calls[index] for index in sorted(calls)]
        self.calls.extend(complete)
        return [{"event": "tool_call", "data": dict(call)} for call in complete]

    def _merge(self, call: ChoiceDeltaToolCall) -> None:
        index = call.index
        if not isinstance(index, int):
            # Some servers omit the index: a new id is a new call.
            last = max(self._tool_calls, default=-1)
            new = last < 0 or (call.id and call.id != self._tool_calls[last]["id"])
            index = last + 1 if new else last
        entry = self._tool_calls.setdefault(
            index, {"index": index, "id": None, "type": "function", "name": "", "arguments": ""}
        )
        if call.id:
            entry["id"] = call.id
        if call.type:
            entry["type"] = call.type
        if call.function is not None:
            if call.function.name:
                entry["name"] = call.function.name
                self.chars += len(call.function.name)
            if call.function.arguments:
                entry["arguments"] += call.function.arguments
                self.chars += len(call.function.arguments)


def _reasoning_of(delta: Any) -> str | None:
    """The thinking text of a delta, under either name servers use for it
    (``reasoning_content``: DeepSeek, older vLLM; ``reasoning``: OpenRouter,
    Ollama, newer vLLM). Both are extra fields to the client's types."""
    for name in ("reasoning_content", "reasoning"):
        text = getattr(delta, name, None)
        if isinstance(text, str) and text:
            return text
    return None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _count(value: object) -> int | None:
    """A token count the endpoint sent, if it is one (servers differ)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT:
        return value
    return None


@dataclass(slots=True)
class _Tally:
    """The usage of a run's requests (one per round of tool calls), summed."""

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    cached_input_tokens: int | None = None
    reasoning_tokens: int | None = None
    #: Whether any request's counts are an estimate.
    estimated: bool = False
    #: The model that answered the last request, as the endpoint names it.
    model: str = ""

    def add(
        self,
        translator: _Translator,
        messages: list[ChatCompletionMessageParam],
        config: OpenAIConfig,
    ) -> None:
        """Add one request's usage: the endpoint's counts if it sent them, else
        an estimate (see the module docstring)."""
        reported = translator.usage
        self.model = translator.model or config.model
        input_tokens = output_tokens = total = None
        cached = reasoning = None
        if reported is not None:
            input_tokens = _count(reported.prompt_tokens)
            output_tokens = _count(reported.completion_tokens)
            total = _count(reported.total_tokens)
            if reported.prompt_tokens_details is not None:
                cached = _count(reported.prompt_tokens_details.cached_tokens)
            if reported.completion_tokens_details is not None:
                reasoning = _count(reported.completion_tokens_details.reasoning_tokens)
        if input_tokens is None or output_tokens is None:
            # What was sent: every message's text (role and format tokens are not counted).
            sent = 0
            for message in messages:
                content = message.get("content")
                sent += len(content) if isinstance(content, str) else 0
            input_tokens, output_tokens = estimate_tokens(sent), estimate_tokens(translator.chars)
            total, cached, reasoning = None, None, None
            self.estimated = True
        self.input_tokens = min(self.input_tokens + input_tokens, MAX_COUNT)
        self.output_tokens = min(self.output_tokens + output_tokens, MAX_COUNT)
        total = total if total is not None else input_tokens + output_tokens
        self.total_tokens = min(self.total_tokens + total, MAX_COUNT)
        if cached is not None:
            self.cached_input_tokens = min((self.cached_input_tokens or 0) + cached, MAX_COUNT)
        if reasoning is not None:
            self.reasoning_tokens = min((self.reasoning_tokens or 0) + reasoning, MAX_COUNT)


def _usage_of(config: OpenAIConfig, tally: _Tally) -> dict[str, Any]:
    """The run's usage event data, from the usage of its requests so far:
    marked ``"estimated": true`` if any is an estimate, with ``cost`` if
    ``PRICES`` has the model (the configured name first, then the one the
    endpoint answered with)."""
    cached = tally.cached_input_tokens
    usage: dict[str, Any] = {
        "input_tokens": tally.input_tokens,
        "output_tokens": tally.output_tokens,
        "total_tokens": tally.total_tokens,
        **({"cached_input_tokens": cached} if cached is not None else {}),
        **(
            {"reasoning_tokens": tally.reasoning_tokens}
            if tally.reasoning_tokens is not None
            else {}
        ),
        "model": tally.model[:200],
        **({"estimated": True} if tally.estimated else {}),
    }
    price = config.prices.get(config.model) or config.prices.get(tally.model)
    if price is not None:
        input_tokens = tally.input_tokens
        cached_price = price.get("cached_input", price["input"])
        uncached = input_tokens - min(cached or 0, input_tokens)
        cost = (
            uncached * price["input"]
            + min(cached or 0, input_tokens) * cached_price
            + tally.output_tokens * price["output"]
        ) / 1_000_000
        usage["cost"] = round(cost, 10)
    return usage


def approves(answer: Any) -> bool:
    """Whether the user's answer to a tool's approval request is a yes: the
    string ``"yes"`` (in any case, spaces around it ignored), ``true``, or an
    object whose ``"approved"`` is ``true`` (as the AI SDK's tool approval
    answers). Anything else is a no."""
    if isinstance(answer, str):
        return answer.strip().lower() == "yes"
    if isinstance(answer, Mapping):
        return answer.get("approved") is True
    return answer is True


def _assistant_message(
    translator: _Translator, calls: list[tuple[str, dict[str, Any]]]
) -> ChatCompletionMessageParam:
    """The model's answer of one round, to send back with its tool calls' results."""
    tool_calls = []
    for call_id, call in calls:
        arguments = call["arguments"]
        try:
            parsed = json.loads(arguments)
        except (ValueError, RecursionError):
            parsed = None
        if not isinstance(parsed, dict):
            # Some servers parse the arguments of the history's calls (vLLM,
            # for chat templates that want a dict) and refuse the request if
            # they are not JSON: the model learns what was wrong from the
            # tool's message instead.
            arguments = "{}"
        tool_calls.append(
            {
                "id": call_id,
                "type": "function",
                "function": {"name": call["name"], "arguments": arguments},
            }
        )
    text = "".join(translator.text)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": text or None,
        "tool_calls": tool_calls,
    }
    return message  # type: ignore[return-value]


def _is_async(function: Callable[..., Any]) -> bool:
    """Whether calling ``function`` gives a coroutine: an ``async def``, or an
    object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(
        getattr(function, "__call__", None)  # noqa: B004 - the method, not callable()
    )


def _misfit(tool: Tool, ctx: AgentContext, arguments: dict[str, Any]) -> str | None:
    """Why the tool's function cannot be called with ``arguments`` (a missing
    or an unexpected one), or None if it can (or its signature is unknown)."""
    try:
        signature = inspect.signature(tool.function)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(ctx, **arguments)
    except TypeError as exc:
        return str(exc)
    return None


def _tools(value: Any) -> dict[str, Tool]:
    """``TOOLS`` checked: tool names to ``{"function": <a dotted path or a
    callable>, "description": str, "parameters": <JSON schema>, "approval":
    bool}`` (only ``function`` required), each function imported."""
    if value is None:
        return {}
    shape = (
        "a dict with 'function' (the dotted path of a callable, or the callable) and "
        "optionally 'description' (a string), 'parameters' (the JSON schema of the "
        "arguments, a dict) and 'approval' (True or False)"
    )
    if not isinstance(value, Mapping):
        raise ImproperlyConfigured(
            f"The OpenAI agent's TOOLS must be a dict of tool names to tools, each {shape}."
        )
    tools: dict[str, Tool] = {}
    for name, entry in value.items():
        where = f"The OpenAI agent's TOOLS[{name!r}]"
        if not isinstance(name, str) or not _TOOL_NAME_RE.match(name):
            raise ImproperlyConfigured(
                f"The OpenAI agent's TOOLS has the name {name!r}: a tool's name must be "
                "1 to 64 letters, digits, '_' or '-'."
            )
        if not isinstance(entry, Mapping) or "function" not in entry or set(entry) - TOOL_KEYS:
            raise ImproperlyConfigured(f"{where} must be {shape}, not {entry!r}.")
        function = entry["function"]
        if isinstance(function, str):
            try:
                function = import_string(function)
            except ImportError as exc:
                raise ImproperlyConfigured(
                    f"{where}['function'] = {entry['function']!r} does not import: {exc}"
                ) from exc
        if not callable(function):
            raise ImproperlyConfigured(
                f"{where}['function'] = {entry['function']!r} is not callable."
            )
        description = entry.get("description", "")
        parameters = entry.get("parameters", {"type": "object", "properties": {}})
        approval = entry.get("approval", True)
        if not isinstance(description, str):
            raise ImproperlyConfigured(f"{where}['description'] must be a string.")
        if not isinstance(parameters, Mapping):
            raise ImproperlyConfigured(
                f"{where}['parameters'] must be the JSON schema of the arguments, a dict such as "
                "{'type': 'object', 'properties': {'query': {'type': 'string'}}}."
            )
        if not isinstance(approval, bool):
            raise ImproperlyConfigured(f"{where}['approval'] must be True or False.")
        tools[name] = Tool(name, function, description, dict(parameters), approval)
    return tools


def _allowed_options(value: Any) -> dict[str, tuple[Any, ...] | None]:
    """``ALLOWED_OPTIONS`` checked: a list of option names (`OPTIONS`), or a
    dict of names to the values allowed (a list) or None (any valid value)."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        entries = list(value.items())
    elif isinstance(value, list | tuple | set | frozenset):
        entries = [(name, None) for name in value]
    else:
        entries = [("", None)]  # a string, a number: refused below
    unknown = sorted(repr(name) for name, _ in entries if name not in OPTIONS)
    if unknown or not isinstance(value, Mapping | list | tuple | set | frozenset):
        raise ImproperlyConfigured(
            "The OpenAI agent's ALLOWED_OPTIONS must be a list of option names, or a dict "
            "of option names to the values allowed (or None for any), among "
            f"{', '.join(OPTIONS)}" + (f"; unknown: {', '.join(unknown)}." if unknown else ".")
        )
    allowed: dict[str, tuple[Any, ...] | None] = {}
    for name, values in entries:
        if values is None:
            allowed[name] = None
            continue
        check, wanted = OPTIONS[name]
        if not isinstance(values, list | tuple | set | frozenset) or not values:
            raise ImproperlyConfigured(
                f"The OpenAI agent's ALLOWED_OPTIONS[{name!r}] must be a list of the values "
                "allowed, or None for any."
            )
        bad = [v for v in values if not check(v)]
        if bad:
            raise ImproperlyConfigured(
                f"The OpenAI agent's ALLOWED_OPTIONS[{name!r}] has {bad[0]!r}, "
                f"which is not {wanted}."
            )
        allowed[name] = tuple(values)
    return allowed


def _prices(value: Any) -> dict[str, dict[str, float]]:
    """``PRICES`` checked: model name -> ``{"input": ..., "output": ...}``
    (optionally ``"cached_input"``), numbers >= 0, per million tokens."""
    if value is None:
        return {}
    problem = (
        "The OpenAI agent's PRICES must be a dict of model names to what a million "
        "tokens cost, e.g. {'gpt-4o-mini': {'input': 0.15, 'output': 0.6}} "
        "(optionally 'cached_input' too)"
    )
    if not isinstance(value, Mapping):
        raise ImproperlyConfigured(problem + ".")
    prices: dict[str, dict[str, float]] = {}
    for model, price in value.items():
        if (
            not isinstance(model, str)
            or not isinstance(price, Mapping)
            or not {"input", "output"} <= set(price) <= PRICE_KEYS
            or not all(_number_in(0, MAX_COUNT)(amount) for amount in price.values())
        ):
            raise ImproperlyConfigured(f"{problem}; not {model!r}: {price!r}.")
        prices[model] = {key: float(amount) for key, amount in price.items()}
    return prices


def _ending(
    finish_reason: str | None,
    failure: openai.OpenAIError | None,
    answering: bool,
    config: OpenAIConfig,
) -> tuple[str | None, dict[str, Any] | None]:
    """How the stream ended, the one place that decides it: the run's error
    message (None: the answer ended as the model meant it to) and the
    ``finish`` event to yield (None: none to tell). See the module's docstring.

    `finish_reason` is the model's (None: it never gave one), `failure` what the
    client raised (None: the stream ended cleanly), `answering` whether the
    endpoint had begun to answer (a 200 and its headers) when it failed.
    """
    # APITimeoutError is an APIConnectionError: both are the transport's trouble.
    transport = isinstance(failure, openai.APIConnectionError)
    if finish_reason is not None and (failure is None or transport):
        # The model said it was done: a connection lost after that (before the
        # usage chunk or [DONE]) loses nothing of the answer.
        if finish_reason == "error":
            return "The model endpoint reported an error while answering.", None
        if finish_reason in COMPLETE_REASONS:
            return None, None
        return None, {"event": "finish", "data": {"reason": finish_reason}}
    if failure is None:
        return CUT_OFF, None
    if answering and isinstance(failure, openai.APITimeoutError):
        return STALLED, None
    if answering and transport:
        return LOST, None
    return _describe(failure, config), None


def _describe(exc: openai.OpenAIError, config: OpenAIConfig) -> str:
    """A message for clients: what went wrong and what to do, never the key
    (an endpoint's own message may quote part of it, so it is left out but for
    a 400, where it says what was wrong with the request)."""
    if isinstance(exc, openai.APITimeoutError):
        return "The model endpoint did not answer in time."
    if isinstance(exc, openai.APIConnectionError):
        return "Could not connect to the model endpoint."
    if isinstance(exc, openai.AuthenticationError):
        return "The model endpoint refused the API key (401)."
    if isinstance(exc, openai.PermissionDeniedError):
        return "The model endpoint denied access (403)."
    if isinstance(exc, openai.NotFoundError):
        return f"The model endpoint has no model {config.model!r} (404)."
    if isinstance(exc, openai.RateLimitError):
        return "The model endpoint is over its rate limit or quota (429): try again later."
    if isinstance(exc, openai.BadRequestError):
        detail = _endpoint_message(exc, config)
        return "The model endpoint rejected the request (400)" + (f": {detail}" if detail else ".")
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code >= 500:
            return f"The model endpoint failed ({exc.status_code}): try again later."
        return f"The model endpoint answered with an error ({exc.status_code})."
    if isinstance(exc, openai.APIResponseValidationError):
        return "The model endpoint sent an answer that could not be read."
    if isinstance(exc, openai.APIError):
        return "The model endpoint reported an error while answering."
    return "The model endpoint could not be used."


def _endpoint_message(exc: openai.APIError, config: OpenAIConfig) -> str:
    body = exc.body
    message = body.get("message") if isinstance(body, Mapping) else None
    if not isinstance(message, str):
        return ""
    if config.api_key and config.api_key != NO_KEY:
        message = message.replace(config.api_key, "***")
    message = " ".join(message.split())
    return message[:300] + ("..." if len(message) > 300 else "")

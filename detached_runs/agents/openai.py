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
model wrote). It does not run tools. Errors of the endpoint end the run with an
`AgentError` whose message names the problem but never the key.

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
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ImproperlyConfigured

from ..conf import get_config
from ..exceptions import AgentError


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
    from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam
    from openai.types.chat.chat_completion_chunk import ChoiceDeltaToolCall

    from .base import AgentContext

__all__ = ["KEYS", "MissingDependency", "OpenAIAgent", "OpenAIConfig", "agent"]

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
        return OpenAIConfig(
            base_url=base_url,
            api_key=api_key or NO_KEY,
            model=model,
            system_prompt=system_prompt,
            temperature=None if temperature is None else float(temperature),
            params=dict(params),
            max_retries=max_retries,
            timeout=None if timeout is None else float(timeout),
        )

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
        params = dict(config.params)
        if config.temperature is not None:
            params["temperature"] = config.temperature
        translator = _Translator()
        answering = False  # the endpoint answered 200: its stream has begun
        failure: openai.OpenAIError | None = None
        try:
            # Both context managers release the HTTP connection whatever ends
            # the run: the end of the answer, an error, or a stop (the run's
            # CancelledError at an await, or aclose() at a yield).
            async with self.client(config) as client:
                stream = await client.chat.completions.create(
                    model=config.model,
                    messages=self.messages(ctx, config),
                    stream=True,
                    **params,
                )
                answering = True
                async with stream:
                    async for chunk in stream:
                        for item in translator.feed(chunk):
                            yield item
        except openai.OpenAIError as exc:
            failure = exc
        error, finish = _ending(translator.finish_reason, failure, answering, config)
        for item in translator.finish(complete=error is None):
            yield item
        if finish is not None:
            yield finish
        if error is not None:
            raise AgentError(error) from failure


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

    def feed(self, chunk: ChatCompletionChunk) -> list[str | dict[str, Any]]:
        items: list[str | dict[str, Any]] = []
        for choice in chunk.choices or ():
            if choice.index not in (0, None):
                continue  # n > 1: only the first choice is the answer
            delta = choice.delta
            if delta is None:
                continue
            reasoning = _reasoning_of(delta)
            if reasoning:
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
                    items.append(text)
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
        return [{"event": "tool_call", "data": calls[index]} for index in sorted(calls)]

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
            if call.function.arguments:
                entry["arguments"] += call.function.arguments


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

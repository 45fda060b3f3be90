"""Checks of what a client sends before anything runs: the session key, the
prompt, the options, the multitask policy and an answer to an agent's
question (and the question itself, `validate_question`). They raise the named
exceptions of `detached_runs.exceptions` that the views and the consumer turn
into ``400`` answers."""

from __future__ import annotations

import inspect
import json
import re
from typing import Any

from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.utils.module_loading import import_string

from .conf import MULTITASK_POLICIES, get_config
from .db import run_sync
from .exceptions import BadInput, BadMultitask, BadOptions, BadPrompt, BadSessionKey
from .text import clean_json, clean_text

SESSION_KEY_RE = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")
#: The id of an agent's question (``ctx.ask``): a uuid4's 32 hex digits.
REQUEST_ID_RE = re.compile(r"\A[0-9a-f]{32}\Z")


def validate_session_key(session_key: object) -> str:
    """``session_key`` if it is 1-64 characters of ``[A-Za-z0-9_-]``, else
    `BadSessionKey`."""
    if not isinstance(session_key, str) or not SESSION_KEY_RE.match(session_key):
        raise BadSessionKey("Invalid session key: use 1-64 characters of A-Z, a-z, 0-9, _ and -.")
    return session_key


def validate_prompt(prompt: object) -> str:
    """The prompt, cleaned (`detached_runs.text.clean_text`: NUL and lone
    surrogates become U+FFFD); `BadPrompt` if it is not a string, is empty or
    is longer than ``MAX_PROMPT_CHARS``."""
    if not isinstance(prompt, str):
        raise BadPrompt("The prompt must be a string.")
    prompt = clean_text(prompt)
    if not prompt.strip():
        raise BadPrompt("The prompt is empty.")
    limit = get_config()["MAX_PROMPT_CHARS"]
    if limit is not None and len(prompt) > limit:
        raise BadPrompt(f"The prompt is too long ({len(prompt)} characters; the limit is {limit}).")
    return prompt


def validate_options(options: object) -> dict[str, Any]:
    """``options`` cleaned (`detached_runs.text.clean_json`: NUL and lone
    surrogates in strings and keys become U+FFFD, NaN and infinities None);
    `BadOptions` if it is not a JSON object (a ``dict``) or its JSON is longer
    than ``MAX_OPTIONS_BYTES`` bytes of UTF-8. ``None`` is ``{}``."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise BadOptions('"options" must be a JSON object.')
    return bounded_json(options, int(get_config()["MAX_OPTIONS_BYTES"]), '"options"', BadOptions)


def bounded_json(value: Any, limit: int, name: str, error: type[Exception]) -> Any:
    """``value`` cleaned (`detached_runs.text.clean_json`); ``error`` (with a
    message naming ``name``) if it is not JSON data or its JSON (compact,
    UTF-8) is over ``limit`` bytes. The one bound of JSON a client or an
    agent sends: options, answers, questions."""
    try:
        cleaned = clean_json(value)
        size = len(json.dumps(cleaned, ensure_ascii=False, separators=(",", ":")).encode())
    except (TypeError, ValueError, RecursionError) as exc:
        raise error(f"{name} must be JSON data.") from exc
    if size > limit:
        raise error(f"{name} is too large ({size} bytes of JSON; the limit is {limit}).")
    return cleaned


def validate_answer(payload: object) -> tuple[str, Any]:
    """An answer's body, ``{"request": "<id>", "value": <any JSON>}``, as
    ``(request id, value cleaned)``; `BadInput` if it is not that shape, the
    id is not a request id (32 hex digits), or the value's JSON is over
    ``MAX_INPUT_BYTES``."""
    if not isinstance(payload, dict) or "request" not in payload or "value" not in payload:
        raise BadInput('Send a JSON object: {"request": "<id>", "value": ...}.')
    request = payload["request"]
    if not isinstance(request, str) or not REQUEST_ID_RE.match(request):
        raise BadInput(
            '"request" must be the id of an input_required event (32 lowercase hex digits).'
        )
    limit = int(get_config()["MAX_INPUT_BYTES"])
    return request, bounded_json(payload["value"], limit, '"value"', BadInput)


def validate_question(data: object) -> dict[str, Any]:
    """What an agent asks (``ctx.ask``), cleaned; `ValueError` if it is not a
    JSON object within ``MAX_INPUT_BYTES``, or uses the key ``request``
    (the id the service gives it)."""
    if not isinstance(data, dict):
        raise ValueError(f"ctx.ask() takes a JSON object (a dict), not {type(data).__name__}.")
    if "request" in data:
        raise ValueError('ctx.ask(): "request" is the id the service gives the question.')
    limit = int(get_config()["MAX_INPUT_BYTES"])
    cleaned: dict[str, Any] = bounded_json(data, limit, "ctx.ask()'s data", ValueError)
    return cleaned


async def clean_options(options: object, owner: str) -> dict[str, Any]:
    """`validate_options`, then the project's ``VALIDATE_OPTIONS`` hook:
    ``validate(options, owner) -> dict`` (sync, run on the database thread, or
    async), which may raise `django.core.exceptions.ValidationError` to refuse
    them (its messages become the `BadOptions` message, a ``400``) or return
    the cleaned options (checked again: a JSON object within the bound).
    ``owner`` is the requester's owner key (``""`` for a trusted caller)."""
    cleaned = validate_options(options)
    path = get_config()["VALIDATE_OPTIONS"]
    if path is None:
        return cleaned
    hook = import_string(path) if isinstance(path, str) else path
    try:
        if inspect.iscoroutinefunction(hook):
            result = await hook(cleaned, owner)
        else:
            result = await run_sync(hook, cleaned, owner)
    except ValidationError as exc:
        raise BadOptions(" ".join(str(message) for message in exc.messages)) from None
    if not isinstance(result, dict):
        raise ImproperlyConfigured(
            f"DETACHED_RUNS['VALIDATE_OPTIONS'] returned {type(result).__name__}, not a dict."
        )
    return validate_options(result)


def validate_multitask(multitask: object) -> str:
    """``multitask`` if it is one of ``interrupt``, ``reject``, ``enqueue``,
    ``rollback``; the ``MULTITASK`` setting for None; else `BadMultitask`."""
    if multitask is None:
        return str(get_config()["MULTITASK"])
    if not isinstance(multitask, str) or multitask not in MULTITASK_POLICIES:
        raise BadMultitask(f'"multitask" must be one of {", ".join(MULTITASK_POLICIES)}.')
    return multitask

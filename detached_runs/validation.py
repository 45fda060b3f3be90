"""Checks of what a client sends before anything runs: the session key and
the prompt. They raise the named exceptions of `detached_runs.exceptions`
that the views and the consumer turn into ``400`` answers."""

from __future__ import annotations

import re

from .conf import get_config
from .exceptions import BadPrompt, BadSessionKey
from .text import clean_text

SESSION_KEY_RE = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")


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

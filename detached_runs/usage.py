"""What an agent reports of its usage (tokens, cost, the model), checked once
at the agent's boundary, and merged into `Run.usage`.

An agent reports usage by yielding ``{"event": "usage", "data": {...}}``, or,
where it cannot yield (in a ``finally`` that runs during ``aclose()``, or
after a cancellation), with ``ctx.report_usage({...})``
(`detached_runs.agents.base.AgentContext.report_usage`). Either way the
report is checked by `clean_usage` and, if it passes, logged as a ``usage``
event (so clients get it) and merged into the run's usage: shallowly, later
keys winning (`merge_usage`). The run's usage is checkpointed with its output
and saved at its end, whatever the end.

A report that breaks a rule is dropped, with a warning in the log that names
the run and the rule: accounting never costs a user the answer. The rules
(each a reason `clean_usage` gives in its `ValueError`):

- a JSON object (a dict with string keys), nested at most `MAX_USAGE_DEPTH`
  deep, at most `MAX_USAGE_BYTES` bytes of JSON; so is the merge of every
  report of the run. Floats JSON cannot hold (NaN, infinities) become
  ``null``, as in any event's data, and strings are cleaned like text
  (`detached_runs.text`);
- the token counts (`TOKEN_KEYS`) whole numbers from 0 to `MAX_COUNT` (what
  JSON numbers hold exactly in every client: JavaScript's safe integers);
  ``cost`` a number from 0 to `MAX_COUNT`; ``model`` a string of at most 200
  characters; ``estimated`` a boolean. Other keys may hold any JSON.

So the admin can sum token counts and costs with a cast in SQL on every
database, and no report can make a checkpoint fail (MariaDB's JSON checks
refuse deeply nested documents; the bounds keep well within them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from .events import USAGE
from .text import clean_json

__all__ = [
    "MAX_COUNT",
    "MAX_USAGE_BYTES",
    "MAX_USAGE_DEPTH",
    "TOKEN_KEYS",
    "USAGE",
    "clean_usage",
    "estimate_tokens",
    "merge_usage",
    "usage_size",
]
#: Bytes of JSON a run's usage (each report, and their merge) takes at most.
MAX_USAGE_BYTES = 4096
#: Levels of nesting a report may have: the object itself is one
#: (``{"input_tokens": 3}``), an object in it two.
MAX_USAGE_DEPTH = 4
#: The largest token count or cost: 2**53 - 1, the largest integer a JSON
#: number holds exactly in JavaScript (``Number.MAX_SAFE_INTEGER``).
MAX_COUNT = 2**53 - 1
#: Token counts (whole numbers): what the admin shows and sums.
TOKEN_KEYS = ("input_tokens", "output_tokens", "total_tokens")
#: The characters per token of `estimate_tokens`.
CHARS_PER_TOKEN = 4

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def clean_usage(data: Any) -> dict[str, Any]:
    """``data``, a usage report, checked and cleaned: a new dict of JSON data
    (keys and strings cleaned, tuples as lists, NaN and infinities as None).

    Raises `ValueError` naming the rule ``data`` breaks (see the module
    docstring); never anything else.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"usage data must be a JSON object, not {type(data).__name__}")
    try:
        cleaned = clean_json(dict(data))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"usage data is not JSON: {exc}") from None
    if _depth(cleaned) > MAX_USAGE_DEPTH:
        raise ValueError(f"usage data is nested more than {MAX_USAGE_DEPTH} deep")
    _check_keys(cleaned)
    size = usage_size(cleaned)
    if size > MAX_USAGE_BYTES:
        raise ValueError(f"usage data is {size} bytes of JSON, over {MAX_USAGE_BYTES}")
    for key in TOKEN_KEYS:
        if key in cleaned and not _whole(cleaned[key]):
            raise ValueError(f"usage {key} must be a whole number from 0 to {MAX_COUNT}")
    if "cost" in cleaned and not _number(cleaned["cost"]):
        raise ValueError(f"usage cost must be a number from 0 to {MAX_COUNT}")
    model = cleaned.get("model")
    if "model" in cleaned and not (isinstance(model, str) and len(model) <= 200):
        raise ValueError("usage model must be a string of at most 200 characters")
    if "estimated" in cleaned and not isinstance(cleaned["estimated"], bool):
        raise ValueError("usage estimated must be true or false")
    # Canonical JSON data: what the log, Redis and the database hold alike.
    result: dict[str, Any] = json.loads(_ENCODER.encode(cleaned))
    return result


def merge_usage(usage: Mapping[str, Any], report: Mapping[str, Any]) -> dict[str, Any]:
    """A run's usage with ``report`` merged in: a new dict whose top-level keys
    are ``report``'s over ``usage``'s (a key is replaced whole, not merged)."""
    return {**usage, **report}


def usage_size(usage: Mapping[str, Any]) -> int:
    """Bytes of ``usage``'s JSON (compact, UTF-8): what `MAX_USAGE_BYTES` bounds."""
    return len(_ENCODER.encode(usage).encode())


def estimate_tokens(text: str | int) -> int:
    """Tokens in ``text`` (or in that many characters), estimated as one per
    `CHARS_PER_TOKEN` characters, rounded up: OpenAI's rule of thumb for
    English text ("one token generally corresponds to ~4 characters of text
    for common English text", OpenAI Help Center, "What are tokens and how
    to count them?"). Rough for code and most other languages (often more
    tokens than this), so what it gives is marked ``"estimated": true``."""
    chars = text if isinstance(text, int) else len(text)
    return math.ceil(max(chars, 0) / CHARS_PER_TOKEN)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def _number(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 <= value <= MAX_COUNT
    )


def _depth(value: Any) -> int:
    """Levels of objects and arrays in ``value`` (0 for a scalar); it stops
    counting past `MAX_USAGE_DEPTH`, so a deep value costs no deep walk."""
    deepest, level = 0, [(value, 1)]
    while level:
        item, depth = level.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_USAGE_DEPTH:
            return deepest
        level.extend((child, depth + 1) for child in children)
    return deepest


def _check_keys(value: Any) -> None:
    """`ValueError` unless every object in ``value`` has string keys only
    (JSON would turn ``1`` and ``"1"`` into one key: the merge on one worker
    and on another would differ)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            if not all(isinstance(key, str) for key in item):
                raise ValueError("usage data must have string keys only")
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)

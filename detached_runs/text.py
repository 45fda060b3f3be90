"""Text at the app's boundaries, made storable and encodable once.

Text enters the app at a few places: a prompt (HTTP and WebSocket), an
agent's text deltas, the data of an agent's own events and its error
messages. Each of them goes through `clean_text` (or `clean_json` for JSON
data) there, and nowhere else, so the log, every client and the saved row
hold the same text on every database.

The one cleaning: every code point that UTF-8 cannot encode (a lone UTF-16
surrogate, U+D800 to U+DFFF; a valid pair of them in one string is joined
into its character first) and NUL (U+0000, which PostgreSQL cannot store in
text) becomes U+FFFD REPLACEMENT CHARACTER, as a browser's ``TextEncoder``
turns a lone surrogate into U+FFFD. In JSON data, floats that JSON cannot
express (NaN, Infinity) become ``null``, as JavaScript's ``JSON.stringify``
writes them. Everything else, including combining marks, emoji and control
characters other than NUL, is kept as it is.

Untrusted JSON (request bodies, WebSocket frames) is parsed with `loads`,
which turns every way a text can fail to parse, including nesting deeper
than Python's recursion limit, into `InvalidInput`. It does not clean: a
value the app uses is cleaned where it is validated (a prompt by
`detached_runs.validation.validate_prompt`), so a body's other fields, which
nothing reads, cost no walk through them.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .exceptions import InvalidInput

REPLACEMENT = "\ufffd"

#: What `clean_text` replaces: NUL and the UTF-16 surrogates.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """``text`` with NUL and lone surrogates replaced by U+FFFD (see the module
    docstring); the same object when there is nothing to replace."""
    if _UNSTORABLE.search(text) is None:
        return text
    if _SURROGATE.search(text) is not None:
        # Joins valid surrogate pairs into their character, replaces lone ones.
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text.replace("\x00", REPLACEMENT)


def clean_json(value: Any) -> Any:
    """A copy of ``value`` (JSON data: dicts, lists, tuples, strings, numbers,
    booleans, None) with every string and key cleaned by `clean_text` and
    non-finite floats as None.

    Raises `TypeError` for anything JSON cannot hold (a set, an object, a key
    that is not a string, number, boolean or None) and `ValueError` for data
    nested deeper than Python's recursion limit lets it be encoded.
    """
    try:
        return _clean(value)
    except RecursionError:
        raise ValueError("The data is nested too deeply.") from None


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {_clean_key(key): _clean(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(item) for item in value]
    raise TypeError(f"{type(value).__name__} is not JSON data")


def _clean_key(key: Any) -> Any:
    if isinstance(key, str):
        return clean_text(key)
    if key is None or isinstance(key, bool | int | float):
        return key  # json writes these as strings, as JavaScript would
    raise TypeError(f"a key of type {type(key).__name__} is not JSON data")


def loads(data: str | bytes, *, name: str = "body") -> Any:
    """Parse untrusted JSON text, strictly.

    Raises `InvalidInput` ("The <name> is not valid JSON.") for bytes that
    are not UTF-8 (a leading byte order mark is ignored), text that is not
    JSON, NaN or Infinity (not JSON, though Python accepts them), and nesting
    too deep to parse.
    """
    try:
        # UTF-8 only (RFC 8259), with a byte order mark allowed and ignored;
        # json.loads would guess UTF-16 and UTF-32 from bytes too.
        text = data.decode("utf-8-sig") if isinstance(data, bytes) else data.removeprefix("\ufeff")
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidInput(f"The {name} is not valid JSON.") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")

"""The one cleaning of text at the app's boundaries (`detached_runs.text`)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from detached_runs.exceptions import InvalidInput
from detached_runs.text import REPLACEMENT, clean_json, clean_text, loads
from detached_runs.validation import validate_prompt

any_text = st.text(st.characters(exclude_categories=()))
json_data = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda inner: st.lists(inner) | st.dictionaries(any_text, inner),
    max_leaves=20,
)


@given(any_text)
def test_cleaned_text_encodes_as_utf8_has_no_nul_and_is_cleaned_already(text):
    cleaned = clean_text(text)
    cleaned.encode()  # no lone surrogate left
    assert "\x00" not in cleaned
    assert clean_text(cleaned) == cleaned


@given(st.text())  # Hypothesis' default: valid text, NUL aside, is kept as it is
def test_text_without_nul_or_surrogates_is_kept_as_it_is(text):
    assert clean_text(text) == text.replace("\x00", REPLACEMENT)


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [
        ("half \ud83d here", "half \ufffd here"),
        ("\ude00", "\ufffd"),
        ("\ud83d\ude00", "😀"),  # a valid pair in one string is its character
        ("n2\x00 ", "n2\ufffd "),
        ("e\u0301 👨\u200d👩\u200d👧 \r\n\u2028", "e\u0301 👨\u200d👩\u200d👧 \r\n\u2028"),
    ],
)
def test_nul_and_lone_surrogates_become_the_replacement_character(text, cleaned):
    assert clean_text(text) == cleaned


@given(json_data)
def test_cleaned_json_data_encodes_as_strict_json(data):
    cleaned = clean_json(data)
    json.dumps(cleaned, allow_nan=False, ensure_ascii=False).encode()
    assert clean_json(cleaned) == cleaned


def test_non_finite_numbers_become_null_and_keys_are_cleaned():
    data = {"a\x00": [float("nan"), float("inf"), -float("inf"), 1.5], 3: ("\ud800",)}
    assert clean_json(data) == {"a\ufffd": [None, None, None, 1.5], 3: ["\ufffd"]}


@pytest.mark.parametrize("value", [{1, 2}, object(), {("a", "b"): 1}])
def test_what_json_cannot_hold_is_a_type_error(value):
    with pytest.raises(TypeError):
        clean_json(value)


def test_data_nested_deeper_than_the_recursion_limit_is_a_value_error():
    data: list[object] = []
    for _ in range(100_000):
        data = [data]
    with pytest.raises(ValueError, match="nested too deeply"):
        clean_json(data)


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000,
        "[" * 100_000 + "]" * 100_000,
        b"\xff",
        "NaN",
        '{"a": Infinity}',
        "{",
        '{"prompt": "hi"}'.encode("utf-16"),  # json.loads would take it
        '{"prompt": "hi"}'.encode("utf-32-le"),
    ],
)
def test_untrusted_json_that_does_not_parse_is_invalid_input(raw):
    with pytest.raises(InvalidInput, match=r"The frame is not valid JSON\."):
        loads(raw, name="frame")


def test_untrusted_json_is_parsed_not_cleaned_the_prompt_is_cleaned_where_validated():
    payload = loads('{"prompt": "a\\ud83d\\u0000", "unused": "\\ud800"}')
    assert payload == {"prompt": "a\ud83d\x00", "unused": "\ud800"}
    assert validate_prompt(payload["prompt"]) == "a\ufffd\ufffd"


def test_a_byte_order_mark_is_ignored_in_a_body_and_in_a_frame_alike():
    assert loads('\ufeff{"a": 1}'.encode()) == loads('\ufeff{"a": 1}') == {"a": 1}

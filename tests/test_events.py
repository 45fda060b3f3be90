"""Event ids and the SSE encoding."""

from __future__ import annotations

import pytest

from detached_runs.events import Event, Position, encode_sse, make_id, parse_id
from detached_runs.exceptions import BadEventId

RUN = "0123456789abcdef0123456789abcdef"


def test_ids_round_trip_and_order_as_positions():
    ids = [
        make_id(RUN, p) for p in (Position(0, 1), Position(5, 1), Position(5, 2), Position(9, 2))
    ]
    positions = [parse_id(i)[1] for i in ids]
    assert positions == sorted(positions) and len(set(positions)) == 4
    assert parse_id(ids[1]) == (RUN, Position(5, 1))


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "x",
        f"{RUN}",
        f"{RUN}:1",
        f"{RUN}:a-1",
        f"{RUN.upper()}:1-1",
        f"{RUN}:1-1\nevent: x",
        f"{RUN}:{'9' * 16}-1",
        "../../etc/passwd",
    ],
)
def test_malformed_ids_are_bad_event_ids(bad):
    with pytest.raises(BadEventId):
        parse_id(bad)


def test_sse_encoding_is_one_line_of_json_per_event_and_cached():
    event = Event(make_id(RUN, Position(7, 1)), "delta", {"text": "two\nlines é"})
    wire = event.sse
    assert wire == f'id: {RUN}:7-1\nevent: delta\ndata: {{"text":"two\\nlines é"}}\n\n'.encode()
    assert event.sse is wire
    other = Event(make_id(RUN, Position(7, 2)), "done", {"status": "done"})
    assert encode_sse([event, other]) == wire + other.sse


def test_data_that_is_not_json_fails_at_encoding():
    with pytest.raises(TypeError):
        _ = Event("x", "tool", {"x": object()}).sse


@pytest.mark.parametrize("digits", ["\u0663", "\uff13", "\u00b3"])
def test_an_id_with_digits_that_are_not_ascii_is_malformed(digits):
    with pytest.raises(BadEventId):
        parse_id(f"{'a' * 32}:{digits}-1")

"""Any text, end to end: agent -> log -> SSE and WebSocket -> saved row.

Hypothesis writes the agent's deltas from all of Unicode, lone surrogates and
NUL included, with combining marks, emoji and joined emoji sequences cut
across deltas. Whatever it writes, the text a browser gets over SSE, the text
a WebSocket gets, and the text saved in the database (whichever one the suite
runs on) are the same: the deltas, each cleaned on its own by the one
documented cleaning (`detached_runs.text.clean_text`).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect
from websockets.typing import Origin

from detached_runs.models import Run
from detached_runs.text import clean_json, clean_text

from .agents import script
from .http import Browser, text

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

#: Pieces that stress one layer or another, mixed into arbitrary text.
AWKWARD = [
    "\x00",
    "\ud83d",  # a lone high surrogate
    "\ude00",  # a lone low surrogate
    "\ud83d\ude00",  # a pair of them, in one string: one character
    "e\u0301",  # a combining accent
    "👨\u200d👩\u200d👧",  # a family: emoji joined by ZERO WIDTH JOINER
    "🇫🇷",  # a flag: two regional indicators
    "\r\n",
    "\u2028",
    "data: x\n\nid: 1\n\n",  # looks like SSE
    '"}\\',
]
any_text = st.text(st.characters(exclude_categories=()), max_size=40)


@st.composite
def deltas(draw: Any) -> list[str]:
    """Text made of arbitrary and awkward pieces, cut at arbitrary points
    (so a joined emoji or a surrogate pair may be split across deltas)."""
    whole = "".join(draw(st.lists(st.one_of(any_text, st.sampled_from(AWKWARD)), max_size=8)))
    cuts = sorted(draw(st.lists(st.integers(0, len(whole)), max_size=6)))
    pieces, start = [], 0
    for cut in [*cuts, len(whole)]:
        pieces.append(whole[start:cut])
        start = cut
    return pieces


def saved(key: str) -> Run:
    for _ in range(500):
        row = Run.objects.filter(session_key=key).first()
        if row is not None and row.status != "running":
            return row
        time.sleep(0.02)
    raise AssertionError("the run was not saved")


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(pieces=deltas(), note=any_text)
def test_any_text_reaches_sse_websocket_and_the_database_the_same(server, pieces, note):
    key = uuid.uuid4().hex[:12]
    browser = Browser(server.port)
    items: list[Any] = [*pieces, {"event": "note", "data": {note: [note]}}]
    assert browser.request("POST", f"/runs/{key}/", {"prompt": script(items)}).status == 202
    expected = "".join(clean_text(piece) for piece in pieces)

    events = browser.stream(f"/runs/{key}/events/").rest()
    assert events[-1].data == {"status": "done"}
    assert text(events) == expected
    assert next(e for e in events if e.event == "note").data == clean_json({note: [note]})

    cookie = "; ".join(f"{name}={value}" for name, value in browser.cookies.items())
    with connect(
        f"ws://127.0.0.1:{server.port}/ws/runs/{key}/",
        additional_headers={"Cookie": cookie},
        origin=Origin(f"http://127.0.0.1:{server.port}"),
    ) as socket:
        frames: list[dict[str, Any]] = []
        while not frames or frames[-1]["event"] != "done":
            frames.append(json.loads(socket.recv(timeout=10)))
    assert "".join(f["data"]["text"] for f in frames if f["event"] == "delta") == expected

    row = saved(key)
    assert (row.status, row.output) == ("done", expected)

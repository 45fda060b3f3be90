"""End to end: a real daphne process, real sockets, the HTTP/SSE contract."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from detached_runs.models import Run

from .agents import numbered, script
from .http import Browser, text

NAN, INF = float("nan"), float("inf")

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

WORDS_40 = "".join(f"w{i} " for i in range(40))


def wait_for_status(browser: Browser, key: str, *, not_: str = "running") -> dict[str, Any]:
    for _ in range(500):
        reply = browser.request("GET", f"/runs/{key}/")
        run = reply.json()["run"]
        if run["status"] != not_:
            return run
        time.sleep(0.02)
    raise AssertionError("still running")


def test_start_then_stream_gets_start_deltas_and_done_with_sse_headers(browser, key):
    reply = browser.request("POST", f"/runs/{key}/", {"prompt": "10"})
    assert reply.status == 202
    body = reply.json()
    assert body["session"] == key and body["status"] == "running"
    assert body["events_url"] == f"/runs/{key}/events/"
    stream = browser.stream(body["events_url"])
    assert stream.status == 200
    assert stream.headers["Content-Type"] == "text/event-stream"
    assert stream.headers["Cache-Control"] == "no-cache"
    assert stream.headers["X-Accel-Buffering"] == "no"
    events = stream.rest()
    assert events[0].event == "start" and events[0].data == {"run": body["id"], "prompt": "10"}
    assert text(events) == "".join(f"w{i} " for i in range(10))
    assert [e.event for e in events].count("done") == 1
    assert events[-1].data == {"status": "done"}
    assert all(e.id for e in events)


def test_disconnect_mid_stream_then_last_event_id_gets_exactly_the_rest(browser, key, server):
    browser.request("POST", f"/runs/{key}/", {"prompt": "40"})
    stream = browser.stream(f"/runs/{key}/events/")
    first = stream.take(8)
    stream.close()  # the tab goes away mid-answer
    time.sleep(0.2)
    resumed = browser.stream(f"/runs/{key}/events/", {"Last-Event-ID": first[-1].id or ""})
    rest = resumed.rest()
    assert text(first) + text(rest) == WORDS_40
    assert rest[0].event != "start" and rest[-1].event == "done"
    # The run went on without anybody: its row holds the whole answer.
    run = wait_for_status(browser, key)
    assert run["output"] == WORDS_40
    # Both subscribers were released (the dropped one too), so the run is
    # evicted when its grace period (1 s on this server) is over.
    deadline = time.monotonic() + 5
    while f"Evicted run {uuid.UUID(run['id']).hex}" not in server.output():
        assert time.monotonic() < deadline, "the run was never evicted"
        time.sleep(0.1)
    assert "Traceback" not in server.output()


def test_after_query_parameter_resumes_like_last_event_id(browser, key):
    browser.request("POST", f"/runs/{key}/", {"prompt": "20"})
    stream = browser.stream(f"/runs/{key}/events/")
    first = stream.take(5)
    stream.close()
    rest = browser.stream(f"/runs/{key}/events/?after={first[-1].id}").rest()
    assert text(first) + text(rest) == "".join(f"w{i} " for i in range(20))


def test_reconnect_after_the_end_gets_a_compact_replay_then_204(browser, key):
    browser.request("POST", f"/runs/{key}/", {"prompt": "40"})
    live = browser.stream(f"/runs/{key}/events/").rest()
    replay = browser.stream(f"/runs/{key}/events/").rest()
    assert [e.event for e in replay] == ["start", "delta", "done"]
    assert text(replay) == WORDS_40
    done = browser.stream(f"/runs/{key}/events/", {"Last-Event-ID": live[-1].id or ""})
    assert done.status == 204


def test_after_eviction_the_run_is_served_from_the_database(browser, key):
    browser.request("POST", f"/runs/{key}/", {"prompt": "10"})
    live = browser.stream(f"/runs/{key}/events/").rest()
    time.sleep(1.3)  # EVICT_AFTER is 1 s in the server
    replay = browser.stream(f"/runs/{key}/events/").rest()
    assert [e.event for e in replay] == ["start", "delta", "done"]
    assert text(replay) == text(live)
    assert (
        browser.stream(f"/runs/{key}/events/", {"Last-Event-ID": live[-1].id or ""}).status == 204
    )


def test_an_idle_stream_sends_keep_alive_comments(browser, key):
    browser.request("POST", f"/runs/{key}/", {"prompt": "slow"})
    stream = browser.stream(f"/runs/{key}/events/")
    stream.take(2)  # start, and the slow agent's one word; then it pauses 10 s
    time.sleep(0.8)  # KEEPALIVE is 0.3 s
    browser.request("POST", f"/runs/{key}/stop/")
    stream.rest()
    assert ": keep-alive" in stream.comments


def test_stop_ends_the_run_stopped_and_saves_the_partial_answer(browser, key):
    browser.request("POST", f"/runs/{key}/", {"prompt": "500"})
    stream = browser.stream(f"/runs/{key}/events/")
    seen = stream.take(6)
    reply = browser.request("POST", f"/runs/{key}/stop/")
    assert reply.status == 200 and reply.json() == {"stopped": True}
    rest = stream.rest()
    assert rest[-1].data == {"status": "stopped"}
    run = wait_for_status(browser, key)
    assert run["status"] == "stopped"
    assert run["output"] == text(seen) + text(rest)
    assert 0 < len(run["output"]) < len("".join(f"w{i} " for i in range(500)))
    assert browser.request("POST", f"/runs/{key}/stop/").json() == {"stopped": False}


def test_double_send_stops_the_first_run_and_saves_it_before_the_second(browser, key):
    first = browser.request("POST", f"/runs/{key}/", {"prompt": "500"}).json()
    second = browser.request("POST", f"/runs/{key}/", {"prompt": "5"}).json()
    events = browser.stream(f"/runs/{key}/events/").rest()
    assert events[0].data["run"] == second["id"]
    assert events[-1].data == {"status": "done"}
    rows = {str(r.id): r for r in Run.objects.filter(session_key=key)}
    assert rows[first["id"]].status == "stopped"
    assert rows[second["id"]].status == "done"
    first_end, second_end = rows[first["id"]].finished_at, rows[second["id"]].finished_at
    assert first_end is not None and second_end is not None and first_end <= second_end


def test_another_browser_gets_404_for_everything_of_the_session(browser, key, server):
    browser.request("POST", f"/runs/{key}/", {"prompt": "100"})
    stranger = Browser(server.port)
    assert stranger.request("GET", f"/runs/{key}/").status == 404
    assert stranger.stream(f"/runs/{key}/events/").status == 404
    assert stranger.request("POST", f"/runs/{key}/stop/").status == 404
    assert stranger.request("POST", f"/runs/{key}/", {"prompt": "mine now"}).status == 404
    unknown = stranger.request("GET", f"/runs/{uuid.uuid4().hex[:8]}/")
    assert unknown.status == 404 and unknown.json() == {"error": "No such session."}
    assert browser.request("GET", f"/runs/{key}/").json()["run"]["status"] == "running"
    browser.request("POST", f"/runs/{key}/stop/")


def test_bad_input_gets_its_status_and_the_run_goes_on_untouched(browser, key):
    browser.request("POST", f"/runs/{key}/", {"prompt": "40"})
    stream = browser.stream(f"/runs/{key}/events/")
    seen = stream.take(3)
    bad = [
        browser.request("POST", f"/runs/{key}/", b"{not json"),
        browser.request("POST", f"/runs/{key}/", {"prompt": "x" * 40_000}),
        browser.request("POST", f"/runs/{key}/", {"prompt": ["a list"]}),
        browser.request("POST", f"/runs/{key}/", {"nothing": 1}),
        browser.request("GET", f"/runs/{key}/events/", headers={"Last-Event-ID": "forged"}),
        browser.request("POST", "/runs/bad%20key/", {"prompt": "x"}),
    ]
    assert [r.status for r in bad] == [400] * 6
    assert all("error" in r.json() for r in bad)
    assert browser.request("POST", f"/runs/{key}/", {"prompt": "x"}, csrf=False).status == 403
    assert browser.request("POST", f"/runs/{key}/", {"prompt": "x"}, csrf=False).json()["error"]
    assert browser.request("PUT", f"/runs/{key}/").status == 405
    assert browser.request("GET", f"/runs/{key}/stop/").status == 405
    rest = stream.rest()
    assert text(seen) + text(rest) == WORDS_40
    assert rest[-1].data == {"status": "done"}
    assert Run.objects.filter(session_key=key).count() == 1


# -- text the stack cannot encode or store, and malformed requests ------------------


def saved_row(key: str) -> Run:
    for _ in range(500):
        row = Run.objects.filter(session_key=key).order_by("-started_at").first()
        if row is not None and row.status != "running":
            return row
        time.sleep(0.02)
    raise AssertionError("the run was not saved")


def test_lone_surrogates_from_the_agent_become_u_fffd_and_the_run_completes(browser, key):
    items = [
        "before ",
        "half \ud83d here ",
        {"event": "note", "data": {"text": "x\udc00y", "\ud800key": ["\udfff"]}},
        "after",
    ]
    assert browser.request("POST", f"/runs/{key}/", {"prompt": script(items)}).status == 202
    events = browser.stream(f"/runs/{key}/events/").rest()
    assert text(events) == "before half \ufffd here after"
    note = next(e for e in events if e.event == "note")
    assert note.data == {"text": "x\ufffdy", "\ufffdkey": ["\ufffd"]}
    assert events[-1].data == {"status": "done"}
    row = saved_row(key)
    assert (row.status, row.output) == ("done", "before half \ufffd here after")


def test_nul_and_non_finite_numbers_from_the_agent_are_stored_and_sent_as_json(browser, key):
    items = ["n2\x00 ", *numbered(200), {"event": "score", "data": {"nan": NAN, "inf": [INF]}}]
    assert browser.request("POST", f"/runs/{key}/", {"prompt": script(items)}).status == 202
    stream = browser.stream(f"/runs/{key}/events/")
    events = stream.rest()  # parsed by json.loads: it would accept NaN, so check the wire too
    assert text(events) == "n2\ufffd " + "".join(numbered(200))
    assert next(e for e in events if e.event == "score").data == {"nan": None, "inf": [None]}
    assert events[-1].data == {"status": "done"}
    assert saved_row(key).output == "n2\ufffd " + "".join(numbered(200))


def test_a_prompt_with_a_lone_surrogate_or_nul_is_cleaned_the_same_way(browser, key):
    reply = browser.request("POST", f"/runs/{key}/", {"prompt": "hello \ud83d there\x00!"})
    assert reply.status == 202
    events = browser.stream(f"/runs/{key}/events/").rest()
    assert events[0].data["prompt"] == "hello \ufffd there\ufffd!"
    assert saved_row(key).prompt == "hello \ufffd there\ufffd!"


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,  # deeper than Python's parser goes
        b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"prompt": NaN}',  # Python's json takes it; JSON does not
        b'{"prompt": "\xff\xfe"}',  # not UTF-8
    ],
    ids=["nested", "nested-prompt", "nan", "latin-1"],
)
def test_a_body_that_is_not_json_is_a_json_400_and_starts_nothing(browser, key, body):
    reply = browser.request("POST", f"/runs/{key}/", body)
    assert reply.status == 400
    assert reply.json() == {"error": "The body is not valid JSON."}
    assert browser.request("GET", f"/runs/{key}/").status == 404


def test_a_form_or_query_with_too_many_fields_is_a_json_400(browser, key):
    form = "&".join(f"f{i}=x" for i in range(1001)).encode() + b"&prompt=hi"
    reply = browser.request(
        "POST",
        f"/runs/{key}/",
        form,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert reply.status == 400
    assert reply.json() == {"error": "The request has too many fields."}
    query = "&".join(f"q{i}=x" for i in range(1001))
    reply = browser.request("GET", f"/runs/{key}/events/?{query}")
    assert (reply.status, reply.json()) == (400, {"error": "The request has too many fields."})
    assert browser.request("GET", f"/runs/{key}/").status == 404


# -- middleware between the view and the browser -------------------------------------


def test_events_stream_live_past_gzip_and_conditional_get_middleware(browser, key):
    """The test project has GZipMiddleware and ConditionalGetMiddleware; a
    browser always accepts gzip. Compressed, nothing would arrive before the
    compressor's buffer filled: here the first words come before the run ends."""
    browser.request("POST", f"/runs/{key}/", {"prompt": "40"})
    stream = browser.stream(f"/runs/{key}/events/", {"Accept-Encoding": "gzip, deflate, br"})
    assert stream.status == 200
    assert stream.headers.get("Content-Encoding", "") == ""
    first = stream.take(3)
    assert [e.event for e in first] == ["start", "delta", "delta"]
    assert browser.request("GET", f"/runs/{key}/").json()["run"]["status"] == "running"
    stream.close()


def test_a_cache_middleware_never_serves_a_stale_status(browser, key):
    """The test project has Django's per-site cache (UpdateCacheMiddleware and
    FetchFromCacheMiddleware): a status cached while running would be served
    after the run ended."""
    browser.request("POST", f"/runs/{key}/", {"prompt": "10"})
    running = browser.request("GET", f"/runs/{key}/")
    assert running.json()["run"]["status"] == "running"
    assert "no-store" in running.headers["Cache-Control"]
    assert "private" in running.headers["Cache-Control"]
    saved_row(key)
    assert browser.request("GET", f"/runs/{key}/").json()["run"]["status"] == "done"


def test_a_stopped_agent_that_will_not_let_go_is_abandoned_and_the_session_goes_on(browser, key):
    """An agent that swallows its cancellation and never yields again: stop
    used to answer {"stopped": true} with no done ever after, and the
    session's next start answered 202 and never began. Now the run ends
    STOP_GRACE (5 s) after its stop, and the next run starts."""
    browser.request("POST", f"/runs/{key}/", {"prompt": "stubborn"})
    stream = browser.stream(f"/runs/{key}/events/")
    assert [e.event for e in stream.take(2)] == ["start", "delta"]
    began = time.monotonic()
    assert browser.request("POST", f"/runs/{key}/stop/").json() == {"stopped": True}
    rest = stream.rest()
    assert rest[-1].data == {"status": "stopped"}
    assert time.monotonic() - began < 8
    assert saved_row(key).status == "stopped"
    assert browser.request("POST", f"/runs/{key}/", {"prompt": "3"}).status == 202
    assert text(browser.stream(f"/runs/{key}/events/").rest()) == "w0 w1 w2 "

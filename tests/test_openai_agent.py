"""The OpenAI-compatible agent, with the real ``openai`` client against a fake
endpoint that streams real SSE over HTTP (tests/fake_openai.py), run through
the service so the whole path is real: settings, history, events, stop, save."""

from __future__ import annotations

import asyncio
import importlib
import sys
import time
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from detached_runs import runs
from detached_runs.agents import AgentContext
from detached_runs.agents.openai import OpenAIAgent
from detached_runs.checks import check_settings
from detached_runs.events import Event
from detached_runs.models import Run

from .conftest import free_port, text_of
from .fake_openai import FakeOpenAI, Reply, chunk, text_chunks

pytestmark = pytest.mark.django_db(transaction=True)

KEY = "sk-test-0123456789abcdef"


@pytest.fixture(autouse=True)
def _no_openai_environment(monkeypatch: Any) -> None:
    # The developer's own endpoint must not leak into the tests.
    for name in (
        "OPENAI_BASE_URL",
        "OPENAI_API_KEY",
        "OPENAI_MODEL",
        "OPENAI_ORG_ID",
        "OPENAI_PROJECT_ID",
        "OPENAI_ADMIN_KEY",
        "OPENAI_CUSTOM_HEADERS",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def fake() -> Any:
    async with FakeOpenAI() as server:
        yield server


def agent_for(fake: FakeOpenAI, **options: Any) -> OpenAIAgent:
    return OpenAIAgent(base_url=fake.url, model="fake-model", api_key=KEY, max_retries=0, **options)


async def eventually(check: Any, what: str, within: float = 5.0) -> Any:
    """Poll ``check()`` (sync or async) until it is truthy."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def finished(session: str) -> Run:
    async def ended() -> Run | None:
        row = await Run.objects.filter(session_key=session).order_by("-started_at").afirst()
        return row if row is not None and row.status != "running" else None

    row: Run = await eventually(ended, f"the run of {session} to be saved")
    return row


async def run_to_end(session: str, prompt: str, agent: Any = None) -> tuple[list[Event], Run]:
    await runs.start(session, prompt=prompt, agent=agent)
    async with asyncio.timeout(5):
        events = [event async for event in runs.subscribe(session)]
    return events, await finished(session)


def of_type(events: list[Event], kind: str) -> list[dict[str, Any]]:
    return [event.data for event in events if event.event == kind]


# -- streaming ---------------------------------------------------------------------


async def test_the_agent_yields_each_text_delta_in_order(fake):
    fake.replies.append(Reply(text_chunks("Hel", "lo, ", "wor", "ld!")))
    ctx = AgentContext("chat", "Hi", (), "", "run-1")
    items = [item async for item in agent_for(fake)(ctx)]
    assert items == ["Hel", "lo, ", "wor", "ld!"]


async def test_a_run_streams_the_answer_saves_it_and_releases_the_connection(fake):
    fake.replies.append(Reply(text_chunks("The ", "answer ", "is ", "42.")))
    events, row = await run_to_end("chat", "Question?", agent_for(fake))
    assert text_of(events) == "The answer is 42."
    assert events[-1].data == {"status": "done"}
    assert row.status == "done" and row.output == "The answer is 42."
    await eventually(lambda: fake.open_connections == 0, "the connection to be closed")


async def test_the_system_prompt_history_and_prompt_reach_the_endpoint(fake):
    agent = agent_for(fake, system_prompt="Be brief.")
    fake.replies += [
        Reply(text_chunks("First ", "answer.")),
        Reply(status=500, error={"message": "boom"}),
        Reply(text_chunks("Third answer.")),
    ]
    await run_to_end("chat", "First question", agent)
    _, failed = await run_to_end("chat", "Lost question", agent)
    assert failed.status == "error" and failed.output == ""
    await run_to_end("chat", "Third question", agent)

    last = fake.requests[-1]
    assert last.path == "/v1/chat/completions"
    assert last.body["model"] == "fake-model" and last.body["stream"] is True
    # The failed turn had no answer: it is left out, question and all.
    assert last.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Third question"},
    ]
    assert last.headers["authorization"] == f"Bearer {KEY}"


async def test_the_setting_names_the_agent_and_configures_the_request(fake, config):
    config(
        AGENT="detached_runs.agents.openai.agent",
        OPENAI={
            "BASE_URL": fake.url,
            "MODEL": "served-model",
            "API_KEY": KEY,
            "SYSTEM_PROMPT": "You are a test.",
            "TEMPERATURE": 0.2,
            "PARAMS": {"max_tokens": 64, "extra_body": {"top_k": 5}},
            "MAX_RETRIES": 0,
        },
    )
    fake.replies.append(Reply(text_chunks("Configured.")))
    _, row = await run_to_end("chat", "Hello")
    assert row.output == "Configured."
    body = fake.requests[-1].body
    assert body["model"] == "served-model"
    assert body["temperature"] == 0.2 and body["max_tokens"] == 64 and body["top_k"] == 5
    assert body["messages"][0] == {"role": "system", "content": "You are a test."}
    assert fake.requests[-1].headers["authorization"] == f"Bearer {KEY}"


async def test_the_environment_is_the_fallback_and_a_local_endpoint_needs_no_key(
    fake, config, monkeypatch
):
    config(AGENT="detached_runs.agents.openai.agent")
    monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
    monkeypatch.setenv("OPENAI_MODEL", "env-model")
    fake.replies.append(Reply(text_chunks("From the environment.")))
    _, row = await run_to_end("chat", "Hello")
    assert row.output == "From the environment."
    assert fake.requests[-1].body["model"] == "env-model"
    assert fake.requests[-1].headers["authorization"] == "Bearer EMPTY"


# -- custom events -----------------------------------------------------------------


async def test_tool_call_chunks_become_one_tool_call_event_per_call(fake):
    def call(index: int, **fields: Any) -> dict[str, Any]:
        return {"index": index, **fields}

    fake.replies.append(
        Reply(
            [
                chunk(role="assistant", content=None),
                chunk(
                    tool_calls=[call(0, id="call_1", type="function", function={"name": "weather"})]
                ),
                chunk(tool_calls=[call(0, function={"arguments": '{"city": '})]),
                chunk(tool_calls=[call(0, function={"arguments": '"Paris"}'})]),
                chunk(
                    tool_calls=[
                        call(1, id="call_2", type="function", function={"name": "clock"}),
                    ]
                ),
                chunk(tool_calls=[call(1, function={"arguments": "{}"})]),
                chunk(finish_reason="tool_calls"),
            ]
        )
    )
    events, row = await run_to_end("chat", "Weather?", agent_for(fake))
    assert of_type(events, "tool_call") == [
        {
            "index": 0,
            "id": "call_1",
            "type": "function",
            "name": "weather",
            "arguments": '{"city": "Paris"}',
        },
        {"index": 1, "id": "call_2", "type": "function", "name": "clock", "arguments": "{}"},
    ]
    assert row.status == "done" and row.output == ""


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
async def test_reasoning_chunks_become_reasoning_events_before_the_answer(fake, field):
    fake.replies.append(
        Reply(
            [
                chunk(role="assistant", content="", **{field: "Let me "}),
                chunk(**{field: "think "}),
                chunk(**{field: "about it."}),
                chunk(content="Four."),
                chunk(finish_reason="stop"),
            ]
        )
    )
    events, row = await run_to_end("chat", "2 + 2?", agent_for(fake))
    reasoning = of_type(events, "reasoning")
    assert "".join(data["text"] for data in reasoning) == "Let me think about it."
    kinds = [e.event for e in events if e.event in ("reasoning", "delta")]
    assert kinds.index("delta") > max(i for i, k in enumerate(kinds) if k == "reasoning")
    assert row.output == "Four."  # thinking is not part of the saved answer


# -- errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, "rejected the request (400)"),
        (401, "refused the API key (401)"),
        (404, "has no model 'fake-model' (404)"),
        (429, "rate limit"),
        (500, "failed (500)"),
    ],
)
async def test_an_endpoint_error_ends_the_run_as_error_with_a_safe_message(fake, status, expected):
    # Endpoints quote the key they were sent; that must reach no client.
    fake.replies.append(
        Reply(status=status, error={"message": f"Incorrect API key provided: {KEY}."})
    )
    events, row = await run_to_end("chat", "Hello", agent_for(fake))
    done = events[-1].data
    assert done["status"] == "error" and row.status == "error"
    assert expected in done["error"] and row.error == done["error"]
    assert KEY not in done["error"] and "Traceback" not in done["error"]


async def test_an_error_in_the_middle_of_the_stream_keeps_the_text_so_far(fake):
    fake.replies.append(
        Reply([chunk(content="Partial "), {"error": {"message": "overloaded", "type": "server"}}])
    )
    events, row = await run_to_end("chat", "Hello", agent_for(fake))
    assert events[-1].data == {
        "status": "error",
        "error": "The model endpoint reported an error while answering.",
    }
    assert row.output == "Partial "


# -- how a stream ends ---------------------------------------------------------------
#
# Every way the endpoint's stream can end, each classified by the agent: the
# model's finish_reason, or none (cut off), or the connection lost, stalled or
# never made. The text streamed before an error is kept.

CUT_OFF = "The model's answer was cut off."
LOST = "The connection to the model endpoint was lost mid-answer."
STALLED = "The model endpoint stopped sending mid-answer (timed out)."
NO_CONNECTION = "Could not connect to the model endpoint."
NO_ANSWER = "The model endpoint did not answer in time."


def three_chunks(finish_reason: str | None = None) -> list[dict[str, Any]]:
    """An answer in three chunks; with a finish_reason, the usual last chunk."""
    events = [chunk(content=piece) for piece in ("One ", "two ", "three")]
    return events + ([chunk(finish_reason=finish_reason)] if finish_reason else [])


@pytest.mark.parametrize(
    ("reason", "finish_events"),
    [
        ("stop", []),
        ("tool_calls", []),
        ("length", [{"reason": "length"}]),
        ("content_filter", [{"reason": "content_filter"}]),
        ("a_servers_own_reason", [{"reason": "a_servers_own_reason"}]),
    ],
)
async def test_a_finish_reason_ends_the_run_as_done_and_says_why_if_the_answer_is_not_whole(
    fake, reason, finish_events
):
    fake.replies.append(Reply(three_chunks(reason)))
    events, row = await run_to_end("chat", "Hello", agent_for(fake))
    assert events[-1].data == {"status": "done"}
    assert row.status == "done" and row.output == "One two three"
    assert of_type(events, "finish") == finish_events
    if finish_events:  # just before the done event, after the last text
        assert events[-2].event == "finish"


async def test_the_finish_reason_error_ends_the_run_as_error(fake):
    # OpenRouter's finish_reason for a generation that failed mid-way.
    fake.replies.append(Reply(three_chunks("error")))
    events, row = await run_to_end("chat", "Hello", agent_for(fake))
    assert events[-1].data == {
        "status": "error",
        "error": "The model endpoint reported an error while answering.",
    }
    assert row.status == "error" and row.output == "One two three"


@pytest.mark.parametrize("ending", ["eof", "done"])
async def test_a_stream_that_ends_without_a_finish_reason_is_cut_off(fake, ending):
    # A clean close of the body, with or without [DONE]: only the model's
    # finish_reason says that the answer is whole.
    fake.replies.append(Reply(three_chunks(), ending=ending))
    events, row = await run_to_end("chat", "Hello", agent_for(fake))
    assert events[-1].data == {"status": "error", "error": CUT_OFF}
    assert row.status == "error" and row.error == CUT_OFF
    assert row.output == "One two three" and text_of(events) == "One two three"
    assert of_type(events, "finish") == []


async def test_a_cut_off_stream_yields_the_reasoning_but_not_a_half_written_tool_call(fake):
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "weather"}}
    fake.replies.append(
        Reply(
            [
                chunk(role="assistant", content=None, reasoning_content="Paris, then."),
                chunk(tool_calls=[call]),
                chunk(tool_calls=[{"index": 0, "function": {"arguments": '{"ci'}}]),
            ],
            ending="eof",
        )
    )
    events, row = await run_to_end("chat", "Weather?", agent_for(fake))
    assert of_type(events, "reasoning") == [{"text": "Paris, then."}]
    assert of_type(events, "tool_call") == []
    assert events[-1].data == {"status": "error", "error": CUT_OFF}
    assert row.status == "error" and row.output == ""


@pytest.mark.parametrize("ending", ["reset", "truncate"])
async def test_a_connection_lost_mid_answer_says_so_and_keeps_the_text(fake, ending):
    fake.replies.append(Reply(three_chunks(), ending=ending))
    events, row = await run_to_end("chat", "Hello", agent_for(fake))
    assert events[-1].data == {"status": "error", "error": LOST}
    assert row.status == "error" and row.output == "One two three"


async def test_an_endpoint_that_stalls_mid_answer_times_out_and_keeps_the_text(fake):
    fake.replies.append(Reply(three_chunks(), ending="hold"))
    began = time.monotonic()
    events, row = await run_to_end("chat", "Hello", agent_for(fake, timeout=0.3))
    assert time.monotonic() - began < 3
    assert events[-1].data == {"status": "error", "error": STALLED}
    assert row.status == "error" and row.output == "One two three"
    await eventually(fake.disconnected.is_set, "the agent to hang up")


@pytest.mark.parametrize("ending", ["reset", "truncate", "hold"])
async def test_losing_the_connection_after_the_finish_reason_loses_nothing(fake, ending):
    # The answer is whole; at most the usage chunk and [DONE] are lost.
    fake.replies.append(Reply(three_chunks("stop"), ending=ending))
    events, row = await run_to_end("chat", "Hello", agent_for(fake, timeout=0.3))
    assert events[-1].data == {"status": "done"}
    assert row.status == "done" and row.output == "One two three"


async def test_a_refused_connection_ends_the_run_as_error():
    agent = OpenAIAgent(
        base_url=f"http://127.0.0.1:{free_port()}/v1", model="m", api_key=KEY, max_retries=0
    )
    events, row = await run_to_end("chat", "Hello", agent)
    assert events[-1].data == {"status": "error", "error": NO_CONNECTION}
    assert row.status == "error"


@pytest.mark.parametrize(("ending", "message"), [("drop", NO_CONNECTION), ("silent", NO_ANSWER)])
async def test_an_endpoint_that_fails_before_any_byte_of_an_answer(fake, ending, message):
    fake.replies.append(Reply(three_chunks("stop"), ending=ending))
    events, row = await run_to_end("chat", "Hello", agent_for(fake, timeout=0.3))
    assert events[-1].data == {"status": "error", "error": message}
    assert row.status == "error" and row.output == ""


# -- stop --------------------------------------------------------------------------


async def test_stopping_mid_stream_hangs_up_on_the_endpoint_and_saves_the_partial_text(fake):
    fake.replies.append(
        Reply([chunk(role="assistant", content="Half "), chunk(content="an answer")], ending="hold")
    )
    await runs.start("chat", prompt="Tell me everything", agent=agent_for(fake))

    async def streamed() -> bool:
        run = await runs.status("chat")
        return run is not None and run.output == "Half an answer"

    await eventually(streamed, "the first chunks")
    assert not fake.disconnected.is_set()
    assert await runs.stop("chat") is True
    async with asyncio.timeout(5):
        await fake.disconnected.wait()
    row = await finished("chat")
    assert row.status == "stopped" and row.output == "Half an answer"
    events = [event async for event in runs.subscribe("chat")]
    assert events[-1].data == {"status": "stopped"}


# -- configuration -----------------------------------------------------------------


def test_a_missing_model_or_endpoint_is_a_clear_configuration_error():
    with pytest.raises(ImproperlyConfigured, match="OPENAI_MODEL"):
        OpenAIAgent(base_url="http://127.0.0.1:1/v1").config()
    with pytest.raises(ImproperlyConfigured, match="OPENAI_BASE_URL"):
        OpenAIAgent(model="m").config()
    with pytest.raises(ImproperlyConfigured, match="BASE_URL must be an http"):
        OpenAIAgent(model="m", base_url="127.0.0.1:8000").config()
    with pytest.raises(ImproperlyConfigured, match="remove it from PARAMS"):
        OpenAIAgent(model="m", api_key=KEY, params={"stream": False}).config()
    with pytest.raises(TypeError, match="modle"):
        OpenAIAgent(modle="m")
    config = OpenAIAgent(model="m", api_key=KEY).config()
    assert config.base_url == "https://api.openai.com/v1"
    assert KEY not in repr(config)


async def test_an_unconfigured_agent_ends_the_run_with_a_safe_message():
    events, _ = await run_to_end("chat", "Hello", OpenAIAgent())
    assert events[-1].data == {
        "status": "error",
        "error": "The model endpoint is not configured on the server.",
    }


def test_the_system_check_reports_an_unconfigured_openai_agent(settings):
    settings.DETACHED_RUNS = {"AGENT": "detached_runs.agents.openai.agent"}
    errors = {str(message.id): message.msg for message in check_settings()}
    assert "OPENAI_MODEL" in errors["detached_runs.E006"]
    settings.DETACHED_RUNS = {
        "AGENT": "detached_runs.agents.openai.agent",
        "OPENAI": {"BASE_URL": "http://127.0.0.1:8001/v1", "MODEL": "m"},
    }
    assert check_settings() == []


def test_without_the_openai_package_the_import_says_what_to_install(monkeypatch, settings):
    monkeypatch.setitem(sys.modules, "openai", None)  # "import openai" now fails
    monkeypatch.delitem(sys.modules, "detached_runs.agents.openai")
    message = r"pip install openai \(or the package's \[openai\] extra"
    with pytest.raises(ImproperlyConfigured, match=message):
        importlib.import_module("detached_runs.agents.openai")
    settings.DETACHED_RUNS = {"AGENT": "detached_runs.agents.openai.agent"}
    errors = {str(m.id): m.msg for m in check_settings()}
    assert "pip install openai" in errors["detached_runs.E002"]

"""The OpenAI-compatible agent, with the real ``openai`` client against a fake
endpoint that streams real SSE over HTTP (tests/fake_openai.py), run through
the service so the whole path is real: settings, history, events, stop, save."""

from __future__ import annotations

import asyncio
import dataclasses
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
from detached_runs.exceptions import AgentError
from detached_runs.models import Run

from .conftest import free_port, text_of
from .fake_openai import FakeOpenAI, Reply, chunk, text_chunks, usage_chunk

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
    items: list[Any] = [item async for item in agent_for(fake)(ctx)]
    assert items[:-1] == ["Hel", "lo, ", "wor", "ld!"]
    assert items[-1]["event"] == "usage"


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
#: The agent's ``timeout`` where a test makes the fake keep quiet (seconds):
#: long enough for the fake's first byte on a loaded CI machine, where 0.3 s
#: once was not (the answer was taken for one that never came: NO_ANSWER).
QUIET = 1.5


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
    events, row = await run_to_end("chat", "Hello", agent_for(fake, timeout=QUIET))
    assert time.monotonic() - began < QUIET + 3
    assert events[-1].data == {"status": "error", "error": STALLED}
    assert row.status == "error" and row.output == "One two three"
    await eventually(fake.disconnected.is_set, "the agent to hang up")


@pytest.mark.parametrize("ending", ["reset", "truncate", "hold"])
async def test_losing_the_connection_after_the_finish_reason_loses_nothing(fake, ending):
    # The answer is whole; at most the usage chunk and [DONE] are lost.
    fake.replies.append(Reply(three_chunks("stop"), ending=ending))
    events, row = await run_to_end("chat", "Hello", agent_for(fake, timeout=QUIET))
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
    events, row = await run_to_end("chat", "Hello", agent_for(fake, timeout=QUIET))
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


# -- usage -------------------------------------------------------------------------


async def test_the_request_asks_for_usage_in_the_stream(fake):
    fake.replies += [Reply(text_chunks("a")), Reply(text_chunks("b"))]
    await run_to_end("chat", "Hello", agent_for(fake))
    assert fake.requests[-1].body["stream_options"] == {"include_usage": True}
    # For a server that refuses the option: PARAMS leaves it out.
    await run_to_end("other", "Hello", agent_for(fake, params={"stream_options": None}))
    assert "stream_options" not in fake.requests[-1].body


async def test_a_finished_run_reports_and_saves_the_endpoints_usage_and_its_cost(fake):
    fake.replies.append(
        Reply(
            [
                *text_chunks("The ", "answer."),
                usage_chunk(
                    1200,
                    300,
                    prompt_tokens_details={"cached_tokens": 200},
                    completion_tokens_details={"reasoning_tokens": 50},
                ),
            ]
        )
    )
    prices = {"fake-model": {"input": 1.0, "cached_input": 0.5, "output": 4.0}}
    events, row = await run_to_end("chat", "Question?", agent_for(fake, prices=prices))
    expected = {
        "input_tokens": 1200,
        "output_tokens": 300,
        "total_tokens": 1500,
        "cached_input_tokens": 200,
        "reasoning_tokens": 50,
        "model": "fake-model-2024",  # the model that answered, as the endpoint names it
        "cost": (1000 * 1.0 + 200 * 0.5 + 300 * 4.0) / 1_000_000,
    }
    assert of_type(events, "usage") == [expected]
    assert [e.event for e in events][-2:] == ["usage", "done"]
    assert row.status == "done" and row.usage == expected


async def test_an_endpoint_that_sends_no_usage_gets_an_estimate(fake):
    fake.replies.append(Reply(text_chunks("12345678")))
    events, row = await run_to_end("chat", "abcd" * 3, agent_for(fake, system_prompt="abcd"))
    assert row.usage == {
        "input_tokens": 4,  # 16 characters sent
        "output_tokens": 2,  # 8 written
        "total_tokens": 6,
        "model": "fake-model",
        "estimated": True,
    }
    assert of_type(events, "usage") == [row.usage]


async def test_a_run_stopped_before_the_endpoint_said_reports_an_estimate(fake):
    fake.replies.append(
        Reply([chunk(role="assistant", content="Half "), chunk(content="an answer")], ending="hold")
    )
    prices = {"fake-model": {"input": 2.0, "output": 8.0}}
    await runs.start("chat", prompt="Tell me everything", agent=agent_for(fake, prices=prices))
    subscription = await runs.subscribe("chat")

    async def streamed() -> bool:
        run = await runs.status("chat")
        return run is not None and run.output == "Half an answer"

    await eventually(streamed, "the first chunks")
    assert await runs.stop("chat") is True
    async with asyncio.timeout(5):
        events = [event async for event in subscription]
    estimate = {
        "input_tokens": 5,  # "Tell me everything": 18 characters
        "output_tokens": 4,  # "Half an answer": 14
        "total_tokens": 9,
        "model": "fake-model",  # no usage chunk came, nor a model with the chunks
        "estimated": True,
        "cost": (5 * 2.0 + 4 * 8.0) / 1_000_000,
    }
    assert of_type(events, "usage") == [estimate]
    assert events[-1].data == {"status": "stopped"}
    row = await finished("chat")
    assert row.status == "stopped" and row.usage == estimate


async def test_a_connection_lost_mid_answer_reports_an_estimate_and_a_refused_request_none(fake):
    fake.replies += [
        Reply(three_chunks(), ending="reset"),
        Reply(status=500, error={"message": "down"}),
    ]
    events, row = await run_to_end("chat", "Hello", agent_for(fake))
    assert row.status == "error" and row.usage["estimated"] is True
    assert row.usage["output_tokens"] == 4  # "One two three": 13 characters
    events, row = await run_to_end("other", "Hello", agent_for(fake))
    assert row.status == "error" and row.usage == {} and of_type(events, "usage") == []


async def test_the_agent_alone_reports_its_usage_through_the_context_when_closed(fake):
    fake.replies.append(Reply(three_chunks(), ending="hold"))
    reports: list[Any] = []
    ctx = AgentContext("chat", "Hi", (), "", "run-1", on_usage=reports.append)
    stream: Any = agent_for(fake)(ctx)
    assert await anext(stream) == "One "
    await stream.aclose()  # GeneratorExit at its yield: it may not yield, it reports
    assert reports == [
        {
            "input_tokens": 1,
            "output_tokens": 1,
            "total_tokens": 2,
            "model": "fake-model",
            "estimated": True,
        }
    ]


# -- options -----------------------------------------------------------------------
#
# The agent reads ctx.options; how a request gets them into the run (and the
# project's VALIDATE_OPTIONS) is the service's, so the agent is called here
# with a context as the service builds it.

ALLOWING = {"model": ["small", "large"], "temperature": None, "max_tokens": None}


async def answer(agent: OpenAIAgent, options: dict[str, Any]) -> list[Any]:
    ctx = AgentContext("chat", "Hi", (), "", "run-1", options=options)
    return [item async for item in agent(ctx)]


async def test_options_the_project_allows_set_the_model_and_sampling(fake):
    agent = agent_for(
        fake,
        temperature=0.7,
        params={"max_tokens": 100},
        allowed_options=ALLOWING,
        prices={"large": {"input": 1000, "output": 1000}},
    )
    fake.replies += [Reply(text_chunks("ok")) for _ in range(3)]
    await answer(agent, {})
    body = fake.requests[-1].body
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("fake-model", 0.7, 100)
    options = {"model": "large", "temperature": 0, "max_tokens": 5, "top_p": 0.1, "other": 1}
    items = await answer(agent, options)
    body = fake.requests[-1].body
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("large", 0, 5)
    assert "top_p" not in body and "other" not in body  # not allowed: ignored
    # Priced as the model the options chose (the endpoint names it otherwise).
    assert items[-1]["data"]["model"] == "fake-model" and items[-1]["data"]["cost"] > 0
    assert "cost" not in (await answer(agent, {}))[-1]["data"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": "hot"}, "The option 'temperature' must be a number from 0 to 2."),
        ({"temperature": 3}, "The option 'temperature' must be a number from 0 to 2."),
        ({"temperature": float("nan")}, "The option 'temperature' must be a number from 0 to 2."),
        ({"model": "huge"}, "The option 'model' must be one of 'small', 'large'."),
        ({"model": ""}, "The option 'model' must be a model name"),
        ({"max_tokens": True}, "The option 'max_tokens' must be a whole number"),
    ],
)
async def test_an_allowed_option_with_a_bad_value_ends_the_run_saying_what_it_must_be(
    fake, options, message
):
    with pytest.raises(AgentError) as raised:
        await answer(agent_for(fake, allowed_options=ALLOWING), options)
    assert str(raised.value).startswith(message)
    assert fake.requests == []  # nothing was sent


async def test_by_default_no_option_reaches_the_request(fake):
    fake.replies.append(Reply(text_chunks("ok")))
    await answer(agent_for(fake), {"model": "expensive", "temperature": 2, "seed": 1})
    body = fake.requests[-1].body
    assert body["model"] == "fake-model" and "temperature" not in body and "seed" not in body


async def test_a_bad_option_ends_a_run_through_the_service_as_an_error(fake):
    """Through the service, the same error reaches clients as the run's end."""

    async def with_options(ctx: AgentContext) -> Any:
        ctx = dataclasses.replace(ctx, options={"temperature": -1})
        async for item in agent_for(fake, allowed_options=["temperature"])(ctx):
            yield item

    events, row = await run_to_end("chat", "Hello", with_options)
    assert events[-1].data == {
        "status": "error",
        "error": "The option 'temperature' must be a number from 0 to 2.",
    }
    assert row.status == "error" and row.usage == {}


def test_allowed_options_and_prices_are_checked_with_the_configuration():
    base = {"model": "m", "api_key": KEY}
    allowed: Any
    for allowed in ("model", ["modle"], {"model": "large"}, {"temperature": [5]}, {"seed": []}):
        with pytest.raises(ImproperlyConfigured, match="ALLOWED_OPTIONS"):
            OpenAIAgent(**base, allowed_options=allowed).config()
    for prices in (
        [1],
        {"m": {"input": 1}},
        {"m": {"input": 1, "output": -1}},
        {"m": {"input": 1, "output": 2, "tip": 1}},
        {"m": {"input": "1", "output": 2}},
    ):
        with pytest.raises(ImproperlyConfigured, match="PRICES"):
            OpenAIAgent(**base, prices=prices).config()
    config = OpenAIAgent(
        **base,
        allowed_options=("model", "top_p"),
        prices={"m": {"input": 1, "output": 2}},
    ).config()
    assert config.allowed_options == {"model": None, "top_p": None}
    assert config.prices == {"m": {"input": 1.0, "output": 2.0}}


def test_the_system_check_reports_bad_allowed_options(settings):
    settings.DETACHED_RUNS = {
        "AGENT": "detached_runs.agents.openai.agent",
        "OPENAI": {"BASE_URL": "http://127.0.0.1:8001/v1", "MODEL": "m", "ALLOWED_OPTIONS": "m"},
    }
    errors = {str(message.id): message.msg for message in check_settings()}
    assert "ALLOWED_OPTIONS" in errors["detached_runs.E006"]


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

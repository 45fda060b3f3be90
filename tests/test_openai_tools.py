"""The OpenAI-compatible agent's tools (``TOOLS``): the model calls one, the
agent asks the user if the tool needs approval (``ctx.ask``), runs it or not,
sends the result back and streams the model's next answer. Against the fake
endpoint (tests/fake_openai.py), a real HTTP server, with the real client.

The agent is called with an `AgentContext` whose ``on_ask`` is the test's own
user (`User`): that is the agent's contract with the service, which answers
``ctx.ask`` with what a client posted."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import json
import logging
from collections.abc import Mapping
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detached_runs import runs
from detached_runs.agents import AgentContext
from detached_runs.agents.openai import (
    DECLINED,
    NO_ANSWER,
    TOO_LARGE_TO_ASK,
    OpenAIAgent,
    ToolError,
    approves,
)
from detached_runs.checks import check_settings
from detached_runs.exceptions import InputTimeout

from .conftest import eventually, text_of
from .fake_openai import (
    FakeOpenAI,
    Reply,
    Request,
    text_chunks,
    tool_call_chunks,
    usage_chunk,
)

KEY = "sk-test-0123456789abcdef"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.fixture(autouse=True)
def _no_openai_environment(monkeypatch: Any) -> None:
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "OPENAI_MODEL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def fake() -> Any:
    async with FakeOpenAI() as server:
        yield server


class User:
    """The user at the other end of ``ctx.ask``: answers each question with
    the next of `answers` (an exception is raised instead, as the service
    raises `InputTimeout`), and keeps the questions."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.questions: list[dict[str, Any]] = []

    async def __call__(self, data: Mapping[str, Any], timeout: float | None) -> Any:
        self.questions.append(dict(data))
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


class Weather:
    """A sync tool (it runs on the database thread) that records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[AgentContext, dict[str, Any]]] = []

    def __call__(self, ctx: AgentContext, city: str) -> dict[str, Any]:
        self.calls.append((ctx, {"city": city}))
        return {"city": city, "sky": "clear"}


def agent_for(fake: FakeOpenAI, tools: dict[str, Any], **options: Any) -> OpenAIAgent:
    return OpenAIAgent(
        base_url=fake.url, model="fake-model", api_key=KEY, max_retries=0, tools=tools, **options
    )


def context(user: User | None = None, **fields: Any) -> AgentContext:
    return AgentContext("chat", "Weather in Paris?", (), "", "run-1", on_ask=user, **fields)


async def items_of(agent: OpenAIAgent, ctx: AgentContext) -> list[Any]:
    return [item async for item in agent(ctx)]


def events(items: list[Any], kind: str) -> list[dict[str, Any]]:
    return [item["data"] for item in items if isinstance(item, dict) and item["event"] == kind]


def text(items: list[Any]) -> str:
    return "".join(item for item in items if isinstance(item, str))


def quoting(request: Request) -> Reply:
    """The model's next answer: it quotes the tools' results it was sent."""
    told = " | ".join(message["content"] for message in request.tool_messages())
    return Reply(text_chunks("Told: ", told))


def weather_call(call_id: str = "call_1", arguments: str = '{"city": "Paris"}') -> Reply:
    return Reply(tool_call_chunks((call_id, "weather", [arguments[:5], arguments[5:]])))


# -- approval ----------------------------------------------------------------------


async def test_an_approved_call_runs_the_tool_and_the_model_answers_with_its_result(fake):
    weather = Weather()
    fake.replies += [weather_call(), quoting]
    user = User("yes")
    ctx = context(user)
    items = await items_of(agent_for(fake, {"weather": {"function": weather}}), ctx)

    assert user.questions == [
        {
            "kind": "tool_approval",
            "question": "Run the tool weather?",
            "tool": "weather",
            "arguments": {"city": "Paris"},
            "tool_call_id": "call_1",
            "choices": ["yes", "no"],
        }
    ]
    assert weather.calls == [(ctx, {"city": "Paris"})]
    assert text(items) == 'Told: {"city": "Paris", "sky": "clear"}'
    assert events(items, "tool_call") == [
        {
            "index": 0,
            "id": "call_1",
            "type": "function",
            "name": "weather",
            "arguments": '{"city": "Paris"}',
        }
    ]
    assert events(items, "tool_result") == [
        {"id": "call_1", "name": "weather", "ok": True, "declined": False}
    ]
    kinds = [item["event"] if isinstance(item, dict) else "text" for item in items]
    assert kinds == ["tool_call", "usage", "tool_result", "text", "text", "usage"]

    first, second = (request.body for request in fake.requests)
    tools = [
        {
            "type": "function",
            "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}},
        }
    ]
    assert first["tools"] == second["tools"] == tools
    assert second["messages"][-2:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"city": "Paris", "sky": "clear"}'},
    ]


@pytest.mark.parametrize("answer", ["yes", " Yes ", "YES", True, {"approved": True, "reason": ""}])
def test_a_yes_is_the_string_yes_true_or_approved_true(answer):
    assert approves(answer) is True


@pytest.mark.parametrize(
    "answer", ["no", "y", "yes please", "", False, None, 1, ["yes"], {"approved": "yes"}, {}]
)
def test_anything_else_is_a_no(answer):
    assert approves(answer) is False


@pytest.mark.parametrize("answer", ["no", {"approved": False}, "maybe"])
async def test_a_declined_call_is_not_run_and_the_model_is_told(fake, answer):
    weather = Weather()
    fake.replies += [weather_call(), quoting]
    items = await items_of(
        agent_for(fake, {"weather": {"function": weather}}), context(User(answer))
    )
    assert weather.calls == []
    assert fake.requests[-1].tool_messages() == [
        {"role": "tool", "tool_call_id": "call_1", "content": DECLINED}
    ]
    assert text(items) == f"Told: {DECLINED}"
    assert events(items, "tool_result") == [
        {"id": "call_1", "name": "weather", "ok": False, "declined": True}
    ]


async def test_no_answer_in_time_is_a_no_and_the_model_is_told_so(fake):
    weather = Weather()
    fake.replies += [weather_call(), quoting]
    user = User(InputTimeout("request-1", 600))
    items = await items_of(agent_for(fake, {"weather": {"function": weather}}), context(user))
    assert weather.calls == [] and len(user.questions) == 1
    assert text(items) == f"Told: {NO_ANSWER}"
    assert events(items, "tool_result")[0]["declined"] is True


async def test_arguments_too_large_to_ask_about_are_not_run(fake):
    # ctx.ask refuses a question over MAX_INPUT_BYTES with ValueError.
    weather = Weather()
    fake.replies += [weather_call(), quoting]
    user = User(ValueError("over MAX_INPUT_BYTES"))
    items = await items_of(agent_for(fake, {"weather": {"function": weather}}), context(user))
    assert weather.calls == []
    assert text(items) == f"Told: {TOO_LARGE_TO_ASK}"
    assert events(items, "tool_result")[0] == {
        "id": "call_1",
        "name": "weather",
        "ok": False,
        "declined": False,
    }


async def test_a_tool_without_approval_runs_without_asking(fake):
    weather = Weather()
    fake.replies += [weather_call(), quoting]
    user = User()  # no answer to give: asking would fail the test
    tools = {"weather": {"function": weather, "approval": False}}
    items = await items_of(agent_for(fake, tools), context(user))
    assert user.questions == [] and len(weather.calls) == 1
    assert text(items) == 'Told: {"city": "Paris", "sky": "clear"}'


async def test_each_call_of_a_round_is_asked_about_in_turn_and_answered_by_its_id(fake):
    weather = Weather()
    pieces = ['{"city": "Paris"}']
    fake.replies += [
        Reply(tool_call_chunks(("call_a", "weather", pieces), ("call_b", "weather", pieces))),
        quoting,
    ]
    user = User("yes", "no")
    await items_of(agent_for(fake, {"weather": {"function": weather}}), context(user))
    assert [q["tool_call_id"] for q in user.questions] == ["call_a", "call_b"]
    assert len(weather.calls) == 1
    assert fake.requests[-1].tool_messages() == [
        {"role": "tool", "tool_call_id": "call_a", "content": '{"city": "Paris", "sky": "clear"}'},
        {"role": "tool", "tool_call_id": "call_b", "content": DECLINED},
    ]


async def test_a_run_stopped_while_waiting_for_the_user_reports_no_usage_twice(fake):
    fake.replies.append(Reply([*weather_call().events, usage_chunk(10, 5)]))
    asked = asyncio.Event()

    async def never_answers(data: Mapping[str, Any], timeout: float | None) -> Any:
        asked.set()
        await asyncio.Event().wait()

    reports: list[Any] = []
    ctx = AgentContext("chat", "Hi", (), "", "run-1", on_ask=never_answers, on_usage=reports.append)
    items: list[Any] = []

    async def consume() -> None:
        async for item in agent_for(fake, {"weather": {"function": Weather()}})(ctx):
            items.append(item)

    task = asyncio.create_task(consume(), name="consume the agent")
    await asyncio.wait_for(asked.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert events(items, "usage")[0]["input_tokens"] == 10  # yielded before asking
    assert reports == []


# -- what the model is told when a call cannot run ---------------------------------


@pytest.mark.parametrize(
    ("arguments", "told", "sent_back"),
    [
        ('{"city": "Par', "The arguments are not valid JSON (Unterminated string", "{}"),
        ('["Paris"]', "The arguments must be a JSON object: the call was not run.", "{}"),
        (
            '{"town": "Paris"}',
            "The arguments do not fit weather: missing a required argument: 'city'",
            '{"town": "Paris"}',
        ),
        (
            '{"city": "Paris", "days": 3}',
            "The arguments do not fit weather: got an unexpected keyword argument 'days'",
            '{"city": "Paris", "days": 3}',
        ),
    ],
)
async def test_arguments_that_do_not_fit_are_not_run_nor_asked_about(
    fake, arguments, told, sent_back
):
    weather = Weather()
    fake.replies += [weather_call(arguments=arguments), quoting]
    user = User()
    items = await items_of(agent_for(fake, {"weather": {"function": weather}}), context(user))
    assert weather.calls == [] and user.questions == []
    [message] = fake.requests[-1].tool_messages()
    assert message["content"].startswith(told)
    assert text(items) == f"Told: {message['content']}"
    assert events(items, "tool_result")[0]["ok"] is False
    # Arguments that are not a JSON object go back as {}: some servers parse
    # the history's arguments and refuse the request otherwise.
    assistant = fake.requests[-1].body["messages"][-2]
    assert assistant["tool_calls"][0]["function"]["arguments"] == sent_back


async def test_a_call_of_an_unknown_tool_tells_the_model_which_tools_there_are(fake):
    fake.replies += [Reply(tool_call_chunks(("call_1", "wether", ["{}"]))), quoting]
    tools = {"weather": {"function": Weather()}, "time": {"function": Weather()}}
    items = await items_of(agent_for(fake, tools), context(User()))
    assert text(items) == "Told: There is no tool named 'wether': the tools are weather, time."
    assert events(items, "tool_result") == [
        {"id": "call_1", "name": "wether", "ok": False, "declined": False}
    ]


async def test_a_tool_error_tells_the_model_its_message_and_the_run_goes_on(fake):
    def weather(ctx: AgentContext, city: str) -> str:
        raise ToolError(f"No station in {city}.")

    fake.replies += [weather_call(), quoting]
    tools = {"weather": {"function": weather, "approval": False}}
    items = await items_of(agent_for(fake, tools), context())
    assert text(items) == "Told: The tool weather failed: No station in Paris."
    assert events(items, "tool_result")[0]["ok"] is False


async def test_any_other_failure_of_a_tool_is_logged_and_the_model_only_told_it_failed(
    fake, caplog
):
    async def weather(ctx: AgentContext, city: str) -> str:
        raise RuntimeError("password=hunter2")

    fake.replies += [weather_call(), quoting]
    tools = {"weather": {"function": weather, "approval": False}}
    with caplog.at_level(logging.ERROR, logger="detached_runs"):
        items = await items_of(agent_for(fake, tools), context())
    assert text(items) == "Told: The tool weather failed."
    assert "hunter2" not in json.dumps(fake.requests[-1].body)
    assert "Run run-1: the tool weather failed" in caplog.text and "hunter2" in caplog.text


async def test_a_result_that_is_not_json_is_a_failure(fake):
    fake.replies += [weather_call(), quoting]
    tools = {"weather": {"function": lambda ctx, city: object(), "approval": False}}
    items = await items_of(agent_for(fake, tools), context())
    assert text(items) == "Told: The tool weather failed."


async def test_an_async_tool_is_awaited_and_its_result_sent_as_json_or_as_its_text(fake):
    async def weather(ctx: AgentContext, city: str) -> Any:
        await asyncio.sleep(0)
        return {"on": datetime.date(2025, 1, 2), "degrees": decimal.Decimal("4.5")}

    class Forecast:
        async def __call__(self, ctx: AgentContext) -> str:
            return "Rain."

    forecast = Forecast()  # an object with an async __call__ is awaited too

    fake.replies += [
        Reply(tool_call_chunks(("c1", "weather", ['{"city": "Paris"}']), ("c2", "forecast", []))),
        quoting,
    ]
    tools = {
        "weather": {"function": weather, "approval": False},
        "forecast": {"function": forecast, "approval": False},
    }
    items = await items_of(agent_for(fake, tools), context())
    # No arguments at all (an empty string) are no arguments.
    assert text(items) == 'Told: {"on": "2025-01-02", "degrees": "4.5"} | Rain.'


# -- rounds and usage --------------------------------------------------------------


async def test_text_around_the_tool_calls_streams_as_two_paragraphs(fake):
    fake.replies += [
        Reply(tool_call_chunks(("c", "weather", ['{"city": "Oslo"}']), content="Let me look.")),
        Reply(text_chunks("It is clear.")),
    ]
    tools = {"weather": {"function": Weather(), "approval": False}}
    items = await items_of(agent_for(fake, tools), context())
    assert text(items) == "Let me look.\n\nIt is clear."
    assert fake.requests[-1].body["messages"][-2]["content"] == "Let me look."


async def test_a_model_that_keeps_calling_tools_is_stopped_after_max_tool_rounds(fake):
    weather = Weather()
    fake.replies += [weather_call(f"call_{n}") for n in range(4)]
    tools = {"weather": {"function": weather, "approval": False}}
    items = await items_of(agent_for(fake, tools, max_tool_rounds=2), context())
    assert len(fake.requests) == 3 and len(weather.calls) == 2
    assert len(events(items, "tool_call")) == 3  # the last round's is told, not run
    assert len(events(items, "tool_result")) == 2
    assert items[-1] == {"event": "finish", "data": {"reason": "max_tool_rounds"}}


async def test_the_usage_of_every_round_is_summed_into_the_runs(fake):
    fake.replies += [
        Reply([*weather_call().events, usage_chunk(100, 10)]),
        Reply(
            [
                *text_chunks("Clear."),
                usage_chunk(
                    150,
                    20,
                    prompt_tokens_details={"cached_tokens": 100},
                    completion_tokens_details={"reasoning_tokens": 5},
                ),
            ]
        ),
    ]
    tools = {"weather": {"function": Weather(), "approval": False}}
    prices = {"fake-model": {"input": 1.0, "cached_input": 0.5, "output": 4.0}}
    items = await items_of(agent_for(fake, tools, prices=prices), context())
    first, total = events(items, "usage")
    assert first["input_tokens"] == 100 and first["output_tokens"] == 10
    assert total == {
        "input_tokens": 250,
        "output_tokens": 30,
        "total_tokens": 280,
        "cached_input_tokens": 100,
        "reasoning_tokens": 5,
        "model": "fake-model-2024",
        "cost": (150 * 1.0 + 100 * 0.5 + 30 * 4.0) / 1_000_000,
    }


async def test_a_round_without_the_endpoints_usage_makes_the_sum_an_estimate(fake):
    fake.replies += [
        Reply([*weather_call().events, usage_chunk(100, 10)]),
        Reply(text_chunks("12345678")),  # no usage chunk: 2 tokens written
    ]
    tools = {"weather": {"function": Weather(), "approval": False}}
    items = await items_of(agent_for(fake, tools), context())
    total = events(items, "usage")[-1]
    assert total["estimated"] is True
    assert total["output_tokens"] == 12 and total["input_tokens"] > 100


@pytest.mark.django_db(transaction=True)
async def test_a_run_through_the_service_logs_the_call_its_result_and_saves_the_sum(fake):
    weather = Weather()
    fake.replies += [
        Reply([*weather_call().events, usage_chunk(100, 10)]),
        Reply([*text_chunks("Clear in ", "Paris."), usage_chunk(150, 20)]),
    ]
    agent = agent_for(fake, {"weather": {"function": weather, "approval": False}})
    await runs.start("chat", prompt="Weather in Paris?", agent=agent)
    async with asyncio.timeout(10):
        logged = [event async for event in runs.subscribe("chat")]
    assert [e.event for e in logged if e.event not in ("delta", "start")] == [
        "tool_call",
        "usage",
        "tool_result",
        "usage",
        "done",
    ]
    assert text_of(logged) == "Clear in Paris."
    assert logged[-1].data == {"status": "done"}
    run = await runs.status("chat")
    assert run is not None and run.usage["input_tokens"] == 250
    assert weather.calls[0][0].run_id == str(run.id)  # the tool got the run's context


@pytest.mark.django_db(transaction=True)
async def test_an_approval_through_the_service_waits_for_the_users_answer(fake):
    """The whole path: the agent asks through the service (``ctx.ask``), the
    run waits, the question is in its status, the answer comes through
    `runs.answer`, and the tool runs on it."""
    weather = Weather()
    fake.replies += [weather_call(), quoting]
    agent = agent_for(fake, {"weather": {"function": weather, "description": "The weather."}})
    await runs.start("chat", prompt="Weather in Paris?", agent=agent)

    async def waiting() -> bool:
        run = await runs.status("chat")
        return run is not None and run.status == "waiting"

    await eventually(waiting, "the run never waited for the approval", timeout=10)
    run = await runs.status("chat")
    assert run is not None
    asked = run.as_json()["input_request"]
    assert (asked["kind"], asked["tool"], asked["arguments"]) == (
        "tool_approval",
        "weather",
        {"city": "Paris"},
    )
    assert weather.calls == []  # not before the answer
    await runs.answer("chat", {"request": asked["request"], "value": "yes"})
    async with asyncio.timeout(10):
        logged = [event async for event in runs.subscribe("chat")]
    assert [e.event for e in logged if e.event in ("input_required", "input_received")] == [
        "input_required",
        "input_received",
    ]
    assert text_of(logged) == 'Told: {"city": "Paris", "sky": "clear"}'
    assert [call[1] for call in weather.calls] == [{"city": "Paris"}]


# -- the arguments' JSON, however it is cut ----------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children),
    max_leaves=8,
)


@st.composite
def cut_arguments(draw: Any) -> tuple[dict[str, Any], str, list[str]]:
    """Arguments, their JSON as a model may write it, and that JSON cut into
    pieces at arbitrary points (some empty)."""
    arguments = draw(st.dictionaries(st.text().filter(lambda k: k != "ctx"), json_values))
    written = json.dumps(
        arguments, ensure_ascii=draw(st.booleans()), indent=draw(st.none() | st.just(1))
    )
    cuts = sorted(draw(st.lists(st.integers(0, len(written)), max_size=8)))
    pieces = [
        written[start:end] for start, end in zip([0, *cuts], [*cuts, len(written)], strict=True)
    ]
    return arguments, written, pieces


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cut_arguments())
def test_arguments_cut_anywhere_across_chunks_reach_the_tool_whole(case):
    arguments, written, pieces = case
    received: list[dict[str, Any]] = []

    def echo(ctx: AgentContext, **given: Any) -> str:
        received.append(given)
        return "ok"

    async def scenario() -> None:
        async with FakeOpenAI() as fake:
            fake.replies += [
                Reply(tool_call_chunks(("c", "echo", pieces))),
                Reply(text_chunks("Done.")),
            ]
            user = User({"approved": True})
            items = await items_of(agent_for(fake, {"echo": {"function": echo}}), context(user))
            assert user.questions[0]["arguments"] == arguments
            assert events(items, "tool_call")[0]["arguments"] == written
            sent = fake.requests[-1].body["messages"][-2]["tool_calls"][0]["function"]
            assert sent["arguments"] == written

    asyncio.run(scenario())
    assert received == [arguments]


# -- configuration -----------------------------------------------------------------


def lookup(ctx: AgentContext, city: str) -> str:
    """A tool the settings name by its dotted path."""
    return city


NOT_CALLABLE = 42


def test_the_settings_name_tools_by_dotted_path_and_default_to_approval():
    agent = OpenAIAgent(
        model="m",
        api_key=KEY,
        tools={
            "lookup": {
                "function": "tests.test_openai_tools.lookup",
                "description": "Look a city up.",
                "parameters": SCHEMA,
            }
        },
    )
    tool = agent.config().tools["lookup"]
    assert tool.function is lookup and tool.approval is True
    assert tool.definition() == {
        "type": "function",
        "function": {"name": "lookup", "parameters": SCHEMA, "description": "Look a city up."},
    }


@pytest.mark.parametrize(
    ("tools", "message"),
    [
        (["lookup"], "TOOLS must be a dict of tool names"),
        ({"look up": {"function": lookup}}, "a tool's name must be 1 to 64 letters"),
        ({"lookup": "tests.test_openai_tools.lookup"}, r"TOOLS\['lookup'\] must be a dict"),
        ({"lookup": {"description": "no function"}}, r"TOOLS\['lookup'\] must be a dict"),
        ({"lookup": {"function": lookup, "approve": True}}, r"TOOLS\['lookup'\] must be a dict"),
        ({"lookup": {"function": "tests.nowhere.lookup"}}, "does not import"),
        ({"lookup": {"function": "tests.test_openai_tools.NOT_CALLABLE"}}, "is not callable"),
        ({"lookup": {"function": lookup, "description": 1}}, "'description'] must be a string"),
        ({"lookup": {"function": lookup, "parameters": "city"}}, "the JSON schema"),
        ({"lookup": {"function": lookup, "approval": "yes"}}, "must be True or False"),
    ],
)
def test_a_malformed_tool_is_a_configuration_error_that_says_what_is_wrong(tools, message):
    with pytest.raises(ImproperlyConfigured, match=message):
        OpenAIAgent(model="m", api_key=KEY, tools=tools).config()


def test_tools_in_params_beside_tools_and_a_bad_max_tool_rounds_are_refused():
    tools = {"lookup": {"function": lookup}}
    with pytest.raises(ImproperlyConfigured, match="remove 'tools' from PARAMS"):
        OpenAIAgent(model="m", api_key=KEY, tools=tools, params={"tools": []}).config()
    for rounds in (0, -1, 2.5, True, "8"):
        with pytest.raises(ImproperlyConfigured, match="MAX_TOOL_ROUNDS"):
            OpenAIAgent(model="m", api_key=KEY, max_tool_rounds=rounds).config()


def test_the_system_check_reports_a_tool_that_does_not_import(settings):
    settings.DETACHED_RUNS = {
        "AGENT": "detached_runs.agents.openai.agent",
        "OPENAI": {
            "BASE_URL": "http://127.0.0.1:8001/v1",
            "MODEL": "m",
            "TOOLS": {"lookup": {"function": "tests.nowhere.lookup"}},
        },
    }
    errors = {str(message.id): message.msg for message in check_settings()}
    assert (
        "TOOLS['lookup']['function'] = 'tests.nowhere.lookup' does not import"
        in (errors["detached_runs.E006"])
    )
    settings.DETACHED_RUNS["OPENAI"]["TOOLS"] = {
        "lookup": {"function": "tests.test_openai_tools.lookup"}
    }
    assert check_settings() == []

"""The admin of runs with Django's test client: usage per run in the list and
on its page, the filters on it, the sums for what the list selects, on
whichever database the suite runs (the JSON key casts are SQL); a run's page
as a view without Save buttons, times to the second, and its live view
following a run in flight through its log."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client
from django.utils import timezone

from detached_runs import runs
from detached_runs.admin import RunAdmin
from detached_runs.models import Run

pytestmark = pytest.mark.django_db

URL = "/admin/detached_runs/run/"


@pytest.fixture
def runs_with_usage() -> dict[str, Run]:
    """Five runs: reported usage (big, small), estimated, none, and one whose
    usage has only a model (no tokens). Times to first token 0.5 s, 2 s, 40 s."""
    now = timezone.now()

    def run(key: str, usage: dict[str, Any], ttft: float | None, minutes: int) -> Run:
        started = now - timedelta(minutes=minutes)
        return Run.objects.create(
            session_key=key,
            prompt=f"prompt of {key}",
            status="done",
            usage=usage,
            started_at=started,
            first_token_at=None if ttft is None else started + timedelta(seconds=ttft),
        )

    return {
        "big": run(
            "big",
            {"input_tokens": 1200, "output_tokens": 300, "total_tokens": 1500, "cost": 2.5},
            0.5,
            1,
        ),
        "small": run(
            "small",
            {"input_tokens": 300, "output_tokens": 20, "total_tokens": 320, "cost": 0.004},
            2.0,
            2,
        ),
        "guess": run(
            "guess",
            {
                "input_tokens": 50,
                "output_tokens": 5,
                "total_tokens": 55,
                "cost": 0.05,
                "estimated": True,
            },
            40.0,
            3,
        ),
        "bare": run("bare", {}, None, 4),
        "model": run("model", {"model": "m"}, None, 5),
    }


def listed(content: bytes) -> list[str]:
    """The session keys of the list's rows, in order."""
    return re.findall(r'<td class="field-session">([^<]*)</td>', content.decode())


def totals(content: bytes) -> str:
    match = re.search(r'<p class="detached-runs-usage-totals">(.*?)</p>', content.decode(), re.S)
    assert match is not None, "no totals"
    return " ".join(re.sub(r"<[^>]+>", "", match[1]).split())


def test_the_list_shows_each_runs_tokens_cost_and_time_to_first_token(
    admin_client, runs_with_usage
):
    page = admin_client.get(URL)
    assert page.status_code == 200
    html = page.content.decode()
    for header in ("total tokens", "cost", "time to first token"):
        assert header in html.lower()
    assert '<td class="field-total_tokens">1,500</td>' in html
    assert '<td class="field-cost">2.5</td>' in html
    assert '<td class="field-cost">0.004</td>' in html
    assert '<td class="field-time_to_first_token">0.50 s</td>' in html
    # An estimate says so; a run without usage shows none.
    assert '<td class="field-total_tokens">≈ 55</td>' in html
    assert '<td class="field-cost">≈ 0.05</td>' in html
    assert html.count('<td class="field-total_tokens">-</td>') == 2


@pytest.mark.parametrize(
    ("query", "keys"),
    [
        ("usage=reported", {"big", "small"}),
        ("usage=estimated", {"guess"}),
        ("usage=none", {"bare", "model"}),
        ("cost=none", {"bare", "model"}),
        ("cost=lt0.01", {"small"}),
        ("cost=0.01-0.1", {"guess"}),
        ("cost=ge1", {"big"}),
        ("ttft=lt1", {"big"}),
        ("ttft=1-5", {"small"}),
        ("ttft=ge30", {"guess"}),
        ("ttft=none", {"bare", "model"}),
        ("usage=reported&ttft=1-5", {"small"}),
    ],
)
def test_the_filters_select_runs_by_usage_cost_and_time_to_first_token(
    admin_client, runs_with_usage, query, keys
):
    page = admin_client.get(f"{URL}?{query}")
    assert page.status_code == 200
    assert set(listed(page.content)) == keys


def test_the_sums_cover_every_run_the_filters_select_on_every_page(
    admin_client, runs_with_usage, monkeypatch
):
    monkeypatch.setattr(RunAdmin, "list_per_page", 2)
    page = admin_client.get(URL)
    assert len(listed(page.content)) == 2  # a page of two, the sums of five
    assert totals(page.content) == (
        "5 runs selected: 1,550 input tokens, 325 output tokens, 1,875 in total, "
        "cost 2.554, mean time to first token 14.17 s (1 run estimated)"
    )
    page = admin_client.get(f"{URL}?usage=reported&q=small")
    assert totals(page.content) == (
        "1 run selected: 300 input tokens, 20 output tokens, 320 in total, "
        "cost 0.004, mean time to first token 2.00 s"
    )
    page = admin_client.get(f"{URL}?usage=none")
    assert totals(page.content) == (
        "2 runs selected: 0 input tokens, 0 output tokens, 0 in total, "
        "cost 0, mean time to first token -"
    )


def test_the_columns_sort_as_numbers(admin_client, runs_with_usage):
    column = RunAdmin.list_display.index("total_tokens") + 1
    page = admin_client.get(f"{URL}?usage=reported&o=-{column}")
    assert listed(page.content) == ["big", "small"]  # 1500 before 320, not as text
    page = admin_client.get(f"{URL}?usage=reported&o={column}")
    assert listed(page.content) == ["small", "big"]
    cost = RunAdmin.list_display.index("cost") + 1
    page = admin_client.get(f"{URL}?o=-{cost}")
    priced = [key for key in listed(page.content) if key not in ("bare", "model")]
    assert priced == ["big", "guess", "small"]  # 2.5, 0.05, 0.004 (unpriced: where NULLs go)
    ttft = RunAdmin.list_display.index("time_to_first_token") + 1
    page = admin_client.get(f"{URL}?ttft=lt1&o={ttft}")
    assert page.status_code == 200 and listed(page.content) == ["big"]


def test_a_runs_page_shows_its_usage_read_only(admin_client, runs_with_usage):
    run = runs_with_usage["guess"]
    page = admin_client.get(f"{URL}{run.pk}/change/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "Usage" in html and "≈ 55" in html and "40.00 s" in html
    assert "&quot;estimated&quot;: true" in html  # the usage itself, as JSON
    assert 'name="usage"' not in html  # nothing is editable


def test_an_action_still_redirects(admin_client, runs_with_usage):
    reply = admin_client.post(
        URL, {"action": "stop_runs", "_selected_action": [str(runs_with_usage["big"].pk)]}
    )
    assert reply.status_code == 302


# -- a run's page: a view, times to the second ---------------------------------------


def test_a_runs_page_is_a_view_without_save_buttons_and_refuses_a_post(
    admin_client, runs_with_usage
):
    run = runs_with_usage["big"]
    page = admin_client.get(f"{URL}{run.pk}/change/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "View run" in html
    for button in ('name="_save"', 'name="_continue"', 'name="_addanother"', 'name="_saveasnew"'):
        assert button not in html
    # Deleting a run stays as it was: for whoever has the delete permission.
    assert f"{URL}{run.pk}/delete/" in html
    reply = admin_client.post(f"{URL}{run.pk}/change/", {"prompt": "changed"})
    assert reply.status_code == 403
    run.refresh_from_db()
    assert run.prompt == "prompt of big"


def test_the_list_and_a_runs_page_show_times_to_the_second(admin_client, settings):
    settings.TIME_ZONE = "Europe/Paris"  # the times show in the current time zone
    started = datetime(2025, 1, 31, 13, 5, 9, 123456, tzinfo=UTC)
    run = Run.objects.create(
        session_key="times",
        prompt="p",
        status="done",
        started_at=started,
        first_token_at=started + timedelta(seconds=1.5),
        updated_at=started + timedelta(seconds=2),
        finished_at=started + timedelta(seconds=3.25),
    )
    listing = admin_client.get(URL).content.decode()
    assert "2025-01-31 14:05:09" in listing  # started, in Paris
    html = admin_client.get(f"{URL}{run.pk}/change/").content.decode()
    for moment in ("14:05:09", "14:05:10", "14:05:11", "14:05:12"):
        assert f"2025-01-31 {moment}" in html  # started, first token, checkpoint, finished
    assert "123456" not in listing + html and "p.m." not in listing + html


def test_the_lists_long_values_are_cut_with_the_whole_in_their_title(admin_client):
    Run.objects.create(session_key="k" * 64, owner="anon:" + "a" * 32, prompt="word " * 100)
    html = admin_client.get(URL).content.decode()
    assert f'<span title="{"k" * 64}">{"k" * 19}…</span>' in html
    assert f'<span title="{"word " * 99}word">{("word " * 8)[:39]}…</span>' in html
    owner = re.search(r'<td class="field-owner_excerpt">(.*?)</td>', html)
    assert owner is not None and owner[1].endswith("…</span>")


# -- the events of a run's log, and its live view --------------------------------------


def test_an_ended_runs_page_says_its_log_is_no_longer_kept(admin_client, runs_with_usage):
    # The backend holds no log of these runs: the database is all there is.
    run = runs_with_usage["big"]
    html = admin_client.get(f"{URL}{run.pk}/change/").content.decode()
    assert "Log no longer kept" in html
    assert 'data-in-flight="false"' in html
    live = admin_client.get(f"{URL}{run.pk}/live/").json()
    assert live["in_flight"] is False and live["log"] is None
    assert live["status"] == "done" and live["usage"]["total_tokens"] == 1500
    assert live["time_to_first_token"] == 0.5
    assert "Log no longer kept" in live["events_html"]


def test_the_live_view_is_refused_to_anyone_not_staff(client, runs_with_usage):
    url = f"{URL}{runs_with_usage['big'].pk}/live/"
    anonymous = client.get(url)
    assert anonymous.status_code == 302 and "/admin/login/" in anonymous["Location"]
    users = get_user_model().objects
    client.force_login(users.create_user("visitor"))
    refused = client.get(url)
    assert refused.status_code == 302 and "/admin/login/" in refused["Location"]
    # Staff without the permission to view runs: a JSON refusal.
    staff = users.create_user("staff", is_staff=True)
    client.force_login(staff)
    reply = client.get(url)
    assert reply.status_code == 403 and reply.json() == {"error": "You may not view this run."}
    staff.user_permissions.add(Permission.objects.get(codename="view_run"))
    client.force_login(users.get(pk=staff.pk))
    allowed = client.get(url)
    assert allowed.status_code == 200 and allowed.json()["id"] == str(runs_with_usage["big"].pk)


def test_the_live_view_of_an_unknown_run_is_404_and_takes_only_get(admin_client):
    reply = admin_client.get(f"{URL}{uuid.uuid4()}/live/")
    assert reply.status_code == 404 and reply.json() == {"error": "No such run."}
    run = Run.objects.create(session_key="post", prompt="p", status="done")
    assert admin_client.post(f"{URL}{run.pk}/live/").status_code == 405


async def live(client: Client, run: Run) -> dict[str, Any]:
    """What the run's live view says now (the admin's sync view, called from
    a thread as Django's ASGI handler does: it reaches the test's loop)."""
    reply = await sync_to_async(client.get)(f"{URL}{run.pk}/live/")
    assert reply.status_code == 200, reply.content
    body: dict[str, Any] = reply.json()
    return body


async def live_until(client: Client, run: Run, check: Any, what: str) -> dict[str, Any]:
    """Poll the live view until ``check(answer)``; fail with ``what`` after 10 s."""
    deadline = asyncio.get_running_loop().time() + 10
    while not check(answer := await live(client, run)):
        assert asyncio.get_running_loop().time() < deadline, f"{what}: {answer}"
        await asyncio.sleep(0.02)
    return answer


@pytest.fixture
def staff_client(django_db_blocker: Any) -> Client:
    with django_db_blocker.unblock():
        admin = get_user_model().objects.create_superuser("boss", "b@example.com", "pw")
    client = Client()
    client.force_login(admin)
    return client


@pytest.mark.django_db(transaction=True)
async def test_the_live_view_follows_a_runs_growing_text_through_its_log(staff_client, config):
    config(CHECKPOINT_EVERY=3600)  # the row holds no text until the run ends
    run = await runs.start("live", prompt="400")  # w0 w1 ... w399, a word every 10 ms
    first = await live_until(staff_client, run, lambda answer: answer["output"], "no text came")
    later = await live_until(
        staff_client,
        run,
        lambda answer: len(answer["output"]) > len(first["output"]),
        "the text did not grow",
    )
    assert later["in_flight"] and later["status"] == "running"
    assert later["output"].startswith(first["output"])
    # Read through the run's log: its row has none of it yet.
    assert (await Run.objects.aget(pk=run.pk)).output == ""
    assert later["fields"]["output_text"] == later["output"]
    assert later["last_event_id"].startswith(run.id.hex + ":")
    assert later["log"]["events"]["start"] == 1 and "done" not in later["log"]["events"]
    assert later["log"]["text_chars"] >= len(later["output"])
    assert later["time_to_first_token"] is not None and later["time_to_first_token"] >= 0
    page = await sync_to_async(staff_client.get)(f"{URL}{run.pk}/change/")
    html = page.content.decode()
    assert 'data-in-flight="true"' in html and f'data-live-url="{URL}{run.pk}/live/"' in html
    assert '<tr class="detached-runs-event-start">' in html
    assert 'src="/static/detached_runs/admin-live.js"' in html

    assert await runs.stop("live")
    ended = await live_until(
        staff_client, run, lambda answer: not answer["in_flight"], "the run did not end"
    )
    row = await Run.objects.aget(pk=run.pk)
    assert ended["status"] == row.status == "stopped"
    assert ended["output"] == row.output and ended["output"].startswith(later["output"])
    # Its log is still kept (EVICT_AFTER): every event, the end too.
    assert ended["log"]["events"]["start"] == ended["log"]["events"]["done"] == 1
    assert ended["log"]["text_chars"] == len(row.output)
    assert ended["log"]["last_event_id"] == row.last_event_id
    assert '<tr class="detached-runs-event-done">' in ended["events_html"]


@pytest.mark.django_db(transaction=True)
async def test_the_live_view_counts_the_agents_own_events(staff_client):
    from .agents import script

    tool = {"event": "tool", "data": {}}
    reads = {"event": "usage", "data": {"input_tokens": 5}}
    writes = {"event": "usage", "data": {"output_tokens": 2}}
    prompt = script(["a ", reads, "b ", tool, tool, writes])
    run = await runs.start("events", prompt=prompt)
    ended = await live_until(
        staff_client, run, lambda answer: not answer["in_flight"], "the run did not end"
    )
    assert ended["log"]["events"] == {"start": 1, "usage": 2, "tool": 2, "done": 1}
    assert ended["log"]["text_chars"] == len("a b ")
    assert ended["usage"] == {"input_tokens": 5, "output_tokens": 2}

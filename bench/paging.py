"""Benchmark of the conversations' pages (`detached_runs.listing`) on a full table.

    .venv/bin/python bench/paging.py [--sizes 100 100000] [--repeat 21] [--explain]
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/<scratch db> .venv/bin/python bench/paging.py

Fills the ``Run`` table (bulk_create, then ``ANALYZE``; ``VACUUM ANALYZE`` on
PostgreSQL) with 100 and with 100,000 runs, in three layouts, and times the
queries of one page of each list, the median of ``--repeat`` runs of each (the
database's own caches warm, as on a live site):

- ``chat``: one owner; sessions of 10 runs whose runs follow each other in
  time (a conversation, then the next), plus one long session of half the
  runs (the runs list's deep page);
- ``owners``: the same sessions shared among 10 owners, the long one
  another owner's: the requester has a tenth of the sessions, 5% of the runs;
- ``interleaved``: one owner, the runs of the sessions of 10 shuffled in time
  (every conversation goes on all the time): the sessions list's worst case,
  since a page skips every run that is not the latest of its session.

For each: the first and the last page of the sessions list (20 a page) and of
the long session's runs (50 a page), and, for comparison, what the
alternatives cost: the runs' last page by OFFSET, and the sessions' first page
by ``GROUP BY session_key`` (``MAX(started_at)`` per session, then sorted). It
prints milliseconds and the ratio 100k/100 (1.0: a page costs the same
whatever the table holds). ``--explain`` prints the plans of the two lists'
last pages on the largest table of the ``owners`` layout (of the last layout
measured, without it), with ``ANALYZE`` on PostgreSQL.

SQLite (the default) uses a scratch file in a temporary directory. With
``DATABASE_URL`` the database must exist and be a scratch one: the script
migrates it and empties the runs table before each fill.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SESSIONS_LIMIT, RUNS_LIMIT = 20, 50
LAYOUTS = ("chat", "owners", "interleaved")
OWNER = "user:0"
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def setup_django(scratch: str) -> None:
    url = os.environ.get("DATABASE_URL")
    if url:
        os.environ["BENCH_DATABASE_URL"] = url
    else:
        os.environ["BENCH_DB"] = str(Path(scratch) / "paging.sqlite3")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


def fill(size: int, layout: str) -> dict[str, Any]:
    """Empty the table and fill it with ``size`` runs in ``layout``; return
    what the timings need: the long session's key and the points (started_at,
    id) of the pages to time, worked out from the rows as made."""
    from django.db import connection

    from detached_runs.listing import Point
    from detached_runs.models import Run

    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {Run._meta.db_table}")
    rng = random.Random(size)
    long_runs = size // 2
    short = size - long_runs
    owners = [f"user:{i}" for i in range(10)] if layout == "owners" else [OWNER]
    sessions = [(f"s{i}", owners[i % len(owners)]) for i in range((short + 9) // 10)]
    chats = [session for session in sessions for _ in range(10)][:short]
    if layout == "interleaved":
        rng.shuffle(chats)
    # (session, owner) of each run, in the order they start: the long session
    # goes on all along, between the others (a random merge of the two); with
    # several owners it is another owner's.
    plan: list[tuple[str, str]] = []
    left_long, left_chats = long_runs, iter(chats)
    for left in range(size, 0, -1):
        if rng.randrange(left) < left_long:
            plan.append(("long", owners[-1]))
            left_long -= 1
        else:
            plan.append(next(left_chats))
    rows = [
        Run(
            id=uuid.UUID(int=rng.getrandbits(128)),
            session_key=session,
            owner=owner,
            prompt=f"Question {index} of {session}: " + "word " * 20,
            output="answer " * 40,
            status="done",
            worker="bench",
            started_at=EPOCH + timedelta(seconds=index),
            updated_at=EPOCH + timedelta(seconds=index + 1),
            finished_at=EPOCH + timedelta(seconds=index + 1),
        )
        for index, (session, owner) in enumerate(plan)
    ]
    Run.objects.bulk_create(rows, batch_size=2000)
    # The planner's statistics and (PostgreSQL) the visibility map that
    # index-only scans need, as autovacuum leaves a live table.
    with connection.cursor() as cursor:
        vacuum = f"VACUUM ANALYZE {Run._meta.db_table}"
        cursor.execute(vacuum if connection.vendor == "postgresql" else "ANALYZE")
    # The points before the last page of each list, from the rows as made.
    latest: dict[str, Run] = {}
    for row in rows:
        latest[row.session_key] = row
    mine = sorted(
        (r for r in latest.values() if r.owner == OWNER),
        key=lambda r: (r.started_at, r.id),
        reverse=True,
    )
    long = [r for r in rows if r.session_key == "long"]  # oldest first
    last_sessions = (len(mine) - 1) // SESSIONS_LIMIT * SESSIONS_LIMIT
    last_runs = (len(long) - 1) // RUNS_LIMIT * RUNS_LIMIT
    point = lambda row: Point(row.started_at, row.id)  # noqa: E731
    return {
        "sessions": len(mine),
        "long": len(long),
        "sessions_deep": point(mine[last_sessions - 1]) if last_sessions else None,
        "runs_deep": point(long[-last_runs]) if last_runs else None,
        "runs_offset": last_runs,
    }


def median_ms(query: Callable[[], Any], repeat: int) -> float:
    query()  # once to warm the caches, untimed
    times = []
    for _ in range(repeat):
        begin = time.perf_counter()
        query()
        times.append(time.perf_counter() - begin)
    return statistics.median(times) * 1000


def measure(shape: dict[str, Any], repeat: int) -> dict[str, float]:
    from django.db.models import Max

    from detached_runs import listing
    from detached_runs.models import Run

    def by_group() -> list[Any]:
        rows = Run.objects.filter(owner=OWNER).values("session_key")
        return list(rows.annotate(last=Max("started_at")).order_by("-last")[:SESSIONS_LIMIT])

    def by_offset() -> list[Run]:
        rows = Run.objects.filter(session_key="long").order_by("-started_at", "-id")
        offset = shape["runs_offset"]
        return list(rows[offset : offset + RUNS_LIMIT])

    return {
        "sessions, first page": median_ms(
            lambda: listing.sessions_page(OWNER, SESSIONS_LIMIT, None), repeat
        ),
        "sessions, last page": median_ms(
            lambda: listing.sessions_page(OWNER, SESSIONS_LIMIT, shape["sessions_deep"]), repeat
        ),
        "runs, first page": median_ms(lambda: listing.runs_page("long", RUNS_LIMIT, None), repeat),
        "runs, last page": median_ms(
            lambda: listing.runs_page("long", RUNS_LIMIT, shape["runs_deep"]), repeat
        ),
        "(sessions, first page by GROUP BY)": median_ms(by_group, repeat),
        "(runs, last page by OFFSET)": median_ms(by_offset, repeat),
    }


def explain(shape: dict[str, Any]) -> None:
    from django.db import connection

    from detached_runs import listing

    postgres = connection.vendor == "postgresql"
    for title, query in (
        (
            "sessions, last page",
            listing.sessions_query(OWNER, shape["sessions_deep"])[: SESSIONS_LIMIT + 1],
        ),
        ("runs, last page", listing.runs_query("long", shape["runs_deep"])[: RUNS_LIMIT + 1]),
        ("runs of a session of 10", listing.runs_query("s0", None)[: RUNS_LIMIT + 1]),
    ):
        print(f"\n-- EXPLAIN {title} ({connection.vendor})")
        print(query.explain(analyze=True) if postgres else query.explain())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 100_000])
    parser.add_argument("--repeat", type=int, default=21)
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--explain", action="store_true", help="print the plans (largest size)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        setup_django(scratch)
        from django.db import connection

        version = ".".join(map(str, connection.get_database_version()))
        print(f"database: {connection.vendor} {version}")
        results: dict[tuple[str, int], dict[str, float]] = {}
        shapes: dict[tuple[str, int], dict[str, Any]] = {}
        for layout in args.layouts:
            for size in args.sizes:
                began = time.perf_counter()
                shapes[layout, size] = shape = fill(size, layout)
                filled = time.perf_counter() - began
                results[layout, size] = measure(shape, args.repeat)
                print(
                    f"{layout:>11} {size:>7} runs: filled in {filled:.1f} s; the owner has "
                    f"{shape['sessions']} sessions, the long session {shape['long']} runs",
                    flush=True,
                )
            last = "owners" if "owners" in args.layouts else args.layouts[-1]
            if args.explain and layout == last:
                explain(shapes[layout, max(args.sizes)])
        small, large = min(args.sizes), max(args.sizes)
        print(f"\nmedian of {args.repeat}, ms; ratio = {large:,} runs / {small:,} runs")
        header = f"{'layout':<12}{'query':<38}{small:>10,}{large:>10,}{'ratio':>8}"
        print(header)
        print("-" * len(header))
        for layout in args.layouts:
            for name, low in results[layout, small].items():
                high = results[layout, large][name]
                print(f"{layout:<12}{name:<38}{low:>10.2f}{high:>10.2f}{high / low:>8.1f}")


if __name__ == "__main__":
    main()

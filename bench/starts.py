"""Starts under load, next to the original in-memory run manager
(`../shared/seed-baseline/`), in one invocation (Step 13's speed scenario).

    .venv/bin/python bench/starts.py [--runs 1000] [--tokens 300] [--rate 30] [--pacing relative]

On each site, under the same daphne and the same client: ``--runs`` runs
started one after another over HTTP (each start awaited before the next is
sent), each followed by one SSE subscriber from its start, each streaming
``--tokens`` tokens at ``--rate`` a second. Meanwhile a plain ``GET`` of the
same site (a JSON view through the whole middleware stack) every 0.1 s.

``--pacing relative`` (the default) has detached_runs' agent pace its tokens
as the original's agent does: a token, then ``asyncio.sleep(1/rate)``, so
both sites are asked for the same work (under load that pace drifts: a run
lasts longer than ``tokens/rate`` seconds and asks for fewer tokens a
second). ``--pacing absolute`` keeps ``bench/sse.py``'s absolute schedule,
which catches up after a late wake-up and so asks more of a loaded server
than the original's agent does of its own.

Reported per site: the whole scenario's seconds (first start to last
terminal event), a start's latency p50/p99 (its request to its answer), the
time from a start's request to its first text byte at the subscriber
p50/p99, the plain GET's p50/p99, and the tokens' latency p99 (yielded by the
agent to read by the subscriber); then the ratios. Figures of one
invocation: the machine is shared, its absolute times swing.

A third column is the bare ceiling of ``bench/sse.py`` on a fresh server of
the detached_runs site: a start answered ``202`` with no row, no registry and
no session, its tokens written straight into the response. What the ceiling
takes is as fast as this client and this machine let the scenario go.

The detached_runs side is `bench/site.py` (SQLite in a scratch file, or
``BENCH_DATABASE_URL``); the original's is the seed's own site, started from
its folder with this virtualenv. The scenario is `bench.sse.scenario`, which
``bench/sse.py --only starts`` runs against the bare ceiling instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sse import App, Ceiling, Side, launch, request, scenario, start_server

#: Where the original is by default: beside the checkout, as in the workspace
#: this project grew in (``--original`` names another folder).
SEED = Path(__file__).resolve().parent.parent.parent / "shared" / "seed-baseline"


class Seed(Side):
    # The seed's agent: data: {"delta": "tok ", "i": <i>, "t": <time.time()>}.
    pattern = re.compile(rb'"t": ([0-9.]+)\}')
    clock = staticmethod(time.time)
    end = b"[DONE]"
    plain = "/noop/plain"

    async def start(self, key: str, tokens: int, rate: float) -> None:
        reply = await request(self.port, "GET", f"/start/{key}?tokens={tokens}&rate={rate}")
        assert reply.status == 200, reply.body

    def events(self, key: str) -> tuple[str, dict[str, str]]:
        return f"/events/{key}", {}


def start_seed(seed: Path = SEED) -> tuple[subprocess.Popen[bytes], int]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    database = Path(tempfile.mkdtemp(prefix="seed-bench-")) / "seed.sqlite3"
    env = dict(os.environ, SEED_DB=str(database), DJANGO_SETTINGS_MODULE="settings", PYTHONPATH=".")
    subprocess.run(
        [sys.executable, "-m", "django", "migrate", "--noinput", "-v0"],
        env=env,
        cwd=seed,
        check=True,
    )
    daphne = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port)]
    return launch([*daphne, "asgi:application"], env, seed, port), port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="runs started (default 1000)")
    parser.add_argument("--tokens", type=int, default=300, help="tokens a run (default 300)")
    parser.add_argument(
        "--rate", type=float, default=30.0, help="tokens a second of a run (default 30)"
    )
    parser.add_argument(
        "--pacing",
        choices=("relative", "absolute"),
        default="relative",
        help="detached_runs' agent paces as the original's (relative, the default) "
        "or on bench/sse.py's absolute schedule",
    )
    parser.add_argument(
        "--original",
        type=Path,
        default=SEED,
        metavar="FOLDER",
        help=f"the original in-memory run manager's site (default {SEED})",
    )
    args = parser.parse_args()
    if not (args.original / "asgi.py").is_file():
        parser.error(
            f"the original is not at {args.original} (no asgi.py there): it is the "
            "workspace's shared/seed-baseline, not part of this repository; name its "
            "folder with --original, or run bench/sse.py --only starts for detached_runs "
            "next to the bare ceiling alone"
        )
    results: dict[str, dict[str, float]] = {}
    for name, begin, kind in (
        ("original", lambda: start_seed(args.original), Seed),
        ("detached_runs", start_server, App),
        ("ceiling", start_server, Ceiling),
    ):
        process, port = begin()
        try:
            side = kind(port, relative=args.pacing == "relative")
            results[name] = asyncio.run(scenario(side, args.runs, args.tokens, args.rate))
        finally:
            process.terminate()
            process.wait(10)
    original, ours, ceiling = (results[n] for n in ("original", "detached_runs", "ceiling"))
    print(f"{'':<18}{'original':>12}{'detached_runs':>15}{'ratio':>8}{'ceiling':>10}")
    for figure in original:
        print(
            f"{figure:<18}{original[figure]:>12.1f}{ours[figure]:>15.1f}"
            f"{ours[figure] / original[figure]:>8.2f}{ceiling[figure]:>10.1f}"
        )
    print(
        f"scenario speed-up over the original: {original['seconds'] / ours['seconds']:.2f}x"
        f" (the ceiling's: {original['seconds'] / ceiling['seconds']:.2f}x);"
        f" start p99 / plain GET p99: {ours['start p99'] / ours['plain GET p99']:.2f}"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Two checkouts side by side in one invocation: bench/sse.py, one scenario at
# a time, alternating between them, so that both meet the same machine load.
#   bench/compare.sh BEFORE_DIR AFTER_DIR [scenario ...]
# e.g. git worktree add /tmp/before <rev> && bench/compare.sh /tmp/before . start resume
# Each tree's bench runs with this checkout's .venv; the server processes it
# starts import the tree's own detached_runs (they run in the tree).
set -euo pipefail
python="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
before=$1 after=$2
shift 2
scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=(burst capacity replay resume memory stalled start)
for scenario in "${scenarios[@]}"; do
    for tree in "$before" "$after"; do
        echo "== $scenario in $tree ($(date +%T))"
        (cd "$tree" && "$python" bench/sse.py --only "$scenario" --repeat "${REPEAT:-3}" 2>/dev/null)
    done
done

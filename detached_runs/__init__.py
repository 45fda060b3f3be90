"""detached_runs: LLM runs that outlive the browser tab.

The service lives in `detached_runs.runs`; import it from there
(``from detached_runs import runs``).
"""

from __future__ import annotations

__version__ = "0.1.0"

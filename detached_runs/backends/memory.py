"""The in-process backend: the embedded default.

Honest about its limits, like Channels' ``InMemoryChannelLayer``: the registry
lives in one ASGI process and one event loop. Run several workers and a
reconnecting browser may land on a worker that never saw the run (it then gets
what the database holds); use the Redis backend for that.

How it keeps DESIGN.md's promises:

* Each run has one log (`detached_runs.backends.log.RunLog`, which the Redis
  backend's copies of other workers' runs are too): consecutive text deltas
  are one UTF-8 buffer, so memory is O(output) and replay is compact by
  construction; a subscriber is a cursor into it (`BaseBackend.subscribe`),
  with no queue of its own.
* Its runs are driven, one at a time per session, by a
  `detached_runs.backends.driver.RunDriver`, as the Redis backend's are: the
  registry, the chain of a session's runs, stop, the final save, eviction.
  This backend only stores: the driver's registry is all there is.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from .base import DELETE_TIMEOUT, BaseBackend, Finalize, RunState, Source, _counted
from .driver import RunDriver
from .log import RunLog


class MemoryBackend(BaseBackend):
    """Runs and their logs in this process. See the module docstring."""

    process_local = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: The runs of this process (all there are: nothing is shared).
        self.driver = RunDriver(self)

    async def start(
        self,
        session_key: str,
        run_id: str,
        source: Source,
        *,
        start_data: dict[str, Any],
        meta: dict[str, Any],
        finalize: Finalize,
        timeout: float | None = None,
    ) -> None:
        await self.driver.start(
            session_key,
            run_id,
            source,
            start_data=start_data,
            meta=meta,
            finalize=finalize,
            timeout=timeout,
        )

    def check_accepting(self) -> None:
        self.driver.check_accepting()

    async def current_log(self, session_key: str) -> RunLog | None:
        return self.driver.runs.get(session_key)

    def released(self, log: RunLog) -> None:
        self.driver.released(log)

    async def stop(self, session_key: str, run_id: str | None = None) -> bool:
        return self.driver.stop(session_key, run_id)

    async def get(self, session_key: str) -> RunState | None:
        run = self.driver.runs.get(session_key)
        return None if run is None else run.state()

    async def count_running(self, owner: str | None = None, *, address: str | None = None) -> int:
        return self.driver.count(*_counted(owner, address))

    async def adopt(self, owner: str, new_owner: str, session_keys: Collection[str] = ()) -> int:
        # Every run the registry holds (in flight or in its grace period) is
        # the driver's: no need of the session keys.
        return len(self.driver.adopt(owner, new_owner))

    async def delete(
        self, session_key: str, run_ids: Collection[str], *, timeout: float = DELETE_TIMEOUT
    ) -> None:
        # The registry is all there is: the session's run here, stopped and
        # waited for if it is one of them, then dropped.
        await self.driver.end(session_key, run_ids, timeout)
        self.driver.forget(session_key, run_ids)

    async def ask(
        self, session_key: str, run_id: str, data: Mapping[str, Any], timeout: float | None
    ) -> Any:
        return await self.driver.ask(session_key, run_id, data, timeout)

    async def answer(self, session_key: str, request: str, value: Any) -> bool:
        return self.driver.answer(session_key, request, value)

    def driven(self, session_key: str, run_id: str) -> RunState | None:
        return self.driver.driven(session_key, run_id)

    async def drain(self, timeout: float) -> None:
        await self.driver.drain(timeout)

    async def shutdown(self, timeout: float) -> None:
        await self.driver.shutdown(timeout)

    def __len__(self) -> int:
        """How many runs the registry holds (for tests and the admin)."""
        return len(self.driver)

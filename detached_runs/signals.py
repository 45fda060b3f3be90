"""Signals about runs, sent by the service (`detached_runs.runs`).

Connect receivers as to any Django signal (in your ``AppConfig.ready()``);
sync and async receivers both work. The sender is the `Run` model class::

    from django.dispatch import receiver
    from detached_runs.models import Run
    from detached_runs.signals import run_finished

    @receiver(run_finished, sender=Run)
    async def count_output(sender, run, status, output, **kwargs):
        ...

``run_started(sender=Run, run=<Run>)``
    Once the run's row is created (status ``running``), before the agent is
    called and before the session's run in flight is stopped.

``run_finished(sender=Run, run=<Run>, status=<str>, output=<str>)``
    Once per run, by the process whose save ends its row: after the final
    save, before the terminal event reaches clients; or, for a run whose
    process died, by the process that finds it orphaned and marks it
    ``interrupted`` (with the output of its last checkpoint, or of the Redis
    log). Not sent while the final save keeps failing: the row is still
    ``running`` then, and is announced when it is found orphaned.

Receivers are awaited where the signal is sent, so a slow one delays the
start, or the terminal event and the next run of the session: hand long work
to a task queue. A receiver that raises is logged (``detached_runs.runs``,
with the run's id) and does not change the run, its save or other receivers.
"""

from __future__ import annotations

from django.dispatch import Signal

run_started = Signal()
run_finished = Signal()

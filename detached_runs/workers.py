"""Worker processes: one id per process, and whether the process an id names
is gone.

The id is written on every run's row (``Run.worker``) and, with the Redis
backend, on its lease; a row or a lease whose process is gone belongs to a
run nobody drives any more (`detached_runs.runs.RunService.resolve`,
`detached_runs.backends.redis.RedisBackend`).
"""

from __future__ import annotations

import os
import secrets
import socket
from datetime import datetime, timedelta

from django.utils import timezone

from .conf import get_config

_ids: dict[int, str] = {}


def worker_id() -> str:
    """This process: ``"host:pid:boot"``, ``boot`` a random hex string (a fork
    gets an id of its own, and a pid the system reuses never names an
    earlier process's runs)."""
    pid = os.getpid()
    if pid not in _ids:
        _ids[pid] = f"{socket.gethostname()}:{pid}:{secrets.token_hex(4)}"
    return _ids[pid]


def process_gone(worker: str) -> bool:
    """Whether ``worker`` (a `worker_id`) names a process of this host that no
    longer exists: known at once, with no heartbeat to wait for. False for
    another host's process, this process, or an id that is not one."""
    host, _, rest = worker.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return pid_gone(int(pid))


def pid_gone(pid: int) -> bool:
    """Whether no process of this host has the id ``pid`` (False for this
    process's own)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def heartbeat_every() -> float:
    """Seconds between heartbeats of a running row (``updated_at``):
    ``max(CHECKPOINT_EVERY, 2)``."""
    return max(float(get_config()["CHECKPOINT_EVERY"]), 2.0)


def stale_after() -> timedelta:
    """How old a running row's heartbeat may be before its process counts as
    dead: three heartbeats plus 5 s."""
    return timedelta(seconds=3 * heartbeat_every() + 5)


def orphaned(worker: str, heartbeat: datetime) -> bool:
    """Whether a run whose row names ``worker`` and last beat at ``heartbeat``
    has lost its process: gone from this host, or silent for `stale_after`."""
    if worker and worker != worker_id() and process_gone(worker):
        return True
    return heartbeat < timezone.now() - stale_after()

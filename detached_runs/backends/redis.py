"""The Redis Streams backend: any worker process, on any host, serves any subscriber.

Install redis-py (``pip install "redis[hiredis]"``, or the package's ``[redis]``
extra, once installed from a checkout: ``pip install -e 'path/to/checkout[redis]'``) and set
``DETACHED_RUNS["BACKEND"] = "detached_runs.backends.redis.RedisBackend"``.

How it works, reusing the memory backend's machinery:

* The worker that starts a run drives it exactly as the memory backend does
  (stop flags, the chain of one session's runs, finalize before the terminal
  event), into a local log. A *writer* task copies that log to the run's Redis
  Stream with ``XADD``, using the event positions as stream ids (``<text
  bytes>-<seq>``), so an event id means the same thing on every worker. What
  piled up while Redis was slow goes as one merged delta; while Redis is
  unreachable the local log is the buffer and the writer retries.
* Any other worker that has subscribers for a run keeps a *mirror* of it: the
  stream replayed with ``XRANGE``, then followed by the worker's one
  ``XREAD BLOCK`` over all the runs it follows (one per slot group on a
  cluster), appended into a local log of the same kind. Local subscribers
  are cursors into that mirror: no blocked Redis connection per subscriber.
  The run is no longer read once the mirror's last local subscriber leaves.
* A run's stream holds at most ``stream_maxlen`` entries
  (``REDIS_STREAM_MAXLEN``). Past that its oldest entries are not dropped
  but compacted, by the same script that appends, into the run's *head*: a
  list beside the stream where consecutive deltas are merged into one whose
  id is the position of its last byte, as a replay merges them, and other
  events are kept as they are. Readers read head and stream together (one
  MULTI), so a bounded stream still replays the whole run, with the ids of
  the worker that runs it. A follower whose next entries were compacted
  before it read them notices (the first entry it gets does not continue its
  mirror) and reads what it lacks from the head. A head is O(output): about
  one entry per `HEAD_PIECE` bytes of text, plus the run's other events. (A
  merged entry cannot go back into the stream: stream ids only grow, and
  ``XDEL`` keeps a deleted entry's bytes until its whole node goes.)
* Keys are hash-tagged per session (``{<prefix>:<session>}``), so one
  session's keys share a slot. When a run ends its keys expire after
  ``EVICT_AFTER`` (eviction is expiry); the database has the rest.
* ``REDIS_URL`` names one server, a Redis Cluster or a master that Sentinel
  watches (`redis_url.parse_redis_url`). On a cluster every command names
  keys of one slot: a session's keys are tagged with one of `SLOT_GROUPS`
  slot groups instead (``{<prefix>:g<n>}:<session>``), and the worker's
  XREAD is one per group; the sets of runs in flight are one key each;
  scripts in pipelines are sent whole; nothing uses MULTI; the time comes
  from one key's primary. With Sentinel, the worker asks where the master
  is at each sweep and before it writes a run's end (`_follow_master`).
* A failover may lose the last writes a primary acknowledged (replication
  is asynchronous): the writer's append names the last id it wrote, and the
  script refuses if the stream ends elsewhere (`redis_scripts.APPEND`); the
  writer then writes from where the stream ends, out of its local log.
* A stop that arrives at another worker is published on ``<prefix>:stop``;
  the worker running the run stops it.
* An agent's question (``ctx.ask``) is pending in the run's hash (``input``):
  an answer, at any worker, is taken by a script that accepts one answer per
  request (`redis_scripts.ANSWER`) and keeps its value in the hash; the
  worker running the run is told on ``<prefix>:input``, and looks in the hash
  every ``renew_every`` seconds too (a message published while its channel
  reconnects is lost), takes the value (`redis_scripts.TAKE`) and logs
  ``input_received``. A question that times out is withdrawn by the same
  script, so an answer is either taken by the agent or refused, never lost.
* Runs in flight are counted (`count_running`) in a set per owner and, for
  anonymous owners, per client address. When an owner's runs are adopted
  (a visitor logs in), the adopting worker rewrites each run's stored meta
  and publishes on ``<prefix>:adopt``; the worker that drives a run moves it
  between the sets and updates its own copy of the meta, so that its end
  takes the run out of the right set. A worker whose channel was down
  meanwhile looks, once it listens again, for the runs it holds whose
  meta in Redis names their new owner (`RedisBackend._adopt_missed`).
* A deleted session (`RedisBackend.delete`): its run in flight is stopped
  wherever it runs and waited for, then its runs' keys go, and a message on
  ``<prefix>:delete`` has every worker end its copies of them (their
  followers get the terminal event) and forget them.
* The running worker holds a lease key (``host:pid:boot``, renewed by its
  writer). A run whose lease lapsed, or names a process of this host that is
  gone, is ended ``interrupted`` with what its stream holds, by a script, so
  of several workers noticing at once exactly one writes the terminal event.

One run at a time per session, across workers, and "the previous partial is
saved first": why a lock plus the run's own status, not a fencing token.
Starts of a session are ordered by a short Redis lock (redis-py's ``Lock``: ``SET NX PX`` with a
random token, released only by its holder). Under it, a start that finds the
session's run running elsewhere asks that worker to stop it and its own run
then waits (like a local successor, before its agent starts) until the old
run's status in Redis is no longer ``running``: its worker sets that status
together with the terminal event, *after* the database save. If that worker
died instead, its lease lapses and the run is reaped. The status in Redis is
the fence for the writer too: appends go through a script that refuses once
the run is not ``running`` there, so a worker that was cut off past its lease
cannot write after the end another worker wrote; it stops its copy of the
run. A token number would fence the same writes; the status needs no extra
state and is what readers look at anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
import time
import uuid
import zlib
from collections.abc import Collection, Mapping
from typing import Any, Literal

from .. import metrics
from ..events import DELTA, DONE, ORIGIN, Event, Position, make_id, parse_id
from ..exceptions import BackendUnavailable, BadEventId
from ..owners import ANONYMOUS
from ..workers import process_gone, worker_id
from .base import (
    DELETE_TIMEOUT,
    INTERRUPTED,
    RUNNING,
    WAITING,
    BaseBackend,
    Finalize,
    RunState,
    Source,
    _adopt_meta,
    _counted,
    is_seconds,
    shared_result,
)
from .driver import DrivenRun, RunDriver, SharedQuestions, call_in_loop
from .log import RunLog
from .redis_url import RedisTarget, parse_redis_url

try:
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
    from redis.exceptions import RedisClusterException, RedisError
except ImportError as exc:  # pragma: no cover - exercised by the system check
    raise ImportError(
        "The Redis backend needs redis-py: pip install 'redis[hiredis]' (or the package's "
        "[redis] extra, once installed from a checkout: pip install -e 'path/to/checkout[redis]')"
    ) from exc

from .redis_scripts import ENDED, GAP, MISSING, STOP_ASKED, Scripts  # needs redis-py too

logger = logging.getLogger(__name__)

#: What redis-py raises when Redis cannot answer: its errors, a socket's, and
#: a cluster client's when it cannot find the cluster's nodes or a slot's
#: (`RedisClusterException`, not a `RedisError`: an outage, a failover).
UNREACHABLE = (RedisError, RedisClusterException, OSError)

#: Seconds a Redis command may take before its connection is taken for dead
#: (the client's ``socket_timeout``, unless the URL sets one).
SOCKET_TIMEOUT = 10.0
#: Connections to Redis a worker holds at most (its pool; ``connection_kwargs``
#: ``max_connections`` changes it): however many runs it drives or follows, a
#: command past them waits for one to be free.
MAX_CONNECTIONS = 50
#: The slot groups a Redis Cluster's sessions are spread over (`RedisBackend._group`):
#: one XREAD per group follows the runs of other workers, so a worker holds
#: at most this many blocked connections, a few on each primary.
SLOT_GROUPS = 32
#: Connections to each node of a Redis Cluster a worker holds at most. More
#: than `MAX_CONNECTIONS`: redis-py's cluster client has no blocking pool, so
#: a command past them fails (``MaxConnectionsError``) instead of waiting, and
#: in a pipeline the failure closes every connection of the client.
CLUSTER_MAX_CONNECTIONS = 500
#: Seconds a mirror's XREAD waits for new entries at most (less if the socket
#: timeout is short: at most half of it).
READ_BLOCK = 5.0
#: Seconds a worker's wake stream (`RedisBackend._follow`) outlives its last entry.
WAKE_KEEP = 3600
#: Seconds a subscriber on one worker waits for an event id of the run's own
#: worker to reach this worker through Redis, before it is refused as unknown.
CATCH_UP = 10.0
#: Bytes of text up to which the last delta of a run's head (its compacted
#: start, see the module docstring) grows; past them a new one begins. Each
#: compaction rewrites that delta, so this bounds its cost.
HEAD_PIECE = 8192
#: A compaction leaves a run's stream half full, or this many entries short of
#: its bound if that is less: it moves a bounded number of entries at once (a
#: script holds Redis while it runs), and leaves the stream as much of its
#: newest entries as it can, which followers read without going to the head.
COMPACT_AT_MOST = 1000
#: Milliseconds a worker's lease on a run lasts unless renewed (the default
#: of the ``lease_ms`` option): a dead worker's runs end within it.
LEASE_MS = 10_000
#: Every this many sweeps (of `RENEW_EVERY` s), the service's sweep of rows
#: left running is called too (`BaseBackend.on_sweep`): it finds what Redis
#: itself lost (a worker killed while Redis restarted empty).
SWEEP_ROWS_EVERY = 10
#: Seconds between lease renewals and sweeps (the default of ``renew_every``).
RENEW_EVERY = 3.0
LOCK_MS = 10_000
#: Milliseconds an ended run's keys are kept while its end is not saved in the
#: database (its worker retries the save; they expire EVICT_AFTER after it).
UNSAVED_KEEP_MS = 24 * 3600 * 1000
#: The keys of one run (`_key`'s parts, with its id).
_RUN_KEYS = ("run", "lease", "log", "head")
#: Runs whose keys `RedisBackend.delete` reads and deletes per round trip.
_DELETE_BATCH = 500


class BlockingSentinelConnectionPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """The connections to the master Sentinel names, in a blocking pool: a
    command past ``max_connections`` waits for a free one (up to
    ``timeout``), as with one server, instead of failing at once."""


def _client(target: RedisTarget, connection_kwargs: Mapping[str, Any]) -> tuple[Any, Any]:
    """A redis-py asyncio client of ``target``, and the `Sentinel` it asks for
    its master (None unless it is a Sentinel URL), neither connected yet.

    ``connection_kwargs`` go to redis-py over the backend's defaults: a
    ``socket_timeout`` of `SOCKET_TIMEOUT` and at most `MAX_CONNECTIONS`.
    One server or Sentinel's master: a blocking pool, so a command past
    them waits for a connection (up to `SOCKET_TIMEOUT`) instead of failing
    at once with redis-py's ``MaxConnectionsError``, which a worker driving
    a few hundred runs hit (their writes then retried as if Redis were
    unreachable); a ``socket_timeout`` in a one-server URL wins over the
    default. A cluster: redis-py's `RedisCluster`, whose ``max_connections``
    (`CLUSTER_MAX_CONNECTIONS` by default) are per node and not blocking
    (redis-py has no blocking pool for a cluster: past them a command fails
    and is retried). Sentinel: its own
    connections get ``connection_kwargs["sentinel_kwargs"]``, if given, over
    the ``socket_*`` options (and with ``rediss+sentinel://``, TLS and the
    ``ssl_*`` options). Raises `ValueError` if redis-py refuses the
    options."""
    options: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT,
        "max_connections": MAX_CONNECTIONS,
        **connection_kwargs,
    }
    credentials = _credentials(target)
    client: Any
    sentinel = None
    try:
        if target.kind == "cluster":
            nodes = [ClusterNode(host, port) for host, port in target.nodes]
            options["max_connections"] = connection_kwargs.get(
                "max_connections", CLUSTER_MAX_CONNECTIONS
            )
            client = RedisCluster(
                startup_nodes=nodes, **{"ssl": target.ssl, **credentials, **options}
            )
            return client, None
        options.setdefault("timeout", SOCKET_TIMEOUT)
        if target.kind == "sentinel":
            own = options.pop("sentinel_kwargs", None) or {}
            # A rediss+sentinel:// URL: TLS to the sentinels too (their
            # connections were plain, and sentinels that take TLS only were
            # never reached: every command "unreachable"), with the ssl_*
            # options given for the master; sentinel_kwargs say otherwise.
            shared = ("socket_", "ssl_") if target.ssl else ("socket_",)
            sockets = {key: value for key, value in options.items() if key.startswith(shared)}
            if target.ssl:
                sockets["ssl"] = True
            sentinel = Sentinel(list(target.nodes), sentinel_kwargs={**sockets, **own})
            client = sentinel.master_for(
                target.service,
                connection_pool_class=BlockingSentinelConnectionPool,
                **{"db": target.db, "ssl": target.ssl, **credentials, **options},
            )
        else:
            client = aioredis.Redis.from_pool(
                aioredis.BlockingConnectionPool.from_url(target.url, **options)
            )
        pool = client.connection_pool
        # A connection object, not connected: redis-py checks its arguments.
        pool.connection_class(**pool.connection_kwargs)
    except (TypeError, RedisClusterException) as exc:
        raise ValueError(f"connection_kwargs are refused by redis-py: {exc}") from exc
    return client, sentinel


def _credentials(target: RedisTarget) -> dict[str, str]:
    """The user and password a URL gives (only those it gives)."""
    return {
        key: value
        for key, value in (("username", target.username), ("password", target.password))
        if value is not None
    }


def _node_options(target: RedisTarget, connection_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The options of a client of one node of a cluster (`RedisBackend._subscriber`):
    the cluster client's that a one-server client takes too (its
    ``socket_timeout``, TLS, credentials; not ``max_connections``...)."""
    accepted = inspect.signature(aioredis.Redis).parameters
    options = {
        "socket_timeout": SOCKET_TIMEOUT,
        "ssl": target.ssl,
        **_credentials(target),
        **connection_kwargs,
    }
    return {key: value for key, value in options.items() if key in accepted}


def _moment(value: bytes | str | None) -> float | None:
    """A wall-clock moment a run's hash holds (``first_token_at``), if any."""
    if not value:
        return None
    try:
        moment = float(value)
    except ValueError:
        return None
    return moment if math.isfinite(moment) else None


def _stream_id(position: Position) -> str:
    return f"{position.text}-{position.seq}"


def _position(stream_id: bytes | str) -> Position:
    text, seq = (stream_id.decode() if isinstance(stream_id, bytes) else stream_id).split("-")
    return Position(int(text), int(seq))


class RedisBackend(BaseBackend):
    """Runs logged in Redis Streams; see the module docstring."""

    def __init__(
        self,
        *,
        redis_url: str = "redis://127.0.0.1:6379/0",
        redis_prefix: str = "detached_runs",
        stream_maxlen: int = 100_000,
        connection_kwargs: Mapping[str, Any] | None = None,
        lease_ms: int = LEASE_MS,
        renew_every: float = RENEW_EVERY,
        **kwargs: Any,
    ) -> None:
        """``redis_url``, ``redis_prefix`` and ``stream_maxlen`` default to
        ``REDIS_URL``, ``REDIS_PREFIX`` and ``REDIS_STREAM_MAXLEN``;
        ``connection_kwargs`` go to redis-py as they are
        (``redis.asyncio.BlockingConnectionPool.from_url(redis_url,
        **connection_kwargs)``: ``socket_timeout``, ``ssl_ca_certs``,
        ``health_check_interval``, ``max_connections`` (`MAX_CONNECTIONS`)...).
        ``lease_ms``: how long a worker's lease on a run lasts unless renewed,
        so how soon the runs of a worker that died end (``interrupted``);
        ``renew_every``: seconds between renewals and sweeps, at most a third
        of the lease. Other keyword arguments are `BaseBackend`'s."""
        super().__init__(**kwargs)
        if isinstance(lease_ms, bool) or not isinstance(lease_ms, int) or lease_ms < 1:
            raise ValueError(f"lease_ms must be a whole number of milliseconds, not {lease_ms!r}")
        if not is_seconds(renew_every) or renew_every <= 0 or renew_every * 3000 > lease_ms:
            raise ValueError(
                f"renew_every must be a number of seconds more than 0 and at most a third "
                f"of lease_ms ({lease_ms} ms), not {renew_every!r}"
            )
        self.lease_ms, self.renew_every = lease_ms, float(renew_every)
        #: A writer notices the loss at its next append or lease renewal
        #: (``renew_every``) and writes the run back; a lease is the bound.
        self.rejoin_within = self.lease_ms / 1000
        #: The runs this worker drives (their logs are copied to Redis).
        self.driver = RunDriver(
            self, on_unsaved=self._unsaved, on_saved_after_all=self._saved_after_all
        )
        # Tasks of this backend's own (the driver keeps its runs').
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.prefix = redis_prefix
        if stream_maxlen < 1:
            raise ValueError(f"stream_maxlen must be a positive integer, not {stream_maxlen!r}")
        self.maxlen = stream_maxlen
        # How many entries a compaction leaves in the stream: at least one, the
        # last, which tells a writer after a failure where the stream ends.
        self.keep = max(1, (stream_maxlen + 1) // 2, stream_maxlen - COMPACT_AT_MOST)
        target = parse_redis_url(redis_url)
        #: On a cluster, the slot groups sessions are spread over (`_group`);
        #: None on one server (or Sentinel's master): one group, all keys.
        self.groups = SLOT_GROUPS if target.kind == "cluster" else None
        # redis-py's type hints mix its sync and async clients; typed loosely here.
        self.redis: Any
        self._sentinel: Any = None
        self.redis, self._sentinel = _client(target, connection_kwargs or {})
        # Sentinel: where the master was at `_follow_master`'s last look.
        self._master_seen: Any = None
        #: On a cluster, the options of a client of one of its nodes (`_subscriber`).
        self._node_options: dict[str, Any] = {}
        if target.kind == "cluster":
            self._node_options = _node_options(target, connection_kwargs or {})
        self._lua = Scripts(self.redis)
        # The mirror's blocking read returns well within the socket's timeout:
        # a read that outlasts it is taken for a dead connection (redis-py's own
        # default is 5 s, as long as the block was), and a healthy, idle Redis
        # was reported unreachable every few seconds.
        timeout = (
            self.redis.get_connection_kwargs()
            if target.kind == "cluster"
            else self.redis.connection_pool.connection_kwargs
        ).get("socket_timeout")
        self.block_ms = int(min(READ_BLOCK, timeout / 2 if timeout else READ_BLOCK) * 1000) or 1
        self._mirrors: dict[str, RunLog] = {}
        #: Per run, the load of its mirror in progress (`current_log`).
        self._loading: dict[str, asyncio.Future[RunLog | None]] = {}
        #: Per run, `find`'s read of it whole in progress (`_replayed`).
        self._replaying: dict[str, asyncio.Future[RunLog]] = {}
        #: The runs of other workers this worker follows (a mirror each, for
        #: subscribers here), by id: the mirror and its stream id read so far.
        self._followed: dict[str, tuple[RunLog, Position]] = {}
        #: Per slot group (`_group`), the task reading the runs of that group
        #: it follows, with one blocked XREAD (`_read_followed`).
        self._readers: dict[str, asyncio.Task[None]] = {}
        #: Per slot group, the id of the entry of its wake stream (`_wake_key`)
        #: read last.
        self._woken: dict[str, str] = {}
        #: A key never written, whose slot's primary gives the time (`now`)
        #: and, on a cluster, this worker's pub/sub (`_subscribe`).
        self._clock_key = f"{self.prefix}:clock"
        self._writers: dict[str, asyncio.Task[None]] = {}
        self._listener: asyncio.Task[None] | None = None
        #: Whether the channel was subscribed once (`_listen`): a subscription
        #: after that follows a gap, whose messages were lost.
        self._listened = False
        self._sweeper: asyncio.Task[None] | None = None
        # Per run whose final save failed: the task holding it (`_hold_unsaved`).
        self._holds: dict[str, asyncio.Task[None]] = {}
        # Per run here whose agent waits for an answer: set when another
        # worker says it took one (``<prefix>:input``).
        self._answered: dict[str, asyncio.Event] = {}
        self._questions = _Questions(self)

    # -- keys --------------------------------------------------------------

    def _key(self, session_key: str, *parts: str) -> str:
        """A key of a session's (``parts`` joined by colons after its hash
        tag), in one Cluster slot with the session's other keys: tagged
        ``{<prefix>:<session>}`` on one server (the names of old), and on a
        cluster with the session's slot group (`_group`): ``{<prefix>:g<n>}:
        <session>``, so that one XREAD per group follows its runs."""
        if self.groups is None:
            return ":".join([f"{{{self.prefix}:{session_key}}}", *parts])
        return ":".join([f"{{{self.prefix}:{self._group(session_key)}}}", session_key, *parts])

    def _group(self, session_key: str) -> str:
        """The slot group of a session: ``g<n>``, n from 0 to `SLOT_GROUPS` - 1,
        the same in every process (a CRC-32 of the key, not `hash`); ``""``
        on one server, where all sessions are one group."""
        if self.groups is None:
            return ""
        return f"g{zlib.crc32(session_key.encode()) % self.groups}"

    def _wake_key(self, group: str) -> str:
        """The stream that wakes this worker's XREAD of a slot group
        (`_follow`): ``<prefix>:wake:<worker>`` on one server, in the group's
        slot on a cluster."""
        if self.groups is None:
            return f"{self.prefix}:wake:{worker_id()}"
        return f"{{{self.prefix}:{group}}}:wake:{worker_id()}"

    # -- the interface -----------------------------------------------------

    @classmethod
    def options_from_settings(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """`BaseBackend.options_from_settings`, and ``REDIS_URL``,
        ``REDIS_PREFIX`` and ``REDIS_STREAM_MAXLEN``."""
        return {
            **super().options_from_settings(config),
            "redis_url": config["REDIS_URL"],
            "redis_prefix": config["REDIS_PREFIX"],
            "stream_maxlen": config["REDIS_STREAM_MAXLEN"],
        }

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
        self.check_accepting()
        await self._ensure_listener()
        async with self._session_lock(session_key):
            remote = await self._stop_remote_previous(session_key)
            # Runs of a session start in the order of this lock, whichever
            # worker's service wrote its row first: the start time is taken
            # here, from Redis's clock, and the service stores it on the row.
            meta["started_at"] = await self.now()
            fields = {
                "worker": worker_id(),
                "status": RUNNING,
                "error": "",
                "started_at": str(time.time()),
                "meta": json.dumps(meta),
            }
            # One script for the session's keys (one Cluster slot); the sets of
            # the owner and the address live elsewhere and are written on their own.
            await self._call(self._put_run(session_key, run_id, fields, current="replace"))
            try:
                await self._call(self._in_sets(self._tracked(session_key, run_id, meta), add=True))
                run = await self.driver.start(
                    session_key,
                    run_id,
                    source,
                    start_data=start_data,
                    meta=meta,
                    finalize=finalize,
                    timeout=timeout,
                    # The session's run on another worker (a double send from
                    # two tabs balanced to two workers): this one waits for
                    # its end too, as for a local run it replaced.
                    after=remote,
                )
            except BaseException:
                # Refused (a shutdown began meanwhile): a refused start changes
                # nothing, so what it wrote goes.
                await self._forget(session_key, run_id, meta)
                raise
            self._writers[run_id] = asyncio.create_task(
                self._write(run, fields), name=f"detached_runs:redis-writer:{run_id}"
            )

    async def _forget(self, session_key: str, run_id: str, meta: dict[str, Any]) -> None:
        """Drop what Redis holds of a run (best effort): one `start` refused
        after writing it, or one whose row holds another end (`on_reaped`)."""
        pipe = self.redis.pipeline(transaction=False)
        parts = ("run", "lease", "log", "head")
        pipe.delete(*(self._key(session_key, part, run_id) for part in parts))
        await self._lua.drop_current(
            keys=[self._key(session_key, "current")], args=[run_id], client=pipe
        )
        for key, member in self._tracked(session_key, run_id, meta):
            pipe.zrem(key, member)
        try:
            await pipe.execute()
        except UNREACHABLE:
            metrics.redis_errors.inc()
            logger.warning("Could not take back the refused run %s from Redis", run_id)

    async def catch_up(self, log: RunLog, position: Position) -> None:
        """Wait (up to `CATCH_UP` seconds) until a mirror holds ``position``:
        an id of the run's worker that is ahead of what Redis has given this
        worker yet (its writes lag, or Redis paused them) is valid a moment
        later, and a 400 would end the client's stream for good."""
        if log is not self._mirrors.get(log.id):
            return  # the run this worker drives: it has all there is
        deadline = asyncio.get_running_loop().time() + CATCH_UP
        while log.position < position and not log.closed:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            await log.wait_for_change(left)

    async def stop(self, session_key: str, run_id: str | None = None) -> bool:
        local = self.driver.runs.get(session_key)
        current = await self._current(session_key)
        if current is None or (run_id is not None and current != run_id):
            return False
        if local is not None and local.id == current:
            return self.driver.request_stop(local)
        status = await self._call(self.redis.hget(self._key(session_key, "run", current), "status"))
        if status != RUNNING.encode():
            return False
        await self._ask_to_stop(session_key, current)
        return True

    async def get(self, session_key: str) -> RunState | None:
        self._ensure_sweeper()
        current = await self._current(session_key)
        return None if current is None else await self.find(session_key, current)

    async def find(self, session_key: str, run_id: str) -> RunState | None:
        """See `BaseBackend.find`: any run whose keys Redis still holds (an
        ended run's for ``EVICT_AFTER``, or until its row is saved). A run in
        flight whose worker is gone is reaped first (`_reap`)."""
        self._ensure_sweeper()
        local = self.driver.runs.get(session_key)
        if local is not None and local.id == run_id:
            return local.state()
        fields = await self._call(self.redis.hgetall(self._key(session_key, "run", run_id)))
        if not fields:
            return None
        info = {k.decode(): v.decode() for k, v in fields.items()}
        if info.get("status") == RUNNING and await self._reap(session_key, run_id):
            return await self.find(session_key, run_id)
        mirror = self._mirrors.get(run_id)
        if mirror is None:
            mirror = await self._replayed(session_key, run_id)
        status = info.get("status", RUNNING)
        return RunState(
            run_id=run_id,
            session_key=session_key,
            status=WAITING if status == RUNNING and mirror.input_request is not None else status,
            error=info.get("error", ""),
            output=mirror.output_until_now(),
            last_id=mirror.last_id(),
            meta=json.loads(info.get("meta", "{}")),
            finished_at=float(info["finished_at"]) if info.get("finished_at") else None,
            usage=dict(mirror.usage),
            first_token_at=_moment(info.get("first_token_at")),
            input_request=mirror.input_request if status == RUNNING else None,
        )

    async def ask(
        self, session_key: str, run_id: str, data: Mapping[str, Any], timeout: float | None
    ) -> Any:
        await self._ensure_listener()
        return await self.driver.ask(session_key, run_id, data, timeout, self._questions)

    async def answer(self, session_key: str, request: str, value: Any) -> bool:
        """See `BaseBackend.answer`: taken once, by a script, whichever worker
        it reaches; then given to the run here, or the run's worker is told."""
        current = await self._current(session_key)
        if current is None:
            return False
        local = self.driver.runs.get(session_key)
        pending = None if local is None else local.pending
        taken = await self._call(
            self._lua.answer(
                keys=[self._key(session_key, "run", current)], args=[request, json.dumps(value)]
            )
        )
        if not taken:
            return False
        if local is not None and local.id == current:
            # Given here, or refused here (the run is stopping): either way what
            # the script kept for the run's worker goes, and the answer counts
            # as taken only if the agent has it.
            return await self._questions.given(local, request, value, pending)
        try:
            await self._call(
                self.redis.publish(f"{self.prefix}:input", f"{session_key} {current} {request}")
            )
        except BackendUnavailable:
            pass  # taken all the same: the run's worker finds it at its next look
        return True

    def _spawn(self, coroutine: Any, name: str) -> None:
        task = asyncio.ensure_future(coroutine)
        task.set_name(f"detached_runs:redis-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def count_running(self, owner: str | None = None, *, address: str | None = None) -> int:
        self._ensure_sweeper()
        key = self._count_key(*_counted(owner, address))
        return int(await self._call(self._lua.count(keys=[key])))

    async def adopt(self, owner: str, new_owner: str, session_keys: Collection[str] = ()) -> int:
        """See `BaseBackend.adopt`. What Redis holds of each session's current
        run is rewritten here; the runs this worker drives are adopted here as
        well, and the other workers adopt theirs when they get the message on
        ``<prefix>:adopt``, or, if their channel was down meanwhile, when it
        listens again (`_adopt_missed`: the current run of each of
        ``session_keys``; a run only its worker's copy names, an older one in
        its grace period, keeps the old owner there until it is evicted)."""
        adopted = {run.id for run in await self._adopt_here(owner, new_owner)}
        for session_key in session_keys:
            current = await self._current(session_key)
            if (
                current is not None
                and current not in adopted
                and await self._adopt_stored(session_key, current, owner, new_owner)
            ):
                adopted.add(current)
        message = json.dumps({"owner": owner, "new_owner": new_owner})
        await self._call(self.redis.publish(f"{self.prefix}:adopt", message))
        return len(adopted)

    async def delete(
        self, session_key: str, run_ids: Collection[str], *, timeout: float = DELETE_TIMEOUT
    ) -> None:
        """See `BaseBackend.delete`. The run in flight is stopped wherever it
        runs: here, then waited for until its writer has copied its end to
        Redis (a writer that found its keys gone would write the run again
        from its start); or on another worker, through the stop channel,
        until its status in Redis says it ended (or its lease lapsed and it
        was reaped). Then the runs' keys go, and a message on
        ``<prefix>:delete`` has every worker end its mirrors of them (a
        follower that had not read the terminal event yet gets one with the
        run's status) and forget them."""
        ids = set(run_ids)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        local = await self.driver.end(session_key, ids, timeout)
        # The writers here of the runs to delete: the one just ended, and any
        # that ended before whose end is still being copied (it is no longer
        # the session's run here, but Redis still says it runs, and a run
        # that is not ours would be waited for instead, past its expiry).
        here = {*ids, *([local.id] if local is not None else [])}
        writers = {writer for run_id in here if (writer := self._writers.get(run_id))}
        if writers:
            await asyncio.wait(writers, timeout=max(deadline - loop.time(), 0))
            if not all(writer.done() for writer in writers):
                raise BackendUnavailable(
                    "The run store (Redis) did not take the run's end in time; nothing was "
                    "deleted. Try again."
                )
        ends: dict[str, tuple[str, str]] = {}
        ordered = sorted(ids)
        for begin in range(0, len(ordered), _DELETE_BATCH):
            batch = ordered[begin : begin + _DELETE_BATCH]
            for run_id, (status, error) in (await self._ends(session_key, batch)).items():
                if status == RUNNING:
                    # In flight elsewhere (the session's current run, or one it
                    # replaced that has not ended yet): stopped and waited for.
                    await self._end_elsewhere(session_key, run_id, deadline - loop.time())
                    now = (await self._ends(session_key, [run_id])).get(run_id)
                    if now is None:
                        # Its keys expired once it ended (EVICT_AFTER is short,
                        # or the wait was long): nothing of it is left in Redis.
                        continue
                    status, error = now
                ends[run_id] = (status, error)
            pipe = self.redis.pipeline(transaction=False)
            for run_id in batch:
                pipe.delete(*(self._key(session_key, part, run_id) for part in _RUN_KEYS))
                member = f"{session_key} {run_id}"
                pipe.zrem(self._index_key(), member).zrem(self._unsaved_key(), member)
            await self._call(pipe.execute())
        current = self._key(session_key, "current")
        for run_id in ends:
            await self._call(self._lua.drop_current(keys=[current], args=[run_id]))
        if ends:
            self._deleted(session_key, ends)
            message = json.dumps({"session": session_key, "runs": ends})
            await self._call(self.redis.publish(f"{self.prefix}:delete", message))

    async def _ends(self, session_key: str, run_ids: list[str]) -> dict[str, tuple[str, str]]:
        """``(status, error)`` of each of these runs that Redis holds."""
        pipe = self.redis.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hmget(self._key(session_key, "run", run_id), "status", "error")
        found = await self._call(pipe.execute())
        return {
            run_id: (status.decode(), (error or b"").decode())
            for run_id, (status, error) in zip(run_ids, found, strict=True)
            if status is not None
        }

    async def _end_elsewhere(self, session_key: str, run_id: str, timeout: float) -> None:
        """Stop a run another worker drives and wait (up to ``timeout`` s) until
        it ended: its status in Redis is no longer running (its worker saved
        it), or its lease lapsed and it was reaped. `BackendUnavailable` on
        timeout."""
        if await self._reap(session_key, run_id):
            return
        await self._ask_to_stop(session_key, run_id)
        ended = asyncio.Event()
        waiting = asyncio.create_task(
            self._await_end(session_key, run_id, ended), name=f"detached_runs:redis-end:{run_id}"
        )
        try:
            await asyncio.wait_for(ended.wait(), max(timeout, 0))
        except TimeoutError:
            raise BackendUnavailable(
                "The session's run did not stop in time; nothing was deleted. Try again."
            ) from None
        finally:
            waiting.cancel()

    def _deleted(self, session_key: str, ends: Mapping[str, tuple[str, str]]) -> None:
        """Runs of a session were deleted (`delete`, here or on another worker):
        end this worker's mirrors of them, with the status Redis had (a run
        still running there counts as interrupted), so that their followers
        get a terminal event and close, and forget the ones it drives."""
        for run_id, (status, error) in ends.items():
            mirror = self._mirrors.pop(run_id, None)
            if mirror is None:
                continue
            self._unfollow(run_id)
            if not mirror.closed:
                status = INTERRUPTED if status == RUNNING else status
                mirror.append_event(DONE, {"status": status, **({"error": error} if error else {})})
                mirror.mark_finished(status, error)
        self.driver.forget(session_key, ends)

    def _deleted_elsewhere(self, data: bytes) -> None:
        """A message on ``<prefix>:delete``: runs another worker deleted."""
        try:
            message = json.loads(data)
            session_key = str(message["session"])
            ends = {str(k): (str(v[0]), str(v[1])) for k, v in message["runs"].items()}
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            logger.warning("Ignored a malformed message on %s:delete", self.prefix)
            return
        self._deleted(session_key, ends)

    def check_accepting(self) -> None:
        self.driver.check_accepting()

    def driven(self, session_key: str, run_id: str) -> RunState | None:
        return self.driver.driven(session_key, run_id)

    def __len__(self) -> int:
        """How many runs this worker drives (for tests and the admin)."""
        return len(self.driver)

    async def drain(self, timeout: float) -> None:
        """See `BaseBackend.drain`: its runs go on writing to Redis, renewing
        their leases and serving every worker's subscribers meanwhile, and
        starts sent to other workers go on there."""
        await self.driver.drain(timeout)

    async def shutdown(self, timeout: float) -> None:
        self.driver.refuse_new_runs()  # at once: the driver's shutdown starts a turn later
        # Its runs end (their saves, their terminal events), while the tasks
        # of this backend's own that they wait on (a run on another worker
        # ending, a late save's clean-up) go on.
        own = [t for t in self._tasks if not t.done()]
        await asyncio.gather(
            self.driver.shutdown(timeout),
            asyncio.wait(own, timeout=timeout) if own else asyncio.sleep(0),
        )
        writers = [t for t in self._writers.values() if not t.done()]
        if writers:
            await asyncio.wait(writers, timeout=timeout)
        readers = [
            t
            for t in [
                *self._holds.values(),
                *self._readers.values(),
                self._listener,
                self._sweeper,
            ]
            if t
        ]
        for task in readers:
            task.cancel()
        # Ended before the client closes: a command cut short by the cancel
        # hands its connection back to the pool first (bounded: a task that
        # swallowed its cancel must not hold the shutdown).
        if readers:
            await asyncio.wait(readers, timeout=min(timeout, 2.0))
        await self.redis.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()

    # -- writing (the worker that drives the run) --------------------------

    async def _write(self, run: DrivenRun, record: dict[str, str]) -> None:
        """Copy the local log to the run's stream; renew the lease meanwhile.

        While Redis is unreachable the local log is the buffer (the agent goes
        on, local subscribers are served, the save goes to the database). After
        any failure the writer asks the stream where it stands before writing
        again, so a pipeline cut halfway is neither lost nor doubled, and a
        Redis that came back empty gets the run again from its start.
        """
        flushed, renewed, delay, resync = ORIGIN, 0.0, 0.05, False
        # Whether the run's hash has its first token's time (`RunState.first_token_at`).
        told_first = False
        key = self._key(run.session_key, "log", run.id)
        try:
            while True:
                if resync:
                    told_first = False
                    try:
                        flushed = await self._resync(run, record)
                    except Exception as exc:  # not only UNREACHABLE: see below
                        metrics.redis_errors.inc()
                        if not isinstance(exc, UNREACHABLE):
                            logger.warning("Run %s could not resync", run.id, exc_info=True)
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 2.0)
                        continue
                    resync = False
                events, _end = run.read(flushed)
                loop = asyncio.get_running_loop()
                if loop.time() - renewed >= self.renew_every:
                    # Whether or not there is something to write: a writer kept
                    # busy by a fast agent must not let its lease lapse.
                    renewed = loop.time()
                    held = await self._renew(run)
                    if held == ENDED:
                        # Reaped while this worker was cut off past its lease:
                        # its agent, thinking without writing, would go on
                        # beside the session's next run until its next append.
                        self._ended_elsewhere(run)
                        return
                    if not held:
                        resync = True  # Redis lost the run; an idle writer learns it here
                        continue
                if not events:
                    await run.wait_for_change(max(renewed + self.renew_every - loop.time(), 0.01))
                    continue
                try:
                    ended = events[-1].event == DONE
                    if ended:
                        # Not an end on a master that is no longer one: it would be lost.
                        await self._follow_master()
                    args: list[Any] = [self.maxlen, self.keep, HEAD_PIECE, _stream_id(flushed)]
                    for event in events:
                        args += [
                            _stream_id(_event_position(event)),
                            event.event,
                            json.dumps(event.data),
                        ]
                    # Fenced: appends only while the run is still running in Redis.
                    written = await self._lua.append(
                        keys=[
                            key,
                            self._key(run.session_key, "run", run.id),
                            self._key(run.session_key, "head", run.id),
                        ],
                        args=args,
                    )
                    if written == MISSING:
                        resync = True  # Redis lost the run (restarted empty)
                        continue
                    if written == GAP:
                        # A failover lost the last entries written (or a write
                        # whose answer was lost went in): from where it ends.
                        logger.warning(
                            "Run %s: its stream does not end where this worker left it; "
                            "writing from where it ends",
                            run.id,
                        )
                        resync = True
                        continue
                    if written == ENDED:
                        self._ended_elsewhere(run)
                        return
                    if run.first_text_at is not None and not told_first:
                        # Once, for the other workers: their mirrors cannot
                        # know when this worker logged the first token.
                        await self.redis.hset(
                            self._key(run.session_key, "run", run.id),
                            "first_token_at",
                            repr(run.first_text_at),
                        )
                        told_first = True
                    if ended:
                        pipe = self.redis.pipeline(transaction=False)
                        kept = run.unsaved
                        await self._ending(pipe, run, events[-1])
                        await pipe.execute()
                        if kept and not run.unsaved:
                            await self._expire_saved(run)  # saved meanwhile
                except Exception as exc:
                    # Not only UNREACHABLE: redis-py's cluster pipeline, at a
                    # connection error (MaxConnectionsError too), closes every
                    # connection of its client, those of other commands in
                    # flight too, which may then fail with anything (an
                    # AttributeError). A writer that died of it would leave
                    # its run unwritten until it is reaped.
                    metrics.redis_errors.inc()
                    logger.warning(
                        "Redis unreachable; run %s keeps its log in memory",
                        run.id,
                        exc_info=not isinstance(exc, UNREACHABLE),
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    resync = True
                    continue
                delay = 0.05
                flushed = _event_position(events[-1])
                if ended:
                    return
        finally:
            self._writers.pop(run.id, None)

    def _ended_elsewhere(self, run: DrivenRun) -> None:
        """Another worker ended this run (our lease lapsed while we were cut
        off): it is not ours to write or finish any more; stop it here."""
        logger.warning("Run %s was ended elsewhere; this worker stops it", run.id)
        self.driver.request_stop(run, ("interrupted", ""))
        self._spawn(self._yield_to_row(run), "yield")

    async def _yield_to_row(self, run: DrivenRun) -> None:
        """A run that another worker reaped while this one was cut off from
        Redis: this worker's clients saw more than Redis holds, and its own
        save of the run, made after the reap, has the last word in the row.
        Once that save is in, Redis drops its copy (the reaped end), so that
        every worker serves the row: one end for the run, not two."""
        await run.stored.wait()
        await self._forget(run.session_key, run.id, run.meta)

    async def _resync(self, run: DrivenRun, record: dict[str, str]) -> Position:
        """Where the run's stream ends; re-create the run's keys if Redis lost them."""
        key = self._key(run.session_key, "log", run.id)
        last = await self.redis.xrevrange(key, count=1)
        if last and await self.redis.exists(self._key(run.session_key, "run", run.id)):
            return _position(last[0][0])
        logger.warning("Redis lost run %s; writing it again from its start", run.id)
        await self.redis.delete(key, self._key(run.session_key, "head", run.id))
        fields = {
            **record,
            # The meta as it is now: its owner may have changed (`adopt`).
            "meta": json.dumps(run.meta),
            # Its pending question too: answers are taken again at once.
            **({"input": run.pending[0]} if run.pending is not None else {}),
        }
        # Only the newest run of its session here claims the session again,
        # and not one asked to stop, whether it ended meanwhile (its writer
        # was still copying its end when Redis lost it) or not yet (its agent
        # is letting go): a newer run replaced it, here or on another worker
        # (where it may wait for this one's end), whose writer has not written
        # it back yet. That run would find the session taken, and a start
        # elsewhere would replace this one and not wait for the newer one. (A
        # run that claims none is served from its row meanwhile, and a start
        # elsewhere waits for its row.) A run that ended by itself still
        # claims it; a run that followed it takes it back (`_older`, below).
        claims = self.driver.runs.get(run.session_key) is run and run.stop_reason is None
        await self._put_run(run.session_key, run.id, fields, current="claim" if claims else "leave")
        if not run.closed:  # an ended run no longer counts as in flight
            await self._in_sets(self._tracked(run.session_key, run.id, run.meta), add=True)
        current = await self._current(run.session_key) if claims else None
        if (
            current is not None
            and current != run.id
            and await self._older(run.session_key, current, run.meta)
        ):
            # A run before this one took the session back first: one that
            # ended by itself (its writer was still copying its end), or one
            # this one replaced whose stop was lost (its message, while its
            # worker's channel was down, and its flag with Redis). This one,
            # newer, takes the session, and asks that one to stop (again: the
            # start that replaced it still waits for its end, and asks too,
            # `_await_end`).
            logger.warning(
                "Run %s of session %s takes the session back from the older run %s, "
                "which Redis had lost too, and asks it to stop",
                run.id,
                run.session_key,
                current,
            )
            older = current
            if await self._lua.swap_current(
                keys=[self._key(run.session_key, "current")], args=[older, run.id]
            ):
                current = run.id
                await self._ask_to_stop(run.session_key, older)
            else:
                current = await self._current(run.session_key)
        if current is not None and current != run.id:
            # A start elsewhere took the session while Redis had lost this run
            # (it waits a lease for the run to come back: `RunService.start`);
            # the newer run wins, as in a double send.
            logger.warning(
                "Run %s of session %s was replaced by %s while Redis had lost it; stopping it",
                run.id,
                run.session_key,
                current,
            )
            self.driver.request_stop(run)
        return ORIGIN

    async def _older(self, session_key: str, other: str, meta: Mapping[str, Any]) -> bool:
        """Whether run ``other`` of the session started before the run whose
        meta is ``meta`` (by their ``started_at``, Redis's clock under the
        session's lock); False if either is unknown."""
        stored = await self.redis.hget(self._key(session_key, "run", other), "meta")
        try:
            theirs = float(json.loads(stored)["started_at"]) if stored else None
            ours = float(meta["started_at"])
        except (ValueError, KeyError, TypeError):
            return False
        return theirs is not None and theirs < ours

    async def _put_run(
        self,
        session_key: str,
        run_id: str,
        fields: Mapping[str, str],
        *,
        current: Literal["replace", "claim", "leave"],
    ) -> None:
        """Write a run's hash (``fields``) and its lease at once, and make it
        the session's current run: ``"replace"`` whatever the session's
        current run is, ``"claim"`` only if the session has none, ``"leave"``
        not at all. Raises one of `UNREACHABLE` if Redis is unreachable."""
        await self._lua.start(
            keys=[
                self._key(session_key, "run", run_id),
                self._key(session_key, "lease", run_id),
                self._key(session_key, "current"),
            ],
            args=[
                worker_id(),
                self.lease_ms,
                run_id,
                {"replace": "0", "claim": "1", "leave": "2"}[current],
                *(item for pair in fields.items() for item in pair),
            ],
        )

    async def _ending(self, pipe: Any, run: DrivenRun, done: Event) -> None:
        # A run whose end the database does not hold yet is kept (for a day at
        # most, if its worker dies before its save) and expires once saved.
        grace = UNSAVED_KEEP_MS if run.unsaved else self._grace_ms()
        meta = self._key(run.session_key, "run", run.id)
        pipe.hset(
            meta,
            mapping={
                "status": done.data["status"],
                "error": done.data.get("error", ""),
                "finished_at": str(time.time()),
            },
        )
        for key, member in self._tracked(run.session_key, run.id, run.meta):
            pipe.zrem(key, member)
        pipe.delete(self._key(run.session_key, "lease", run.id))
        await self._expiring(pipe, run, grace)

    async def _expiring(self, pipe: Any, run: RunLog, grace: int) -> None:
        """Queue on ``pipe`` the expiry of an ended run's keys (its hash, log
        and head at one instant), ``grace`` ms from now."""
        await self._lua.expire_run(
            keys=[
                self._key(run.session_key, "run", run.id),
                self._key(run.session_key, "log", run.id),
                self._key(run.session_key, "head", run.id),
                self._key(run.session_key, "current"),
            ],
            args=[grace, run.id],
            client=pipe,
        )

    def _grace_ms(self) -> int:
        return max(int(self.evict_after * 1000), 1)

    def _unsaved(self, run: DrivenRun) -> None:
        task = asyncio.create_task(self._hold_unsaved(run), name="detached_runs:redis-unsaved")
        self._holds[run.id] = task
        task.add_done_callback(lambda _: self._holds.pop(run.id, None))

    async def _hold_unsaved(self, run: DrivenRun) -> None:
        """While this worker retries a run's final save, keep the run in
        ``<prefix>:unsaved`` with a lease: if this worker dies first, another
        one saves the end from Redis (`_sweep`)."""
        entry = [(self._unsaved_key(), f"{run.session_key} {run.id}")]
        while run.unsaved:
            try:
                await self._in_sets(entry, add=True)
            except UNREACHABLE:
                metrics.redis_errors.inc()
                pass  # unreachable: the lease may lapse, and the end be saved twice, alike
            await asyncio.sleep(self.renew_every)

    def _saved_after_all(self, run: DrivenRun) -> None:
        # Its keys were kept for want of a save (`_ending`); now they may go.
        task = asyncio.create_task(self._after_save(run), name="detached_runs:redis-saved")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _after_save(self, run: DrivenRun) -> None:
        hold = self._holds.pop(run.id, None)
        if hold is not None:
            hold.cancel()
        try:
            await self.redis.zrem(self._unsaved_key(), f"{run.session_key} {run.id}")
        except UNREACHABLE:
            metrics.redis_errors.inc()
            pass  # its lease lapses; the sweep finds the row saved
        if run.id not in self._writers:  # else the writer's _ending sets the expiry
            await self._expire_saved(run)

    async def _expire_saved(self, run: DrivenRun) -> None:
        pipe = self.redis.pipeline(transaction=False)
        await self._expiring(pipe, run, self._grace_ms())
        try:
            await pipe.execute()
        except UNREACHABLE:
            metrics.redis_errors.inc()
            logger.warning("Could not set the expiry of run %s; it goes in a day", run.id)

    async def _renew(self, run: DrivenRun) -> int:
        """Renew the run's lease, and its entries in the sets of runs in flight
        (which expire with it: a dead worker's runs count for nobody). 0 if
        Redis no longer holds the run (it restarted empty), `ENDED` if it
        holds it ended (another worker reaped it), else a true value."""
        pipe = self.redis.pipeline(transaction=False)
        await self._lua.renew(
            keys=[
                self._key(run.session_key, "lease", run.id),
                self._key(run.session_key, "run", run.id),
            ],
            args=[worker_id(), self.lease_ms],
            client=pipe,
        )
        await self._touch(pipe, self._tracked(run.session_key, run.id, run.meta))
        try:
            held, *_ = await pipe.execute()
        except UNREACHABLE:
            metrics.redis_errors.inc()
            logger.warning("Could not renew the lease of run %s", run.id)
            return 1  # unreachable, not lost: the writer's next attempt finds out
        if held == STOP_ASKED:
            self.driver.request_stop(run)  # its message on the stop channel was lost
        return int(held)

    # -- reading (any worker with subscribers) -----------------------------

    async def current_log(self, session_key: str) -> RunLog | None:
        """The run this worker drives, or its mirror of the run another one
        drives (a reader follows it while it has subscribers here)."""
        self._loop = asyncio.get_running_loop()
        self._ensure_sweeper()
        current = await self._current(session_key)
        local = self.driver.runs.get(session_key)
        if current is None:
            # Redis lost the session (it restarted empty, or a failover lost
            # what the old master had not passed on): a run this worker drives
            # (or drove, until it is evicted or deleted here) is still its
            # current one, and its writer writes it again.
            return local
        if local is not None and local.id == current:
            return local
        mirror = self._mirrors.get(current)
        if mirror is not None:
            return mirror
        # One load per run, whoever asks meanwhile: ten clients arriving at
        # once each read the whole run (ten copies of a long answer), and only
        # the mirror stored last was followed, the others never grew.
        return await shared_result(
            self._loading, current, lambda: self._load_mirror(session_key, current)
        )

    async def _load_mirror(self, session_key: str, run_id: str) -> RunLog | None:
        """The mirror of another worker's run, read from Redis and followed
        (`current_log`); None if its keys expired meanwhile."""
        await self._reap(session_key, run_id)
        mirror = await self._replay(session_key, run_id)
        if not mirror.entries and not await self._call(
            self.redis.exists(self._key(session_key, "run", run_id))
        ):
            # Expired between the two reads. (A run whose log is empty but
            # whose hash is there has just started: its worker's writer has
            # not written its start yet. It is followed like any other.)
            return None
        self._mirrors[run_id] = mirror
        # A follower hears of a deletion of the run on ``<prefix>:delete``.
        await self._ensure_listener()
        if not mirror.closed:
            self._follow(mirror)
        return mirror

    async def _replayed(self, session_key: str, run_id: str) -> RunLog:
        """`_replay`, one read for every caller meanwhile (`find` of a run
        with no mirror here): ten clients that open another worker's long
        answer at once each asked for its state, and each read it whole."""
        return await shared_result(
            self._replaying, run_id, lambda: self._replay(session_key, run_id)
        )

    async def _replay(self, session_key: str, run_id: str) -> RunLog:
        mirror = RunLog(run_id, session_key, {})
        meta = await self._call(self.redis.hget(self._key(session_key, "run", run_id), "meta"))
        mirror.meta = json.loads(meta) if meta else {}
        await self._call(self._fill(mirror, ORIGIN))
        return mirror

    async def _fill(self, mirror: RunLog, after: Position) -> Position:
        """Apply to a mirror what Redis holds of its run past ``after`` (an id
        read before): the pieces of the head that end past it, then the
        stream's entries. Return the last id read (``after`` if none).

        The stream is read first, then the head, in one round trip: a
        compaction that falls between the two reads moves entries the stream
        read had into the head, which then overlaps them (what overlaps is
        applied once), and none can be missing: the head read holds all that
        was compacted before the stream was read. Not a MULTI (a cluster's
        asyncio client runs those poorly) nor a script, so that a Redis that
        pauses its writes (``CLIENT PAUSE WRITE``, a failover) still answers.
        The head is read from its end, a few pieces first and more if they do
        not reach back to ``after`` (only the last read is used: each is whole
        in itself), so a follower that fell behind reads what it lacks, not the
        whole run.
        """
        head = self._key(mirror.session_key, "head", mirror.id)
        log = self._key(mirror.session_key, "log", mirror.id)
        pieces = None if after == ORIGIN else 16
        while True:
            pipe = self.redis.pipeline(transaction=False)
            pipe.xrange(log, min=_stream_id(after))
            pipe.llen(head).lrange(head, 0 if pieces is None else -3 * pieces, -1)
            entries, length, flat = await pipe.execute()
            if pieces is None or len(flat) >= length or _position(flat[0]) <= after:
                break
            pieces *= 8
        read = [(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]
        read += [(stream_id, fields[b"e"], fields[b"d"]) for stream_id, fields in entries]
        missing = False
        for stream_id, event, data in read:
            if _apply(mirror, stream_id, event, data, over_gap=missing):
                continue
            # There is nothing more to read: this log lost entries (an older
            # version trimmed it without a head, or a failover lost writes).
            logger.error(
                "Run %s: its log in Redis lacks what comes before %s; that part is missing",
                mirror.id,
                stream_id.decode(),
            )
            missing = True
            _apply(mirror, stream_id, event, data, over_gap=True)
        return _position(read[-1][0]) if read else after

    def _follow(self, mirror: RunLog) -> None:
        """Follow ``mirror``'s run in Redis from its position on, with the
        runs of its slot group this worker follows already (`_read_followed`):
        one blocked XREAD and one connection for all of them, however many
        there are (on a cluster, one per group: `SLOT_GROUPS` at most)."""
        self._followed[mirror.id] = (mirror, mirror.position)
        group = self._group(mirror.session_key)
        reader = self._readers.get(group)
        if reader is None or reader.done():
            self._readers[group] = asyncio.create_task(
                self._read_followed(group), name=f"detached_runs:redis-reader{group and ':'}{group}"
            )
            return
        # The XREAD blocked now names the runs followed before: an entry on
        # the group's wake stream ends it, and the next one names this run.
        task = asyncio.create_task(self._wake(group), name="detached_runs:redis-wake")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _unfollow(self, run_id: str) -> None:
        """Read no more of run ``run_id`` (from the next XREAD on)."""
        self._followed.pop(run_id, None)

    async def _wake(self, group: str) -> None:
        key = self._wake_key(group)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(key, {"w": "1"}, maxlen=1, approximate=False)
        pipe.expire(key, WAKE_KEEP)
        try:
            await pipe.execute()
        except UNREACHABLE:
            metrics.redis_errors.inc()  # the reader retries; it names the run then

    async def _read_followed(self, group: str) -> None:
        """The one blocked XREAD of this worker for every run of a slot group
        it follows (`_group`: on one server, every run it follows).

        Each round names every followed run's stream of the group from where
        its mirror is, and the group's wake stream (`_follow` adds an entry to
        it when it adds a run, so that the round in flight ends and the next
        one names the new run): keys of one slot, as a cluster wants. An entry
        that does not continue its mirror means that what came between was
        compacted into the head before this read (the stream is bounded): it
        is read again from the head (`_fill`), not skipped. A mirror that
        closed (its terminal event) is dropped; the task ends once nothing of
        its group is followed.
        """
        wake_key = self._wake_key(group)
        wake = wake_key.encode()
        while True:
            names: dict[bytes, str] = {}
            streams: dict[str, str] = {wake_key: self._woken.get(group, "0-0")}
            for run_id, (mirror, last) in self._followed.items():
                if self._group(mirror.session_key) != group:
                    continue
                key = self._key(mirror.session_key, "log", run_id)
                names[key.encode()] = run_id
                streams[key] = _stream_id(last)
            if not names:
                return
            try:
                reply = await self._xread(wake_key, streams)
                for key, entries in reply or []:
                    if key == wake:
                        self._woken[group] = entries[-1][0].decode()
                        continue
                    await self._apply_read(names[key], entries)
            except Exception as exc:  # not only UNREACHABLE: as a writer's (`_write`)
                metrics.redis_errors.inc()
                logger.warning(
                    "Redis unreachable; following %d runs again soon",
                    len(names),
                    exc_info=not isinstance(exc, UNREACHABLE),
                )
                await asyncio.sleep(0.5)
            for run_id, (mirror, _) in list(self._followed.items()):
                if mirror.closed:
                    del self._followed[run_id]

    async def _xread(self, wake_key: str, streams: dict[str, str]) -> Any:
        """One blocked XREAD of ``streams`` (``{key: id read last}``, keys of
        one slot, the slot of ``wake_key``): what redis-py's ``xread`` gives.

        On a cluster, sent to the node that serves that slot by the client's
        map of slots: redis-py's cluster client would first ask a node it
        chose at its start which of XREAD's arguments are keys (``COMMAND
        GETKEYS``), and on and on if that node died. A node that answers
        ``MOVED``, or not at all, has the client refresh its map; the next
        round goes where the slot is then. Raises one of `UNREACHABLE`."""
        if self.groups is None:
            return await self.redis.xread(streams, block=self.block_ms, count=1000)
        return await self.redis.execute_command(
            *("XREAD", "COUNT", 1000, "BLOCK", self.block_ms, "STREAMS"),
            *streams,
            *streams.values(),
            target_nodes=self.redis.get_node_from_key(wake_key),
        )

    async def _apply_read(self, run_id: str, entries: list[Any]) -> None:
        """Apply the ``entries`` an XREAD gave of run ``run_id`` to its mirror,
        if it is still followed."""
        followed = self._followed.get(run_id)
        if followed is None:
            return  # unfollowed meanwhile
        mirror, last = followed
        for stream_id, fields in entries:
            if not _apply(mirror, stream_id, fields[b"e"], fields[b"d"]):
                last = await self._fill(mirror, last)
                break
            last = _position(stream_id)
        if self._followed.get(run_id, (None,))[0] is mirror:
            self._followed[run_id] = (mirror, last)

    def released(self, log: RunLog) -> None:
        call_in_loop(self._loop, self._released, log)

    def _released(self, run: RunLog) -> None:
        mirror = self._mirrors.get(run.id)
        if mirror is run:
            # The last local subscriber left: stop reading, forget the mirror.
            del self._mirrors[run.id]
            self._unfollow(run.id)
            return
        self.driver.released(run)

    # -- stopping across workers ---------------------------------------------

    async def _ensure_listener(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="detached_runs:redis-stop")
        self._ensure_sweeper()

    def _ensure_sweeper(self) -> None:
        if not self.driver.closing and (self._sweeper is None or self._sweeper.done()):
            self._sweeper = asyncio.create_task(self._sweep(), name="detached_runs:redis-sweep")

    async def _sweep(self) -> None:
        """Every `RENEW_EVERY` seconds, end the runs in flight whose lease lapsed
        (`_reap`): a dead worker's runs end ``interrupted`` within the lease
        bound (``LEASE_MS`` plus a sweep), their subscribers on every worker
        get the terminal event, and their rows are saved (`on_reaped`),
        whether or not anybody asks for them."""
        sweeps = 0
        while not self.driver.closing:
            await asyncio.sleep(self.renew_every)
            sweeps += 1
            try:
                await self._follow_master()
            except UNREACHABLE:
                metrics.redis_errors.inc()
            if self.on_sweep is not None and sweeps % SWEEP_ROWS_EVERY == 0:
                try:
                    await self.on_sweep()
                except Exception:  # the database refuses: the next time, then
                    logger.warning("Could not sweep the rows left running", exc_info=True)
            try:
                due = await self._lua.due(keys=[self._index_key()], args=[100])
            except UNREACHABLE:
                metrics.redis_errors.inc()
                continue  # Redis is unreachable: the writers say so
            for member in due:
                session_key, _, run_id = member.decode().partition(" ")
                try:
                    if await self._reap(session_key, run_id):
                        continue
                    status = await self._call(
                        self.redis.hget(self._key(session_key, "run", run_id), "status")
                    )
                    if status != RUNNING.encode():
                        # Ended, reaped by another worker or lost: not in flight.
                        await self._call(self.redis.zrem(self._index_key(), member))
                except BackendUnavailable:
                    break
                except Exception:  # the sweeper serves every run: it must go on
                    logger.exception("Could not reap run %s of session %s", run_id, session_key)
            await self._save_orphaned_ends()

    async def _save_orphaned_ends(self) -> None:
        """Save the rows of runs that ended in Redis but whose row nobody
        saved: their worker died while retrying the final save
        (`_hold_unsaved`), or they were reaped while the database refused, or
        their reaper died before saving (`_reap`). Redis has their whole log
        and their end; a row already ended is left as it is."""
        try:
            due = await self._lua.due(keys=[self._unsaved_key()], args=[100])
        except UNREACHABLE:
            metrics.redis_errors.inc()
            return
        for member in due:
            session_key, _, run_id = member.decode().partition(" ")
            try:
                fields = await self._call(self.redis.hgetall(self._key(session_key, "run", run_id)))
                info = {k.decode(): v.decode() for k, v in fields.items()}
                if info.get("status") == RUNNING:
                    continue  # not reaped yet (its reaper died first): the sweep reaps it
                if info and self.on_reaped is not None:
                    log = await self._replay(session_key, run_id)
                    logger.warning(
                        "Run %s of session %s ended but its row was not saved (its worker "
                        "died, or the database refused); saving it here",
                        run_id,
                        session_key,
                    )
                    agreed = await self.on_reaped(
                        RunState(
                            run_id=run_id,
                            session_key=session_key,
                            status=info["status"],
                            error=info.get("error", ""),
                            output=log.output(),
                            last_id=log.last_id(),
                            meta=log.meta,
                            finished_at=float(info.get("finished_at") or time.time()),
                            usage=dict(log.usage),
                            first_token_at=_moment(info.get("first_token_at")),
                        )
                    )
                    if agreed:
                        pipe = self.redis.pipeline(transaction=False)
                        await self._expiring(pipe, log, self._grace_ms())
                        await self._call(pipe.execute())
                    else:
                        await self._forget(session_key, run_id, log.meta)
                await self._call(self.redis.zrem(self._unsaved_key(), member))
            except BackendUnavailable:
                return
            except Exception:  # the database still refuses: the next sweep tries again
                logger.warning("Could not save run %s yet", run_id, exc_info=True)

    async def _subscriber(self) -> tuple[Any, Any]:
        """A pub/sub client of Redis, not subscribed yet, and the client it
        comes from if it is one of its own (to close with it), else None.

        On a cluster: a client of its own of one node, the primary of
        `_clock_key`'s slot, asked where that is first (the cluster client
        then finds out about a failover): the messages published on any node
        reach every node. Not redis-py's cluster pub/sub, which borrows the
        node's connections from the cluster client (only from redis-py 8 on),
        whose topology refreshes then disconnect it. Raises one of
        `UNREACHABLE`."""
        if self.groups is None:
            return self.redis.pubsub(), None
        await self._lua.clock(keys=[self._clock_key])
        node = self.redis.get_node_from_key(self._clock_key)
        client = aioredis.Redis(host=node.host, port=node.port, **self._node_options)
        return client.pubsub(), client

    async def _follow_master(self) -> None:
        """Sentinel only: ask the sentinels where the master is now, and if it
        moved (a failover), drop every connection to the old one, in use or
        not: their commands fail and are tried again on the new master.

        redis-py finds a new master only when a connection reconnects, or
        when the old master, made a replica, refuses a write (``READONLY``);
        but a master that Sentinel failed over (``SENTINEL FAILOVER``, or a
        partition) takes writes until Sentinel tells it otherwise, up to 10 s
        later, and those are lost. Each sweep (every ``renew_every`` s) and
        each writer before it writes a run's end asks, so what a run wrote
        meanwhile is found missing by its next append (`redis_scripts.APPEND`:
        the stream does not end where the writer left it) and written again.
        Raises one of `UNREACHABLE` if no sentinel answers."""
        if self._sentinel is None:
            return
        pool = self.redis.connection_pool
        # Compared with this method's last look, not with the pool's address:
        # a connection that reconnected meanwhile updated that (and dropped
        # the idle connections), but the ones in use, a blocked XREAD among
        # them, are still on the old master.
        before = self._master_seen or pool.master_address
        self._master_seen = now = await pool.get_master_address()
        if before is not None and now != before:
            logger.warning(
                "Redis Sentinel moved the master from %s to %s; reconnecting", before, now
            )
            await pool.disconnect(inuse_connections=True)

    async def _listen(self) -> None:
        while True:
            pubsub: Any = None
            client: Any = None
            adopt = f"{self.prefix}:adopt".encode()
            deleted = f"{self.prefix}:delete".encode()
            answered = f"{self.prefix}:input".encode()
            try:
                pubsub, client = await self._subscriber()
                await pubsub.subscribe(f"{self.prefix}:stop", adopt, deleted, answered)
                if self._listened:
                    # Listening again: what was published meanwhile is lost.
                    # Stops and answers have a fallback of their own (a flag
                    # in the run's hash); adoptions are looked for here.
                    self._spawn(self._adopt_missed(), "adopt-missed")
                self._listened = True
                pinged = False
                while True:
                    # Not ``listen()``: it waits for ever on a connection to a
                    # server that hangs or is cut off (it answers nothing, but
                    # its socket stays open), such as a cluster's primary whose
                    # replica took over: every message would be lost from then
                    # on. A channel quiet for ``renew_every`` is sent a PING;
                    # quiet for as long again, it is taken for dead.
                    message = await pubsub.get_message(timeout=self.renew_every)
                    if message is None:
                        if pinged:
                            raise ConnectionError("the pub/sub channel does not answer")
                        await pubsub.ping()
                        pinged = True
                        continue
                    pinged = False
                    if message.get("type") != "message":
                        continue
                    if message.get("channel") == adopt:
                        self._adopted_elsewhere(message["data"])
                        continue
                    if message.get("channel") == deleted:
                        self._deleted_elsewhere(message["data"])
                        continue
                    if message.get("channel") == answered:
                        # "<session> <run> <request>"; a malformed one wakes nobody.
                        words = message["data"].decode(errors="replace").split(" ")
                        wakeup = self._answered.get(words[1]) if len(words) == 3 else None
                        if wakeup is not None:
                            wakeup.set()
                        continue
                    session_key, _, run_id = message["data"].decode().partition(" ")
                    run = self.driver.runs.get(session_key)
                    if run is not None and run.id == run_id:
                        self.driver.request_stop(run)
            except UNREACHABLE:
                metrics.redis_errors.inc()
                logger.warning("Lost the Redis stop channel; listening again soon")
                await asyncio.sleep(0.5)
            finally:
                try:
                    if pubsub is not None:
                        await pubsub.aclose()
                    if client is not None:
                        await client.aclose()
                except UNREACHABLE:
                    metrics.redis_errors.inc()
                    pass

    async def _stop_remote_previous(self, session_key: str) -> asyncio.Event | None:
        """Ask the worker driving the session's run, if another one does, to
        stop it; an event set once it ended (saved), or None if there is none."""
        previous = await self._current(session_key)
        local = self.driver.runs.get(session_key)
        if previous is None or (local is not None and local.id == previous):
            return None
        status = await self._call(
            self.redis.hget(self._key(session_key, "run", previous), "status")
        )
        if status != RUNNING.encode() or await self._reap(session_key, previous):
            return None
        logger.info(
            "Run %s of session %s runs on another worker; asked it to stop, and the "
            "next run waits for its end",
            previous,
            session_key,
        )
        await self._ask_to_stop(session_key, previous)
        remote = asyncio.Event()
        task = asyncio.create_task(
            self._await_end(session_key, previous, remote), name="detached_runs:redis-previous"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return remote

    async def _ask_to_stop(self, session_key: str, run_id: str) -> None:
        """Ask the worker running a run to stop it: at once through the stop
        channel, and, since a message published while that worker's channel
        reconnects is lost, by a flag in the run's hash its writer reads when
        it renews the lease (every `RENEW_EVERY` s)."""
        # Side by side, not in one pipeline: a cluster's pipeline refuses PUBLISH.
        await self._call(
            asyncio.gather(
                self._lua.flag_stop(keys=[self._key(session_key, "run", run_id)]),
                self.redis.publish(f"{self.prefix}:stop", f"{session_key} {run_id}"),
            )
        )

    async def _await_end(self, session_key: str, run_id: str, remote: asyncio.Event) -> None:
        """Set ``remote`` once the other worker saved and ended the run
        (its status is no longer running) or its lease lapsed (it died).

        A run Redis lost (it restarted empty) has no status: that is no end.
        Its writer writes it back within a lease (as `rejoin_within`), without
        the stop's flag, which went with it: the stop is asked again then.
        One that does not come back within a lease has no worker left."""
        meta = self._key(session_key, "run", run_id)
        lease = self._key(session_key, "lease", run_id)
        loop = asyncio.get_running_loop()
        lost_at: float | None = None
        try:
            while True:
                try:
                    status, alive = await asyncio.gather(
                        self.redis.hget(meta, "status"), self.redis.exists(lease)
                    )
                except UNREACHABLE:
                    metrics.redis_errors.inc()
                    await asyncio.sleep(0.5)
                    continue
                if status is None:
                    if lost_at is None:
                        lost_at = loop.time()
                        logger.warning(
                            "Redis lost run %s of session %s, whose end the next run waits "
                            "for; waiting up to %s s for its worker to write it back",
                            run_id,
                            session_key,
                            self.lease_ms / 1000,
                        )
                    elif loop.time() - lost_at > self.lease_ms / 1000:
                        logger.warning("Run %s did not come back; the next run goes on", run_id)
                        return
                    await asyncio.sleep(0.05)
                    continue
                if lost_at is not None:
                    lost_at = None
                    with contextlib.suppress(BackendUnavailable):
                        await self._ask_to_stop(session_key, run_id)
                if status != RUNNING.encode():
                    return
                # Its lease lapsed: ended here, unless it is back (renewed late,
                # its worker alive: the run goes on, and so does the wait), or
                # Redis is unreachable at the reap (tried again: a wait that
                # ended here would let the next run begin before this one's end).
                try:
                    if not alive and await self._reap(session_key, run_id):
                        return
                except BackendUnavailable:
                    await asyncio.sleep(0.5)
                    continue
                await asyncio.sleep(0.05)
        finally:
            remote.set()

    # -- runs whose worker died ----------------------------------------------

    async def _reap(self, session_key: str, run_id: str) -> bool:
        """End a running run whose worker is gone; True if this call ended it.

        Its worker is gone when its lease lapsed, or at once when the lease
        names a process of this host that no longer exists (a restart after a
        crash). The run ends ``interrupted`` with what its stream holds (its
        text, and its usage: the merge of its ``usage`` events): nothing that
        reached Redis is lost. Atomic (a script), so of several
        workers noticing at once exactly one writes the terminal event.
        """
        local = self.driver.runs.get(session_key)
        if local is not None and local.id == run_id:
            return False
        holder, status, first_token = await self._call(
            self.redis.pipeline(transaction=False)
            .get(self._key(session_key, "lease", run_id))
            .hget(self._key(session_key, "run", run_id), "status")
            .hget(self._key(session_key, "run", run_id), "first_token_at")
            .execute()
        )
        if status != RUNNING.encode() or (holder is not None and not process_gone(holder.decode())):
            return False
        # Due for a sweep's save before its end is written: if this worker dies
        # between the two, or the database refuses, the row is still saved
        # (`_save_orphaned_ends`; saving an end twice writes it once).
        member = f"{session_key} {run_id}"
        await self._call(self.redis.zadd(self._unsaved_key(), {member: 0}))
        log = await self._replay(session_key, run_id)
        terminal = Position(log.position.text, log.position.seq + 1)
        status_, error, output, rest = INTERRUPTED, "", log.output(), ""
        saved = await self._saved_end(log)
        if saved is not None:
            # Its worker saved it, then died before its log reached Redis (a
            # shutdown or a kill while Redis paused its writes): the end is
            # the row's, and the text Redis lacks goes in with it, so that
            # followers on every worker get the one end the row has.
            status_, error, output, rest, terminal = saved
        start_id = start_data = ""
        if saved is None and log.position == ORIGIN:
            # Its worker died after it wrote the run and before the run's
            # first event reached Redis: the log begins with a start all the
            # same (every replay does).
            start_id = _stream_id(Position(0, 1))
            start_data = json.dumps(
                {"run": str(uuid.UUID(run_id)), "prompt": log.meta.get("prompt", "")}
            )
            terminal = Position(0, 2)
        grace = max(int(self.evict_after * 1000), 1)
        done: dict[str, Any] = {"status": status_, **({"error": error} if error else {})}
        reaped = await self._call(
            self._lua.reap(
                keys=[
                    self._key(session_key, "run", run_id),
                    self._key(session_key, "log", run_id),
                    self._key(session_key, "current"),
                    self._key(session_key, "head", run_id),
                    self._key(session_key, "lease", run_id),
                ],
                args=[
                    _stream_id(terminal),
                    json.dumps(done),
                    str(time.time()),
                    grace,
                    run_id,
                    self.maxlen,
                    self.keep,
                    HEAD_PIECE,
                    status_,
                    error,
                    _stream_id(Position(terminal.text, terminal.seq - 1)) if rest else "",
                    json.dumps({"text": rest}) if rest else "",
                    start_id,
                    start_data,
                    # Only if the lease is still as read: not renewed meanwhile.
                    holder or b"",
                ],
            )
        )
        if reaped:
            logger.warning("Run %s of session %s lost its worker: %s", run_id, session_key, status_)
            await self._call(self._in_sets(self._tracked(session_key, run_id, log.meta), add=False))
            if self.on_reaped is not None:
                state = RunState(
                    run_id=run_id,
                    session_key=session_key,
                    status=status_,
                    error=error,
                    output=output,
                    last_id=make_id(run_id, terminal),
                    meta=log.meta,
                    finished_at=time.time(),
                    # Its usage events are in its log: what the agent reported
                    # up to the last event that reached Redis.
                    usage=dict(log.usage),
                    first_token_at=_moment(first_token),
                )
                try:
                    if not await self.on_reaped(state):
                        await self._forget(session_key, run_id, log.meta)
                except Exception:
                    # The database refuses: the run is ended all the same, and
                    # a later sweep saves its row (`_save_orphaned_ends`, which
                    # then lets the keys expire): they are kept until then, or
                    # an outage longer than the grace would lose the end and
                    # text the row needs (fault injection, seed 295).
                    logger.warning("Could not save the end of run %s yet", run_id, exc_info=True)
                    with contextlib.suppress(*UNREACHABLE):
                        await (
                            self.redis.pipeline(transaction=False)
                            .persist(self._key(session_key, "run", run_id))
                            .persist(self._key(session_key, "log", run_id))
                            .persist(self._key(session_key, "head", run_id))
                            .execute()
                        )
                    return True
            with contextlib.suppress(*UNREACHABLE):
                await self.redis.zrem(self._unsaved_key(), member)
        return bool(reaped)

    async def _saved_end(self, log: RunLog) -> tuple[str, str, str, str, Position] | None:
        """The end the run's row holds, if its worker saved one that continues
        what Redis has (the same text and more, no event missing): ``(status,
        error, output, the text Redis lacks, terminal position)``; else None."""
        if self.saved_end is None or "uuid" not in log.meta:
            return None
        try:
            saved = await self.saved_end(log.meta["uuid"])
        except Exception:  # the database refuses: reaped from Redis alone
            logger.warning("Could not read the row of run %s", log.id, exc_info=True)
            return None
        if saved is None:
            return None
        status, error, output, last_id = saved
        try:
            run_id, terminal = parse_id(last_id)
        except BadEventId:
            return None
        data, have = output.encode(), log.output().encode()
        if (
            run_id != log.id
            or terminal.text != len(data)
            or terminal.seq != log.position.seq + 1
            or not data.startswith(have)
        ):
            return None
        return status, error, output, data[len(have) :].decode(), terminal

    # -- helpers -----------------------------------------------------------

    async def _current(self, session_key: str) -> str | None:
        value = await self._call(self.redis.get(self._key(session_key, "current")))
        return value.decode() if value else None

    def _count_key(self, key: str, value: str) -> str:
        """The set of runs in flight whose ``meta[key]`` is ``value`` (`count_running`):
        a sorted set of run ids scored by their lease's expiry (ms)."""
        return f"{self.prefix}:{key}:{value}:in-flight"

    def _unsaved_key(self) -> str:
        """Ended runs whose row is not saved yet (``"<session> <run>"``): scored
        by the expiry of their worker's hold on them while it retries their
        final save (`_hold_unsaved`), or 0 for a run reaped while the database
        refused (`_reap`). A sweep saves those that are due."""
        return f"{self.prefix}:unsaved"

    def _index_key(self) -> str:
        """Every run in flight (``"<session> <run>"``, scored by its lease's expiry):
        where live workers find the runs of a dead one (`_sweep`)."""
        return f"{self.prefix}:in-flight"

    def _tracked(
        self, session_key: str, run_id: str, meta: dict[str, Any]
    ) -> list[tuple[str, str]]:
        """``(sorted set, member)`` of each set a run is in while in flight."""
        return [
            (self._index_key(), f"{session_key} {run_id}"),
            *((key, run_id) for key in self._counted_keys(meta)),
        ]

    def _counted_keys(self, meta: dict[str, Any]) -> list[str]:
        """The sets a run with this meta is in while in flight: its owner's,
        and its address's if it has one (an anonymous owner's run)."""
        keys = [self._count_key("owner", meta.get("owner", ""))]
        if meta.get("address"):
            keys.append(self._count_key("address", meta["address"]))
        return keys

    async def _in_sets(self, entries: list[tuple[str, str]], *, add: bool) -> None:
        pipe = self.redis.pipeline(transaction=False)
        if add:
            await self._touch(pipe, entries)
        else:
            for key, member in entries:
                pipe.zrem(key, member)
        await pipe.execute()

    async def _touch(self, pipe: Any, entries: list[tuple[str, str]]) -> None:
        # One key per script: each set may live in another Cluster slot.
        swept = (self._index_key(), self._unsaved_key())
        for key, member in entries:
            flag = "0" if key in swept else "1"
            await self._lua.touch(keys=[key], args=[member, self.lease_ms, flag], client=pipe)

    # -- adopting (a visitor who logs in) ------------------------------------

    async def _adopt_here(self, owner: str, new_owner: str) -> list[DrivenRun]:
        """Adopt the runs this worker drives (its copy of their meta, what Redis
        holds, the sets they are counted in) and the mirrors it follows."""
        for mirror in self._mirrors.values():
            if mirror.meta.get("owner") == owner:
                _adopt_meta(mirror.meta, new_owner)
        driven = [run for run in self.driver.runs.values() if run.meta.get("owner") == owner]
        # All at once, before any await: the end of a run takes it out of the
        # sets its meta names when the end is written, which may come next.
        moves = [
            (run, [(key, run.id) for key in self._counted_keys(run.meta)], not run.closed)
            for run in driven
        ]
        for run in driven:
            _adopt_meta(run.meta, new_owner)
        new_set = self._count_key("owner", new_owner)
        for run, old_sets, in_flight in moves:
            await self._adopt_stored(run.session_key, run.id, owner, new_owner)
            await self._call(self._in_sets(old_sets, add=False))
            if in_flight:
                await self._call(self._in_sets([(new_set, run.id)], add=True))
                if run.closed:
                    # It ended meanwhile: its end may have left the new owner's
                    # set before this worker put it there.
                    await self._call(self.redis.zrem(new_set, run.id))
        return driven

    async def _adopt_stored(
        self, session_key: str, run_id: str, owner: str, new_owner: str
    ) -> bool:
        """Rewrite the meta Redis holds of a run of ``owner`` (if it still holds
        it: no key is created again); True if this call changed it. The run
        leaves its address's set; its owner's set is its worker's to change."""
        key = self._key(session_key, "run", run_id)
        for _attempt in range(3):
            stored = await self._call(self.redis.hget(key, "meta"))
            if not stored:
                return False
            meta = json.loads(stored)
            if meta.get("owner") != owner:
                return False
            address = meta.get("address")
            _adopt_meta(meta, new_owner)
            swapped = self._lua.swap_meta(keys=[key], args=[stored, json.dumps(meta)])
            if await self._call(swapped):
                if address:
                    await self._call(self.redis.zrem(self._count_key("address", address), run_id))
                return True
        return False

    def _adopted_elsewhere(self, data: bytes) -> None:
        """A message on ``<prefix>:adopt``: adopt the runs this worker drives."""
        try:
            message = json.loads(data)
            owner, new_owner = str(message["owner"]), str(message["new_owner"])
        except (ValueError, KeyError, TypeError):
            logger.warning("Ignored a malformed message on %s:adopt", self.prefix)
            return
        if not any(
            r.meta.get("owner") == owner
            for r in [*self.driver.runs.values(), *self._mirrors.values()]
        ):
            return
        task = asyncio.create_task(
            self._adopt_logged(owner, new_owner), name="detached_runs:redis-adopt"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _adopt_missed(self) -> None:
        """Adoptions published while this worker's channel was down: the
        runs it drives or follows that still have an anonymous owner here,
        whose meta in Redis names a user now (`adopt` rewrote it), are
        adopted here too. Never the other way: an adoption only ever moves a
        run from an anonymous owner to a user."""
        logs = [
            log
            for log in [*self.driver.runs.values(), *self._mirrors.values()]
            if str(log.meta.get("owner", "")).startswith(ANONYMOUS)
        ]
        if not logs:
            return
        pipe = self.redis.pipeline(transaction=False)
        for log in logs:
            pipe.hget(self._key(log.session_key, "run", log.id), "meta")
        try:
            stored = await pipe.execute()
        except UNREACHABLE:
            metrics.redis_errors.inc()
            return  # cut off again: the next subscription looks again
        moves: dict[str, str] = {}
        for log, meta in zip(logs, stored, strict=True):
            owner = json.loads(meta).get("owner") if meta else None
            if isinstance(owner, str) and owner and not owner.startswith(ANONYMOUS):
                moves[log.meta["owner"]] = owner
        for owner, new_owner in moves.items():
            logger.info("Adopting the runs of %s here, whose message was lost", owner)
            await self._adopt_logged(owner, new_owner)

    async def _adopt_logged(self, owner: str, new_owner: str) -> None:
        try:
            await self._adopt_here(owner, new_owner)
        except BackendUnavailable:
            logger.warning("Redis unreachable; could not adopt the runs of %s here", owner)

    def _session_lock(self, session_key: str) -> _SessionLock:
        return _SessionLock(self, self._key(session_key, "lock"))

    async def now(self) -> float:
        """Redis's clock (`BaseBackend.now`); on a cluster, always the clock
        of the node that holds ``<prefix>:clock``'s slot (a key never
        written), so that starts taken in turn get times in order.
        `BackendUnavailable` if Redis is unreachable."""
        seconds, micros = await self._call(self._lua.clock(keys=[self._clock_key]))
        return float(int(seconds) + int(micros) / 1_000_000)

    def ordered(self, session_key: str) -> _SessionLock:
        """The session's Redis lock (`_SessionLock`), which `start` takes too."""
        return self._session_lock(session_key)

    async def _call(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except UNREACHABLE as exc:
            metrics.redis_errors.inc()
            raise BackendUnavailable("The run store (Redis) is unreachable; try again.") from exc


#: The task of this process holding each session lock it holds (`_SessionLock`).
_HOLDERS: dict[str, asyncio.Task[Any]] = {}


class _SessionLock:
    """Orders starts of one session across workers: redis-py's `Lock` (a
    token under ``SET NX PX``, released only by its holder), held at most
    ``LOCK_MS`` and waited for as long."""

    def __init__(self, backend: RedisBackend, key: str) -> None:
        self.key = key
        self.lock = backend.redis.lock(
            key, timeout=LOCK_MS / 1000, sleep=0.01, blocking_timeout=LOCK_MS / 1000
        )
        #: Whether this one holds the lock (not: the task held it already).
        self._holding = False

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        if task is not None and _HOLDERS.get(self.key) is task:
            # Taken by this task already (`RedisBackend.ordered` around a start):
            # a second acquire would wait for itself.
            return
        try:
            acquired = await self.lock.acquire()
        except UNREACHABLE as exc:
            metrics.redis_errors.inc()
            raise BackendUnavailable("The run store (Redis) is unreachable; try again.") from exc
        if not acquired:
            raise BackendUnavailable("The session is busy; try again.")
        self._holding = True
        if task is not None:
            _HOLDERS[self.key] = task

    async def __aexit__(self, *exc: object) -> None:
        if not self._holding:
            return
        self._holding = False
        _HOLDERS.pop(self.key, None)
        try:
            await self.lock.release()
        except UNREACHABLE:  # LockNotOwnedError: it expired (and may be taken)
            logger.warning("Could not release %s; it expires by itself", self.key)


class _Questions(SharedQuestions):
    """The Redis backend's side of `RunDriver.ask` (`SharedQuestions`): the
    pending request in the run's hash, answers taken there by any worker."""

    def __init__(self, backend: RedisBackend) -> None:
        self.backend = backend
        # One per run waiting here. A take and the delivery of what it took
        # hold it: the timeout's withdrawal waits for a take in flight (the
        # watch's), so an answer taken from Redis is never dropped between.
        self._takes: dict[str, asyncio.Lock] = {}

    def _run_key(self, run: DrivenRun) -> str:
        return self.backend._key(run.session_key, "run", run.id)

    def _lock(self, run: DrivenRun) -> asyncio.Lock:
        return self._takes.get(run.id) or asyncio.Lock()

    async def opened(self, run: DrivenRun, request: str) -> None:
        backend = self.backend
        backend._answered[run.id] = wakeup = asyncio.Event()
        self._takes[run.id] = lock = asyncio.Lock()
        try:
            recorded = await backend._lua.ask(keys=[self._run_key(run)], args=[request])
        except UNREACHABLE:
            metrics.redis_errors.inc()
            logger.warning("Redis unreachable; run %s asks without it for now", run.id)
            recorded = 0
        except BaseException:
            self._forget(run, wakeup, lock)
            raise
        if not recorded:
            # Unreachable, or Redis does not hold the run (it lost it: the
            # writer puts it back): answers are refused (503, 409) meanwhile,
            # and the question is recorded by the next look (`watch`).
            wakeup.set()

    def _forget(self, run: DrivenRun, wakeup: asyncio.Event, lock: asyncio.Lock | None) -> None:
        # Only this question's: the run's next one may be open already.
        if self.backend._answered.get(run.id) is wakeup:
            del self.backend._answered[run.id]
        if self._takes.get(run.id) is lock:
            del self._takes[run.id]

    async def watch(self, run: DrivenRun, request: str) -> None:
        backend = self.backend
        wakeup = backend._answered.setdefault(run.id, asyncio.Event())
        lock = self._takes.get(run.id)
        recorded = not wakeup.is_set()  # set by `opened` when it could not record it
        try:
            while True:
                try:
                    await asyncio.wait_for(wakeup.wait(), backend.renew_every)
                except TimeoutError:
                    pass
                wakeup.clear()
                try:
                    if not recorded:
                        recorded = bool(
                            await backend._lua.ask(keys=[self._run_key(run)], args=[request])
                        )
                    if await self._deliver(run, request, withdraw=False):
                        return
                except UNREACHABLE:
                    metrics.redis_errors.inc()
                    recorded = False
        finally:
            self._forget(run, wakeup, lock)

    async def _deliver(self, run: DrivenRun, request: str, *, withdraw: bool) -> bool:
        """Take the answer kept for ``request`` (and with ``withdraw``, the
        question too) and `RunDriver.deliver` it, as one step for this
        worker; True if one was taken. Raises one of `UNREACHABLE` if
        Redis is unreachable."""
        async with self._lock(run):
            value = await self.backend._lua.take(
                keys=[self._run_key(run)], args=[request, "1" if withdraw else "0"]
            )
            if value is None:
                return False
            self.backend.driver.deliver(run, request, json.loads(value))
            return True

    async def withdraw(self, run: DrivenRun, request: str) -> None:
        """See `SharedQuestions.withdraw`: tried again while Redis is
        unreachable (an answer may have been taken there meanwhile), until
        it answers or the run's end is in Redis (which refuses answers)."""
        delay = 0.1
        while True:
            try:
                await self._deliver(run, request, withdraw=True)
                return
            except UNREACHABLE:
                metrics.redis_errors.inc()
                if run.closed:
                    return
                logger.warning("Redis unreachable; run %s withdraws its question later", run.id)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def given(self, run: DrivenRun, request: str, value: Any, pending: Any) -> bool:
        """An answer this worker took in Redis for its own ``run``: give it
        to the agent now, unless a take in flight (the watch's, the
        timeout's) delivers it first; then clear it from Redis. True if the
        agent has it (``pending``, the run's question when it was taken,
        has a result: only one answer to a request is ever taken)."""
        async with self._lock(run):
            self.backend.driver.deliver(run, request, value)
        self.backend._spawn(self.withdraw(run, request), "input-taken")
        future = pending[1] if pending is not None and pending[0] == request else None
        return (
            future is not None
            and future.done()
            and not future.cancelled()
            and future.exception() is None
        )

    def abandoned(self, run: DrivenRun, request: str) -> None:
        self.backend._spawn(self.withdraw(run, request), "input-withdrawn")


def _event_position(event: Event) -> Position:
    return _position(event.id.rpartition(":")[2])


def _apply(
    mirror: RunLog, stream_id: bytes, event: bytes, data: bytes, *, over_gap: bool = False
) -> bool:
    """Append one entry of a run's log (of its stream, or a piece of its head)
    to a mirror; positions follow from the order. False, and nothing appended,
    if it does not continue the mirror (what comes between is missing), unless
    ``over_gap``: then it is appended all the same."""
    position = _position(stream_id)
    at = mirror.position
    if position <= at:
        return True  # already there (a replay and a read that overlapped)
    kind = event.decode()
    fields = json.loads(data)
    if kind == DELTA:
        text = fields["text"].encode()
        begins = position.text - len(text)
        if position.seq != at.seq or begins > at.text:
            if not over_gap:
                return False
        elif begins < at.text:
            # A merged delta that overlaps what the mirror has (a piece of the
            # head, or the stream written again after Redis lost it): append
            # only the new part.
            text = text[at.text - begins :]
        mirror.append_text(text.decode())
    elif position == Position(at.text, at.seq + 1) or over_gap:
        mirror.append_event(kind, fields)
    else:
        return False
    if mirror.position != position:
        logger.error("Run %s: stream id %s does not match the log", mirror.id, position)
    if kind == DONE:
        mirror.mark_finished(fields.get("status", "done"), fields.get("error", ""))
    return True

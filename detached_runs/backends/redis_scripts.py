"""The Redis backend's Lua scripts (`detached_runs.backends.redis`), and the
codes they return. Each runs atomically in Redis: the checks and writes that
must not interleave with another worker's (an append fenced by the run's
status, a reap that exactly one worker writes, a compaction of a stream into
its head). `Scripts` registers them with redis-py."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import ClusterPipeline

#: What `APPEND` returns when Redis lost the run (it restarted empty), when
#: the run ended (another worker reaped it), or when the stream does not end
#: where the writer left it (a failover lost its last writes).
GAP, MISSING, ENDED = -3, -2, -1

# Lua shared by the scripts below (a script cannot call another).
#
# compact: once the run's stream holds more than `maxlen` entries, move all but
# the newest `keep` into the run's head: a list of (id, event, data) triples in
# the order of the log, where consecutive deltas are merged into one whose id
# is the position of its last byte (as in a replay: the backend reads it like any
# entry). The head's last delta goes on growing while it is under `piece`
# bytes, so a head holds about one entry per `piece` bytes of text plus the
# run's other events, and each compaction rewrites at most `piece` bytes of it.
#
# expire: expire keys at one instant, so that no reader finds a run's head gone
# and its stream still there (or the other way round).
LUA = """
local function compact(log, head, maxlen, keep, piece)
  local length = redis.call('xlen', log)
  if length <= maxlen then return end
  local function seq(id) return string.match(id, '%-(%d+)$') end
  local id, parts, size, grown, replace = nil, {}, 0, false, false
  if redis.call('lindex', head, -2) == 'delta' then
    local data = redis.call('lindex', head, -1)
    if #data < piece then
      id, parts, size = redis.call('lindex', head, -3), {cjson.decode(data).text}, #data
      replace = true
    end
  end
  local function flush()
    if grown then
      local data = cjson.encode({text = table.concat(parts)})
      if replace then
        redis.call('lset', head, -3, id)
        redis.call('lset', head, -1, data)
      else
        redis.call('rpush', head, id, 'delta', data)
      end
    end
    id, parts, size, grown, replace = nil, {}, 0, false, false
  end
  for _, entry in ipairs(redis.call('xrange', log, '-', '+', 'COUNT', length - keep)) do
    local fields = {}
    for i = 1, #entry[2], 2 do fields[entry[2][i]] = entry[2][i + 1] end
    if fields.e == 'delta' then
      if id ~= nil and (size >= piece or seq(id) ~= seq(entry[1])) then flush() end
      local text = cjson.decode(fields.d).text
      table.insert(parts, text)
      id, size, grown = entry[1], size + #text, true
    else
      flush()
      redis.call('rpush', head, entry[1], fields.e, fields.d)
    end
  end
  flush()
  redis.call('xtrim', log, 'MAXLEN', keep)
end

local function expire(keys, ms)
  local now = redis.call('time')
  local at = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + ms
  for _, key in ipairs(keys) do redis.call('pexpireat', key, at) end
end
"""

# The writer's append, fenced on the run's status: a worker that lost its run
# (its lease lapsed and another worker ended it) cannot write past the end.
# And on the stream's last id: a primary that took over from one that died
# (a failover; replication is asynchronous) may lack the last entries the
# writer wrote, and entries written after them would leave a hole in the
# log. The writer then reads where the stream ends and writes from there
# (`RedisBackend._resync`). A compaction always leaves the last entry in the
# stream. KEYS: log, run hash, head. ARGV: maxlen, keep, piece, the id of the
# last entry the writer wrote ('0-0': none), then (stream id, event, data)
# triples.
APPEND = (
    LUA
    + """
local status = redis.call('hget', KEYS[2], 'status')
if not status then return -2 end
if status ~= 'running' then return -1 end
local last = redis.call('xrevrange', KEYS[1], '+', '-', 'COUNT', 1)[1]
if (last and last[1] or '0-0') ~= ARGV[4] then return -3 end
for i = 5, #ARGV, 3 do
  redis.call('xadd', KEYS[1], ARGV[i], 'e', ARGV[i + 1], 'd', ARGV[i + 2])
end
compact(KEYS[1], KEYS[3], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))
return 1
"""
)

# A run's keys when it starts, or when its writer puts back a run Redis lost:
# its hash, its lease, and the session's "current" pointer (with ARGV[4] =
# '1' only if the session has none: a start elsewhere may have taken it
# meanwhile; '2': not at all, for a stopped run that a newer one may have
# replaced: `RedisBackend._resync`). One script, not a MULTI:
# on a cluster, redis-py's asyncio transactions run each queued command on a
# thread of its own. KEYS: run hash, lease, current. ARGV: worker, lease ms,
# run id, '0' (replace), '1' (only if none) or '2' (leave it), then the
# hash's fields and values.
START = """
redis.call('hset', KEYS[1], unpack(ARGV, 5))
redis.call('set', KEYS[2], ARGV[1], 'PX', ARGV[2])
if ARGV[4] == '1' then
  redis.call('set', KEYS[3], ARGV[3], 'NX')
elseif ARGV[4] == '0' then
  redis.call('set', KEYS[3], ARGV[3])
end
return 1
"""

# Redis's clock (TIME), on the node that holds KEYS[1]: on a cluster, always
# the same node's for the same key (its primary's), so that the times of
# starts taken in turn are in order. KEYS: a key whose slot chooses the node.
CLOCK = """
return redis.call('time')
"""

# Put a member in a sorted set of runs in flight, scored by when its lease
# lapses (Redis's clock: every worker's the same). With ARGV[3] = '1' the set
# goes when no member has been renewed for two leases (an owner's, an
# address's); the sets the sweeps read never do, or the runs of workers that
# all died would be forgotten. KEYS: the set. ARGV: member, lease ms, expire.
TOUCH = """
local now = redis.call('time')
local ms = tonumber(ARGV[2])
redis.call('zadd', KEYS[1], now[1] * 1000 + math.floor(now[2] / 1000) + ms, ARGV[1])
if ARGV[3] == '1' then redis.call('pexpire', KEYS[1], 2 * ms) end
return 1
"""

# How many runs of a sorted set of runs in flight hold a lease now; the ones
# whose lease lapsed go. KEYS: the set.
COUNT = """
local now = redis.call('time')
redis.call('zremrangebyscore', KEYS[1], '-inf', now[1] * 1000 + math.floor(now[2] / 1000))
return redis.call('zcard', KEYS[1])
"""

# Up to ARGV[1] runs in flight whose lease lapsed (`_sweep`). KEYS: the index.
DUE = """
local now = redis.call('time')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)
return redis.call('zrangebyscore', KEYS[1], '-inf', ms, 'LIMIT', 0, tonumber(ARGV[1]))
"""

# Renew a lease only while Redis still holds the run, running: one that
# another worker ended (reaped: this worker was cut off past its lease)
# is -1 (`ENDED`), and its lease is not renewed. KEYS: lease, run hash.
# ARGV: worker, lease ms.
RENEW = """
local status = redis.call('hget', KEYS[2], 'status')
if not status then return 0 end
if status ~= 'running' then return -1 end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('hget', KEYS[2], 'stop') == '1' then return 2 end
return 1
"""
#: What `RENEW` returns when a stop was asked through the run's hash.
STOP_ASKED = 2

# Flag a run to stop, if Redis holds it (no hash is created). KEYS: run hash.
FLAG_STOP = """
if redis.call('exists', KEYS[1]) == 1 then redis.call('hset', KEYS[1], 'stop', '1') end
return 1
"""

# An agent's question (ctx.ask) is pending: answers to it are taken from now
# on, in any worker, while the run is running. KEYS: run hash. ARGV: request.
ASK = """
if redis.call('hget', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('hset', KEYS[1], 'input', ARGV[1])
return 1
"""

# Take an answer to the pending request, once: it is kept in the run's hash
# for the run's worker (`TAKE`). KEYS: run hash. ARGV: request, value (JSON).
ANSWER = """
if redis.call('hget', KEYS[1], 'status') ~= 'running'
  or redis.call('hget', KEYS[1], 'input') ~= ARGV[1]
  or redis.call('hget', KEYS[1], 'stop') == '1' then
  return 0
end
redis.call('hdel', KEYS[1], 'input')
redis.call('hset', KEYS[1], 'answered', ARGV[1], 'answer', ARGV[2])
return 1
"""

# The run's worker takes the answer `ANSWER` kept (its JSON, or nil if there is
# none yet); with ARGV[2] = '1' the question is withdrawn as well (it timed
# out, or the run stops), so that no answer is taken any more. KEYS: run hash.
# ARGV: request, withdraw.
TAKE = """
if redis.call('hget', KEYS[1], 'answered') == ARGV[1] then
  local value = redis.call('hget', KEYS[1], 'answer')
  redis.call('hdel', KEYS[1], 'answered', 'answer')
  return value
end
if ARGV[2] == '1' and redis.call('hget', KEYS[1], 'input') == ARGV[1] then
  redis.call('hdel', KEYS[1], 'input')
end
return false
"""

# KEYS: run hash, log, current, head, lease. ARGV: terminal id, its data, finished_at,
# grace (ms), run id, maxlen, keep, piece, status, error, the id and data of a
# last delta (or two empty strings): the text its worker saved but never wrote
# to Redis, and the id and data of a start event (or two empty strings): for
# a run whose worker died before its first event reached Redis; then the
# lease's holder the reaper read ('' for none): a lease renewed since (its
# worker was only late: Redis paused its writes) keeps the run alive.
REAP = (
    LUA
    + """
if redis.call('hget', KEYS[1], 'status') ~= 'running' then return 0 end
if (redis.call('get', KEYS[5]) or '') ~= ARGV[15] then return 0 end
redis.call('hset', KEYS[1], 'status', ARGV[9], 'error', ARGV[10], 'finished_at', ARGV[3])
if ARGV[13] ~= '' then redis.call('xadd', KEYS[2], ARGV[13], 'e', 'start', 'd', ARGV[14]) end
if ARGV[11] ~= '' then redis.call('xadd', KEYS[2], ARGV[11], 'e', 'delta', 'd', ARGV[12]) end
redis.call('xadd', KEYS[2], ARGV[1], 'e', 'done', 'd', ARGV[2])
compact(KEYS[2], KEYS[4], tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]))
expire({KEYS[1], KEYS[2], KEYS[4]}, tonumber(ARGV[4]))
if redis.call('get', KEYS[3]) == ARGV[5] then redis.call('pexpire', KEYS[3], ARGV[4]) end
return 1
"""
)

# A run's keys expire once it ended; the session's "current" pointer only if
# it still names this run: a newer run may have taken the session meanwhile (a
# double send). KEYS: run hash, log, head, current. ARGV: grace (ms), run id.
EXPIRE_RUN = (
    LUA
    + """
expire({KEYS[1], KEYS[2], KEYS[3]}, tonumber(ARGV[1]))
if redis.call('get', KEYS[4]) == ARGV[2] then redis.call('pexpire', KEYS[4], ARGV[1]) end
return 1
"""
)

# Drop the session's "current" pointer if it names this run. KEYS: current.
# ARGV: run id.
DROP_CURRENT = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""

# Make the session's "current" pointer name run ARGV[2] if it names run
# ARGV[1]. KEYS: current.
SWAP_CURRENT = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('set', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# Replace a run's stored meta only if it is still the one read (and the run is
# still there). KEYS: run hash. ARGV: the meta read, the new meta.
SWAP_META = """
if redis.call('hget', KEYS[1], 'meta') ~= ARGV[1] then return 0 end
redis.call('hset', KEYS[1], 'meta', ARGV[2])
return 1
"""


class Script:
    """One script registered with a client (``register_script``): called by
    its SHA1 (``EVALSHA``), loaded again by redis-py if Redis lost it (a
    restart, a failover), and in a pipeline of one server loaded by the
    pipeline before it runs. In a cluster's pipeline it is sent whole
    (``EVAL``): redis-py's cluster pipeline neither loads scripts nor
    answers ``NOSCRIPT`` by loading one, and each node has a cache of its
    own."""

    def __init__(self, redis: Any, text: str) -> None:
        self.text = text
        self.registered = redis.register_script(text)

    async def __call__(
        self, keys: Sequence[str], args: Sequence[Any] = (), client: Any = None
    ) -> Any:
        """Run it (or, with ``client`` a pipeline, queue it there); what the
        script returns. Raises what redis-py raises (`RedisError`, `OSError`)."""
        if isinstance(client, ClusterPipeline):
            return client.eval(self.text, len(keys), *keys, *args)
        return await self.registered(keys=keys, args=args, client=client)


class Scripts:
    """This module's Lua scripts, registered with a client (`Script`)."""

    def __init__(self, redis: Any) -> None:
        self.answer = Script(redis, ANSWER)
        self.append = Script(redis, APPEND)
        self.ask = Script(redis, ASK)
        self.clock = Script(redis, CLOCK)
        self.count = Script(redis, COUNT)
        self.drop_current = Script(redis, DROP_CURRENT)
        self.due = Script(redis, DUE)
        self.expire_run = Script(redis, EXPIRE_RUN)
        self.flag_stop = Script(redis, FLAG_STOP)
        self.reap = Script(redis, REAP)
        self.renew = Script(redis, RENEW)
        self.start = Script(redis, START)
        self.swap_current = Script(redis, SWAP_CURRENT)
        self.swap_meta = Script(redis, SWAP_META)
        self.take = Script(redis, TAKE)
        self.touch = Script(redis, TOUCH)

"""Flow control across every worker: unique jobs, concurrency limits, rate limits.

All of it lives in the broker's Redis, next to the delivery records, so that one Lua step can
both decide and act:

- **Unique jobs** are claimed by the producer (`claim_unique`): `SET key task-id NX EX ttl`.
  A second enqueue while the key is held gets the holder's task id and publishes nothing. The
  worker releases the key (only if it still names the job) when the job succeeds, is
  discarded, dies or expires; a retry keeps it. A killed worker's job is put back in its queue
  by the heartbeat recovery and still holds the key (it is still queued) until that run ends.
  A job enqueued inside a database transaction (the outbox) exists only once that commits, so
  the claim notes the transaction's id (`txid_current()`, beside the key); a later enqueue
  refused by a claim whose transaction PostgreSQL reports aborted (the enqueuing process died
  before its commit, or rolled back without running its callbacks) takes the key over, rather
  than be refused for the key's lifetime by a job that will never run.
- **Concurrency limits and rate limits** are decided by the worker's channel when it takes a
  message (`admit`, script ADMIT), before the job reaches the pool. A job over a limit is moved,
  in the same step, from its delivery into the scheduled set: nothing spins, and no worker
  holds it. A job waiting for a concurrency slot is also put on the limit's waiting list; the
  step that frees a slot hands it to the head of that list and moves that job to its queue
  (arrival order). A slot is held as `<worker>|<task id>`: a slot whose worker's heartbeat has
  lapsed, or whose `duration` has run out, is taken back by the next admission or by the
  heartbeat recovery (`reap`). A job deferred by a rate limit is due when the window lets it
  run; deferred jobs are spread over the following windows so that they do not all wake at once.

Neither limit uses up an attempt: the message itself (its bytes, headers and attempt counts)
is what waits in the scheduled set.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from app.delivery import scheduled, scripts
from app.delivery.records import Keys

if TYPE_CHECKING:
    from app.delivery.transport import Channel

logger = logging.getLogger(__name__)

#: Headers the job layer and the channel write.
UNIQUE_HEADER = "job_unique_key"
EXPIRES_HEADER = "job_expires_at"
ADMITTED_HEADER = "job_admitted_at"

#: A slot whose holder vanished without a heartbeat to show it (not a killed worker, which the
#: heartbeat recovery finds) comes back after this many seconds unless the limit says otherwise.
DEFAULT_DURATION = 15 * 60.0
#: The longest a key may be; longer ones are cut and suffixed with a hash of the whole.
MAX_KEY = 200


@dataclass(frozen=True)
class Limit:
    """At most `to` jobs with the same key run at once across every worker (Solid Queue's
    `limits_concurrency`). `key(*args, **kwargs)` names the group (None: the whole job; a
    key function returning None: no limit for that call). A slot is taken back after
    `duration` seconds even if its holder never finished."""

    to: int
    key: Callable[..., Any] | None = None
    duration: float = DEFAULT_DURATION

    def __post_init__(self) -> None:
        if not isinstance(self.to, int) or isinstance(self.to, bool) or self.to < 1:
            raise ValueError(f"Limit(to=...) must be a whole number of at least 1, got {self.to!r}")
        if not _positive(self.duration):
            raise ValueError(f"Limit(duration=...) must be positive seconds, got {self.duration!r}")
        if self.key is not None and not callable(self.key):
            raise ValueError(f"Limit(key=...) must be a callable, got {self.key!r}")


@dataclass(frozen=True)
class Rate:
    """At most `limit` jobs with the same key start in any `per` seconds, across every worker
    (a sliding window). A job over it waits in the scheduled set until it may start."""

    limit: int
    per: float = 1.0
    key: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.limit, int) or isinstance(self.limit, bool) or self.limit < 1:
            raise ValueError(f"Rate(limit) must be a whole number, at least 1, got {self.limit!r}")
        if not _positive(self.per):
            raise ValueError(f"Rate(per=...) must be positive seconds, got {self.per!r}")
        if self.key is not None and not callable(self.key):
            raise ValueError(f"Rate(key=...) must be a callable, got {self.key!r}")


def _positive(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


@dataclass(frozen=True)
class Control:
    """One limit as it applies to one message: `kind` "limit" or "rate", its Redis key (the
    prefix included), its size (`to` or `limit`) and span (`duration` or `per`)."""

    kind: str
    key: str
    size: int
    span: float

    def encoded(self) -> list[Any]:
        return [self.kind, self.key, self.size, self.span]


def key_part(
    job_name: str, chooser: Callable[..., Any] | None, args: Any, kwargs: Any
) -> str | None:
    """`job_name[:key]` for a call, or None when the key function opts the call out."""
    if chooser is None:
        return job_name
    value = chooser(*args, **kwargs)
    if value is None:
        return None
    text = str(value)
    if len(text) > MAX_KEY:
        import hashlib

        text = f"{text[:MAX_KEY]}#{hashlib.sha1(text.encode()).hexdigest()[:12]}"
    return f"{job_name}:{text}"


# Unique jobs --------------------------------------------------------------------------------

#: Claims KEYS[1] for ARGV[1] for ARGV[2] ms, noting in KEYS[2] the claiming transaction
#: ARGV[3] ('' outside one); returns {holder's task id, holder's transaction or false}.
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if ARGV[3] ~= '' then
    redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
  else
    redis.call('DEL', KEYS[2])
  end
  return {ARGV[1], false}
end
return {redis.call('GET', KEYS[1]) or false, redis.call('GET', KEYS[2]) or false}
"""

#: Takes KEYS[1] over from task ARGV[1] of transaction ARGV[2] (if both still hold it) for
#: task ARGV[3] of transaction ARGV[5] ('' none) for ARGV[4] ms. Returns 1 if taken.
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('GET', KEYS[2]) == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
  if ARGV[5] ~= '' then
    redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[4])
  else
    redis.call('DEL', KEYS[2])
  end
  return 1
end
return 0
"""

#: Deletes KEYS[1] if it still names ARGV[1]. Returns 1 if deleted.
_RELEASE_UNIQUE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class Claim:
    """Who holds a unique key after a claim: a task id, and the PostgreSQL transaction that
    claimed it, if it was claimed inside one (until that commits, the job may never exist)."""

    holder: str
    transaction: str | None


def claim_unique(
    client: redis.Redis, key: str, txn_key: str, task_id: str, ttl: float, transaction: str = ""
) -> Claim:
    """Claim `key` for `task_id` for `ttl` seconds (inside `transaction`, if given)."""
    for _ in range(3):  # the holder's key may lapse between SET and GET: claim again
        holder, holder_transaction = client.eval(
            _CLAIM, 2, key, txn_key, task_id, max(1, int(ttl * 1000)), transaction
        )
        if holder:
            return Claim(_text(holder), _text(holder_transaction) if holder_transaction else None)
    return Claim(task_id, transaction or None)


def take_over_unique(
    client: redis.Redis,
    key: str,
    txn_key: str,
    stale: Claim,
    task_id: str,
    ttl: float,
    transaction: str = "",
) -> bool:
    """Claim `key` from `stale` (a holder whose transaction never committed) if it still
    holds it."""
    return bool(
        client.eval(
            _TAKE_OVER,
            2,
            key,
            txn_key,
            stale.holder,
            stale.transaction or "",
            task_id,
            max(1, int(ttl * 1000)),
            transaction,
        )
    )


def release_unique(client: redis.Redis, key: str, task_id: str) -> bool:
    """Release `key` if `task_id` still holds it."""
    return bool(client.eval(_RELEASE_UNIQUE, 1, key, task_id))


# Concurrency and rate limits ----------------------------------------------------------------

#: Shared by ADMIT, RELEASE and REAP. KEYS[1..2]: schedule, schedule messages; the workers
#: zset and the limits hash are passed as `workers` and `registry`.
_LIMITS = """
local function clock()
  local t = redis.call('TIME')
  return t[1] + t[2] / 1000000
end

-- Hands free slots of `slots` to the head of its waiting list, moving each one's scheduled
-- message to the head of its queue; a waiter whose message left the set (deleted, run now)
-- is skipped.
local function handover(slots, to, span, now)
  local waiting = slots .. ':waiting'
  while redis.call('ZCARD', slots) < to do
    local raw = redis.call('LPOP', waiting)
    if not raw then
      break
    end
    local waiter = cjson.decode(raw)
    local entry = redis.call('HGET', KEYS[2], waiter[1])
    if entry then
      local cut = string.find(entry, '\\n', 1, true)
      local header = cjson.decode(string.sub(entry, 1, cut - 1))
      -- At the head of its queue (workers take from the right): its slot is reserved, so it
      -- must not wait behind the backlog of other jobs.
      redis.call('RPUSH', header.key, string.sub(entry, cut + 1))
      redis.call('HDEL', KEYS[2], waiter[1])
      redis.call('ZREM', KEYS[1], waiter[1])
      redis.call('ZADD', slots, now + span, '|' .. waiter[2])
    end
  end
end

-- Takes back slots whose time ran out or whose worker's heartbeat lapsed, then hands over.
local function reap(slots, to, span, now, workers, timeout)
  local freed = redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
  for _, member in ipairs(redis.call('ZRANGE', slots, 0, -1)) do
    local cut = string.find(member, '|', 1, true)
    if cut and cut > 1 then
      local beat = redis.call('ZSCORE', workers, string.sub(member, 1, cut - 1))
      if (not beat) or tonumber(beat) < now - timeout then
        freed = freed + redis.call('ZREM', slots, member)
      end
    end
  end
  handover(slots, to, span, now)
  return freed
end

local function forget_if_idle(slots, registry)
  if redis.call('EXISTS', slots) == 0 and redis.call('EXISTS', slots .. ':waiting') == 0 then
    redis.call('HDEL', registry, slots)
  end
end
"""

#: Admits a recorded delivery under its limits, or moves it into the scheduled set.
#: KEYS: schedule, schedule messages, unacked, unacked index, inflight, workers, limits hash.
#: ARGV: task id (member base), JSON entry header, tag, held-set prefix, worker,
#: heartbeat timeout, controls (JSON list of [kind, key, size, span]).
#: Returns {1, now} when admitted (its slots taken), {0, due, member, "limit"|"rate"} when
#: deferred, or {2} when the delivery's records were gone (recovered meanwhile).
ADMIT = (
    scripts.ADD_SCHEDULED
    + _LIMITS
    + """
local now = clock()
local task = ARGV[1]
local entry_header = ARGV[2]
local tag = ARGV[3]
local controls = cjson.decode(ARGV[7])
local timeout = tonumber(ARGV[6])
local due = 0
local why = ''
local blocked = {}
for _, c in ipairs(controls) do
  local kind, key, size, span = c[1], c[2], tonumber(c[3]), tonumber(c[4])
  if kind == 'limit' then
    redis.call('HSET', KEYS[7], key, cjson.encode({size, span}))
    if not redis.call('ZSCORE', key, '|' .. task) then
      reap(key, size, span, now, KEYS[6], timeout)
      if redis.call('ZCARD', key) >= size then
        table.insert(blocked, key)
        if now + span > due then
          due = now + span
        end
        why = 'limit'
      end
    end
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - span)
    if redis.call('ZCARD', key) >= size then
      local oldest = tonumber(redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2])
      local deferred = key .. ':deferred'
      redis.call('ZREMRANGEBYSCORE', deferred, '-inf', now)
      redis.call('ZREM', deferred, task)
      local ahead = redis.call('ZCARD', deferred)
      local at = oldest + span + span * math.floor(ahead / size)
      redis.call('ZADD', deferred, at, task)
      redis.call('EXPIRE', deferred, math.ceil(at - now + span) + 1)
      if at > due then
        due = at
      end
      if why == '' then
        why = 'rate'
      end
    end
  end
end
if due == 0 then
  for _, c in ipairs(controls) do
    local kind, key, span = c[1], c[2], tonumber(c[4])
    if kind == 'limit' then
      redis.call('ZREM', key, '|' .. task)
      redis.call('ZADD', key, now + span, ARGV[5] .. '|' .. task)
    else
      redis.call('ZADD', key, now, task .. '@' .. string.format('%.6f', now))
      redis.call('EXPIRE', key, math.ceil(span) + 1)
      redis.call('ZREM', key .. ':deferred', task)
    end
  end
  return {1, string.format('%.6f', now)}
end
local info = redis.call('HGET', KEYS[5], tag)
local record = redis.call('HGET', KEYS[3], tag)
if not (info and record) then
  return {2}
end
local held = cjson.decode(info)
ARGV[2] = string.format('%.6f', due)
ARGV[3] = entry_header
local member = add(string.sub(record, 2, #record - held[4]))
redis.call('DEL', held[3])
redis.call('HDEL', KEYS[5], tag)
redis.call('HDEL', KEYS[3], tag)
redis.call('ZREM', KEYS[4], tag)
redis.call('SREM', ARGV[4] .. held[1], tag)
if member == '' then
  member = task
end
local waiter = cjson.encode({member, task})
for _, key in ipairs(blocked) do
  local waiting = key .. ':waiting'
  if not redis.call('LPOS', waiting, waiter) then
    redis.call('RPUSH', waiting, waiter)
  end
end
return {0, string.format('%.6f', due), member, why}
"""
)

#: Frees the slots a settled delivery held and hands them to waiters.
#: KEYS: schedule, schedule messages, limits hash. ARGV: slot member (`worker|task`), then the
#: holders keys. Returns how many waiters were moved to their queues.
RELEASE = (
    _LIMITS
    + """
local now = clock()
local moved = 0
for i = 2, #ARGV do
  local key = ARGV[i]
  redis.call('ZREM', key, ARGV[1])
  local config = redis.call('HGET', KEYS[3], key)
  if config then
    local c = cjson.decode(config)
    local before = redis.call('LLEN', key .. ':waiting')
    handover(key, tonumber(c[1]), tonumber(c[2]), now)
    moved = moved + before - redis.call('LLEN', key .. ':waiting')
  end
  forget_if_idle(key, KEYS[3])
end
return moved
"""
)

#: Takes back every limit's slots held by dead workers or past their duration, and hands them
#: over (the heartbeat recovery). KEYS: schedule, schedule messages, workers, limits hash.
#: ARGV: heartbeat timeout. Returns how many slots were taken back.
REAP = (
    _LIMITS
    + """
local now = clock()
local freed = 0
local all = redis.call('HGETALL', KEYS[4])
for i = 1, #all, 2 do
  local key = all[i]
  local c = cjson.decode(all[i + 1])
  freed = freed + reap(key, tonumber(c[1]), tonumber(c[2]), now, KEYS[3], tonumber(ARGV[1]))
  forget_if_idle(key, KEYS[4])
end
return freed
"""
)


# The worker's side ----------------------------------------------------------------------------

#: Set by the job layer: the controls a delivered message is subject to, and its task id, or
#: None. Called in the worker's main process with the decoded envelope.
Admission = Callable[[Mapping[str, Any], Keys], tuple[str, list[Control]] | None]
admission: Admission | None = None


@dataclass(frozen=True)
class Held:
    """The slots one admitted delivery holds until it is settled."""

    member: str
    keys: tuple[str, ...]


def admit(channel: Channel, tag: str, queue: str, key: str, payload: dict[str, Any]) -> bool:
    """Decide a recorded delivery under its limits: True to deliver it now (its slots taken),
    False when it was moved into the scheduled set (or taken back meanwhile)."""
    if admission is None:
        return True
    try:
        found = admission(payload, channel.keys)
    except Exception:  # a key function that fails on these arguments: the job will say why
        logger.warning("could not work out the flow controls of a message", exc_info=True)
        return True
    if not found:
        return True
    task_id, controls = found
    try:
        reply = _run_admit(channel, tag, queue, key, payload, task_id, controls)
    except redis.ResponseError as exc:
        # Redis refused the step (a full `noeviction` server) after it handed the message
        # out: delivering it without its limits beats stranding it in this worker's records.
        logger.error(
            "Redis refused the flow-control step for %s (%s); it runs without its limits",
            task_id,
            exc,
        )
        return True
    outcome = int(reply[0])
    if outcome == 1:
        payload.setdefault("headers", {})[ADMITTED_HEADER] = float(reply[1])
        limits = tuple(c.key for c in controls if c.kind == "limit")
        if limits:
            channel._flow_held[tag] = Held(f"{channel.worker}|{task_id}", limits)
        return True
    if outcome == 0:
        due, why = float(reply[1]), _text(reply[3])
        name = (payload.get("headers") or {}).get("task")
        logger.info(
            "job %s[%s] deferred by its %s: it waits in the scheduled set (due in %.1f s%s)",
            name,
            task_id,
            "concurrency limit" if why == "limit" else "rate limit",
            max(0.0, due - channel._redis_now()),
            ", or as soon as a slot frees" if why == "limit" else "",
            extra={"event": "flow_deferred", "task_id": task_id, "job": name, "control": why},
        )
        _count(f"jobs.flow.deferred.{why}")
    return False


def _run_admit(
    channel: Channel,
    tag: str,
    queue: str,
    key: str,
    payload: dict[str, Any],
    task_id: str,
    controls: list[Control],
) -> Any:
    keys = channel.keys
    return channel._script(ADMIT)(
        keys=[
            keys.schedule,
            keys.schedule_messages,
            channel._prefixed(channel.unacked_key),
            channel._prefixed(channel.unacked_index_key),
            keys.inflight,
            keys.workers,
            keys.limits,
        ],
        args=[
            task_id,
            scheduled.entry_header(queue, key, payload),
            tag,
            keys.held(""),
            channel.worker,
            channel.heartbeat_timeout,
            json.dumps([c.encoded() for c in controls]),
        ],
    )


def release(channel: Channel, tag: str) -> None:
    """Free the slots the settled delivery `tag` held, handing them to waiting jobs."""
    held = channel._flow_held.pop(tag, None)
    if held is None:
        return
    keys = channel.keys
    try:
        channel._script(RELEASE)(
            keys=[keys.schedule, keys.schedule_messages, keys.limits],
            args=[held.member, *held.keys],
        )
    except redis.RedisError:  # the slot lapses with its duration, or its worker's heartbeat
        logger.warning("could not free the concurrency slots of %s", held.member, exc_info=True)


def reap(client: redis.Redis, keys: Keys, timeout: float) -> int:
    """Take back slots held by dead workers or past their duration; how many were freed."""
    return int(
        client.eval(
            REAP, 4, keys.schedule, keys.schedule_messages, keys.workers, keys.limits, timeout
        )
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _count(name: str) -> None:
    try:
        from app.jobs.instrumentation import metrics

        metrics().incr(name)
    except Exception:  # metrics never stop delivery
        logger.debug("could not count %s", name, exc_info=True)


# What operators see ---------------------------------------------------------------------------


@dataclass(frozen=True)
class UniqueKey:
    key: str
    task_id: str
    ttl: float


@dataclass(frozen=True)
class LimitState:
    key: str
    to: int
    duration: float
    holders: list[tuple[str, str, float]]  # (worker or "" for handed over, task id, expiry)
    waiting: int


@dataclass(frozen=True)
class RateState:
    key: str
    recent: int
    deferred: int


@dataclass(frozen=True)
class Holdings:
    unique: list[UniqueKey]
    limits: list[LimitState]
    rates: list[RateState]


def holdings(client: redis.Redis, prefix: str = "", count: int = 1000) -> Holdings:
    """The unique keys held, the concurrency slots and their waiters, the rate windows."""
    keys = Keys(prefix)
    unique_prefix = keys.unique
    unique = []
    for raw in client.scan_iter(match=unique_prefix + "*", count=count):
        name = _text(raw)
        pipe = client.pipeline()
        pipe.get(name)
        pipe.pttl(name)
        value, ttl = pipe.execute()
        if value is not None:
            unique.append(UniqueKey(name[len(unique_prefix) :], _text(value), max(0, ttl) / 1000))
    limits = []
    limit_prefix = keys.limit
    for raw_key, raw_config in sorted(client.hgetall(keys.limits).items()):
        name = _text(raw_key)
        to, duration = json.loads(raw_config)
        holders = []
        ranked: list[tuple[bytes, float]] = client.zrange(name, 0, -1, withscores=True)  # type: ignore[assignment]
        for member, expiry in ranked:
            worker, _, task = _text(member).partition("|")
            holders.append((worker, task, float(expiry)))
        limits.append(
            LimitState(
                name[len(limit_prefix) :],
                int(to),
                float(duration),
                holders,
                int(client.llen(name + ":waiting")),
            )
        )
    rates = []
    rate_prefix = keys.rate
    now = scheduled.now_in_redis(client)
    for raw in client.scan_iter(match=rate_prefix + "*", count=count):
        name = _text(raw)
        if name.endswith(":deferred"):
            continue
        rates.append(
            RateState(
                name[len(rate_prefix) :],
                int(client.zcard(name)),
                int(client.zcount(name + ":deferred", now, "+inf")),
            )
        )
    return Holdings(sorted(unique, key=lambda u: u.key), limits, sorted(rates, key=lambda r: r.key))


def controls_for(
    job_name: str,
    limit: Limit | None,
    rate: Rate | None,
    keys: Keys,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
) -> list[Control]:
    """The controls one call of a job is subject to."""
    controls = []
    if limit is not None:
        part = key_part(job_name, limit.key, args, kwargs)
        if part is not None:
            controls.append(Control("limit", keys.limit + part, limit.to, limit.duration))
    if rate is not None:
        part = key_part(job_name, rate.key, args, kwargs)
        if part is not None:
            controls.append(Control("rate", keys.rate + part, rate.limit, rate.per))
    return controls

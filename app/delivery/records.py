"""The delivery path's records in Redis: their key names, and what operators read and change.

See `app.delivery.scripts` for what each record holds. Every name takes the channel's
`global_keyprefix` (none by default).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

NAMESPACE = "jobs_service:"
WORKERS = NAMESPACE + "workers"
WORKER_INFO = NAMESPACE + "worker:"  # + worker id
HELD = NAMESPACE + "held:"  # + worker id
INFLIGHT = NAMESPACE + "inflight"
DELIVERIES = NAMESPACE + "deliveries:"  # + sha1 of the message
PAUSED = NAMESPACE + "paused"
REJECTED = NAMESPACE + "rejected"
REJECTED_LOCK = NAMESPACE + "rejected:lock"
SCHEDULE = NAMESPACE + "schedule"
SCHEDULE_MESSAGES = NAMESPACE + "schedule:messages"
#: Flow control (app.delivery.flow): a unique job's key -> its task id (with the TTL).
UNIQUE = NAMESPACE + "unique:"  # + job name and key
#: The PostgreSQL transaction (txid) that claimed a unique key, when one did (same suffix and
#: TTL as the key): a claim whose transaction never committed is taken over, not obeyed.
UNIQUE_TXN = NAMESPACE + "unique_txn:"  # + job name and key
#: A concurrency limit's holders (zset `worker|task id` -> expiry) and `<that>:waiting` (list).
LIMIT = NAMESPACE + "limit:"  # + job name and key
#: Every concurrency limit in use (hash: holders key -> JSON [to, duration]), for recovery.
LIMITS = NAMESPACE + "limits"
#: A rate limit's recent admissions (zset) and `<that>:deferred` (zset task id -> when).
RATE = NAMESPACE + "rate:"  # + job name and key
#: A list nothing writes to: a channel whose queues are all paused waits on it.
IDLE = NAMESPACE + "idle"


@dataclass(frozen=True)
class Keys:
    """The record names under one key prefix."""

    prefix: str = ""

    def __getattr__(self, name: str) -> str:
        return self.prefix + str(globals()[name.upper()])

    def held(self, worker: str) -> str:
        """The set of tags `worker` holds."""
        return f"{self.prefix}{HELD}{worker}"


@dataclass(frozen=True)
class WorkerState:
    """A worker process as its heartbeat shows it."""

    worker: str
    last_beat: float  # seconds ago
    held: int
    queues: tuple[str, ...]
    info: dict[str, Any]


def pause(client: redis.Redis, queue: str, prefix: str = "") -> bool:
    """Stop every worker taking from `queue`; True if it was not paused yet."""
    return bool(client.sadd(Keys(prefix).paused, queue))


def resume(client: redis.Redis, queue: str, prefix: str = "") -> bool:
    """Let workers take from `queue` again; True if it was paused."""
    return bool(client.srem(Keys(prefix).paused, queue))


def paused(client: redis.Redis, prefix: str = "") -> set[str]:
    """The paused queues."""
    members: Any = client.smembers(Keys(prefix).paused)
    return {bytes(m).decode() for m in members}


def workers(client: redis.Redis, prefix: str = "") -> list[WorkerState]:
    """Every worker registered by its heartbeat, newest beat first (live and lapsed)."""
    keys = Keys(prefix)
    clock: Any = client.time()
    seconds, micros = clock
    now = float(seconds) + float(micros) / 1e6
    found = []
    beats: Any = client.zrange(keys.workers, 0, -1, desc=True, withscores=True)
    for member, score in beats:
        worker = bytes(member).decode()
        raw = client.get(keys.worker_info + worker)
        info = json.loads(raw) if raw else {}
        found.append(
            WorkerState(
                worker=worker,
                last_beat=max(0.0, now - float(score)),
                held=int(client.scard(keys.held(worker))),
                queues=tuple(info.get("queues", ())),
                info=info,
            )
        )
    return found


def consumed_queues(client: redis.Redis, lapse: float, prefix: str = "") -> set[str]:
    """The queues some live worker (one whose heartbeat is under `lapse` seconds old) takes."""
    return {q for w in workers(client, prefix) if w.last_beat < lapse for q in w.queues}


def rejected_waiting(client: redis.Redis, prefix: str = "") -> int:
    """Messages taken out of circulation and not yet written to the dead-letter store."""
    return int(client.llen(Keys(prefix).rejected))

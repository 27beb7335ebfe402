"""The peers benchmark's Dramatiq baseline: the same no-op (INCR a Redis counter) as an actor.

Nothing of the service is loaded here. `BROKER_URL` is the benchmark's Redis database (set by
`bench.run`); Dramatiq keeps its own keys (`dramatiq:*`) there.

    dramatiq bench.dramatiq_app --processes 2 --threads 8
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from bench.keys import INCR_COUNTER

BROKER_URL = os.environ["BROKER_URL"]

broker = RedisBroker(url=BROKER_URL)
dramatiq.set_broker(broker)

_redis: Any = None
_redis_pid: int | None = None


def _client() -> Any:
    global _redis, _redis_pid
    if _redis is None or _redis_pid != os.getpid():
        _redis = redis.Redis.from_url(BROKER_URL)
        _redis_pid = os.getpid()
    return _redis


@dramatiq.actor(queue_name="default", max_retries=0)
def incr(n: int) -> None:
    """Count one execution: the drain benchmark's no-op (as `bench.stock_app.incr`)."""
    _client().incr(INCR_COUNTER)

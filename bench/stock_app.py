"""The benchmarks' stock baseline: a plain Celery app on kombu's own Redis transport.

Nothing of the service is loaded here (no `app`, no `celeryconfig`): this is what the service's
delivery path is compared with. It has the service's delivery settings (`task_acks_late`,
`worker_prefetch_multiplier` 1, `task_reject_on_worker_lost`) and the service's default
visibility timeout (21,600 s), or `BENCH_VISIBILITY_TIMEOUT`. kombu's restore sweep runs every
10 s with throttle 1, as the service configures it (kombu's own default scans every 100 s).

    celery -A bench.stock_app worker --queues default --concurrency 2

`BROKER_URL` is the benchmark's Redis database (set by `bench.run`), or a RabbitMQ virtual host
(the `rabbitmq` benchmark), with `BENCH_REDIS_URL` then naming the Redis the tasks count in.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any
from urllib.parse import urlsplit

import redis
from celery import Celery
from kombu import Queue

from bench.keys import DUE_STARTS, HOLD_SECONDS, HOLD_STARTS, INCR_COUNTER

BROKER_URL = os.environ["BROKER_URL"]
#: Where the tasks count and record (the benchmark's Redis), when the broker is not Redis.
COUNTER_URL = os.environ.get("BENCH_REDIS_URL") or BROKER_URL
VISIBILITY_TIMEOUT = float(os.environ.get("BENCH_VISIBILITY_TIMEOUT", "21600"))


def quorum_queues() -> list[Queue]:
    """The worker's three queues as RabbitMQ quorum queues (stock Celery then uses a
    per-consumer prefetch, as it does for the service's)."""
    return [
        Queue(name, routing_key=name, queue_arguments={"x-queue-type": "quorum"})
        for name in ("urgent", "default", "low")
    ]


stock = Celery("stock", broker=BROKER_URL)
stock.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_reject_on_worker_lost=True,
    task_default_queue="default",
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "unacked_restore_interval": 10,
        "unacked_restore_throttle": 1,
    },
)
if os.environ.get("BENCH_QUORUM"):  # RabbitMQ quorum queues, as the service declares them
    stock.conf.task_queues = quorum_queues()
app = stock  # `celery -A bench.stock_app`

_redis: Any = None
_redis_pid: int | None = None


def _client() -> Any:
    # One client per process: a prefork child must not reuse a socket its parent opened.
    global _redis, _redis_pid
    if _redis is None or _redis_pid != os.getpid():
        parts = urlsplit(COUNTER_URL)
        if parts.scheme == "redis+socket":  # kombu's unix-socket URL (the embedded Redis)
            db = int(parts.query.removeprefix("virtual_host=") or 0)
            _redis = redis.Redis(unix_socket_path=parts.path, db=db)
        else:
            _redis = redis.Redis.from_url(COUNTER_URL)
        _redis_pid = os.getpid()
    return _redis


@stock.task(name="bench.incr", ignore_result=True)
def incr(n: int) -> None:
    """Count one execution: the drain benchmark's no-op."""
    _client().incr(INCR_COUNTER)


@stock.task(name="bench.hold", bind=True, ignore_result=True)
def hold(self: Any, n: int) -> None:
    """Record (task id, n, worker, start time), then take HOLD_SECONDS: the recovery job."""
    _client().rpush(
        HOLD_STARTS, json.dumps([self.request.id, n, self.request.hostname, time.time()])
    )
    time.sleep(HOLD_SECONDS)


@stock.task(name="bench.due", ignore_result=True)
def due(n: int, due_at: float) -> None:
    """Record (n, due time, start time): an ETA task's start lateness (as `jobs.bench_due`)."""
    _client().rpush(DUE_STARTS, json.dumps([n, due_at, time.time()]))

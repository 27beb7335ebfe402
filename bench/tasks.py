"""Benchmark-only jobs: the no-ops the overhead benchmark drains, the low-queue backlog and
urgent jobs of the urgent-latency benchmark, the scheduled-lateness job, the job batches'
on_complete callback, the recovery and drain benchmarks' jobs (the same bodies as
`bench.stock_app`'s, there on stock Celery), and the flow-control benchmark's jobs (one body,
one job per control). The worker loads them with `--include bench.tasks`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import redis

from app import celery
from app.delivery.flow import Limit, Rate
from app.jobs.base import job
from bench.keys import (
    DUE_STARTS,
    FLOW_COUNTER,
    FLOW_SERIAL_SECONDS,
    FLOW_SPANS,
    HOLD_SECONDS,
    HOLD_STARTS,
    INCR_COUNTER,
)

#: The Redis list (in the benchmark's broker database) each urgent job appends its timing to.
URGENT_STARTS = "bench:urgent_starts"
#: The Redis list the job-batch benchmark's on_complete callback appends (tag, time) to.
BATCH_CALLBACKS = "bench:batch_callbacks"

_redis: Any = None
_redis_pid: int | None = None


@job("jobs.bench_noop", ignore_result=True)
def bench_noop(n: int) -> None:
    """Nothing, through the whole job layer (checks, instrumentation, policies)."""


@celery.task(name="bench.bare_noop", ignore_result=True)
def bare_noop(n: int) -> None:
    """Nothing, as a bare Celery task."""


@job("jobs.bench_low", queue_as="low", ignore_result=True)
def bench_low(n: int) -> int:
    """A little work from the low queue (a few hundred SHA-256 rounds, well under 1 ms)."""
    digest = str(n).encode()
    for _ in range(200):
        digest = hashlib.sha256(digest).digest()
    return digest[0]


@job("jobs.bench_urgent", queue_as="urgent", ignore_result=True)
def bench_urgent(n: int, enqueued_at: float) -> None:
    """Record (n, enqueue time, start time) in Redis: its enqueue-to-start latency."""
    started_at = time.time()
    _client().rpush(URGENT_STARTS, json.dumps([n, enqueued_at, started_at]))


@job("jobs.bench_due", ignore_result=True)
def bench_due(n: int, due_at: float) -> None:
    """Record (n, due time, start time) in Redis: a scheduled job's start lateness."""
    _client().rpush(DUE_STARTS, json.dumps([n, due_at, time.time()]))


@job("jobs.bench_batch_done", ignore_result=True)
def bench_batch_done(tag: str) -> None:
    """A job batch's on_complete callback: record (tag, time) in Redis, that it ran."""
    _client().rpush(BATCH_CALLBACKS, json.dumps([tag, time.time()]))


@celery.task(name="bench.incr", ignore_result=True)
def incr(n: int) -> None:
    """Count one execution: the drain benchmark's no-op (as `bench.stock_app.incr`)."""
    _client().incr(INCR_COUNTER)


@job("jobs.bench_incr", ignore_result=True)
def bench_incr(n: int) -> None:
    """The same count through the whole job layer: the peers benchmark's no-op."""
    _client().incr(INCR_COUNTER)


@celery.task(name="bench.hold", bind=True, ignore_result=True)
def hold(self: Any, n: int) -> None:
    """Record (task id, n, worker, start time), then take HOLD_SECONDS: the recovery job."""
    _client().rpush(
        HOLD_STARTS, json.dumps([self.request.id, n, self.request.hostname, time.time()])
    )
    time.sleep(HOLD_SECONDS)


# Flow control: the same body (INCR a counter) under each control, and none. The limits are
# set so that they never bite: what is measured is what deciding them costs.


@job("jobs.bench_flow_none", ignore_result=True)
def bench_flow_none(n: int) -> None:
    """Count one execution, with no flow control: the baseline."""
    _client().incr(FLOW_COUNTER)


@job("jobs.bench_flow_limited", limits_concurrency=Limit(to=1000), ignore_result=True)
def bench_flow_limited(n: int) -> None:
    """Count one execution under a concurrency limit it never reaches (admission only)."""
    _client().incr(FLOW_COUNTER)


@job("jobs.bench_flow_rated", rate_limit=Rate(1_000_000, per=1), ignore_result=True)
def bench_flow_rated(n: int) -> None:
    """Count one execution under a rate limit it never reaches (admission only)."""
    _client().incr(FLOW_COUNTER)


@job("jobs.bench_flow_unique", unique_for=60, unique_key=lambda n: n, ignore_result=True)
def bench_flow_unique(n: int) -> None:
    """Count one execution as a unique job whose key is its own (never refused)."""
    _client().incr(FLOW_COUNTER)


@job("jobs.bench_flow_expiring", expires_in=3600, ignore_result=True)
def bench_flow_expiring(n: int) -> None:
    """Count one execution of a job that expires an hour after it was enqueued (never)."""
    _client().incr(FLOW_COUNTER)


@job(
    "jobs.bench_flow_serial",
    limits_concurrency=Limit(to=1, duration=120),
    ignore_result=True,
)
def bench_flow_serial(n: int) -> None:
    """One at a time across every worker: record (task id, n, worker, pid, start, end) after
    FLOW_SERIAL_SECONDS of work."""
    started = time.time()
    time.sleep(FLOW_SERIAL_SECONDS)
    ended = time.time()
    request = bench_flow_serial.request
    _client().rpush(
        FLOW_SPANS, json.dumps([request.id, n, request.hostname, os.getpid(), started, ended])
    )


def _client() -> Any:
    # One client per process: a prefork child must not reuse a socket its parent opened.
    global _redis, _redis_pid
    if _redis is None or _redis_pid != os.getpid():
        from app.delivery.clients import broker_client

        # BENCH_REDIS_URL: the benchmark's Redis when the broker is not Redis (RabbitMQ).
        url = os.environ.get("BENCH_REDIS_URL")
        _redis = redis.Redis.from_url(url) if url else broker_client(os.environ["BROKER_URL"])
        _redis_pid = os.getpid()
    return _redis

"""The dashboard's per-minute counts (app/delivery/throughput.py), from a real worker.

Each pool process keeps its counts and writes them about once a second: they reach Redis
while the worker keeps running (no stop needed to see them), and a warm stop writes the rest.
"""

from __future__ import annotations

import time
from pathlib import Path

import redis

from app.delivery.throughput import last_hour
from app.settings import redis_client_url
from tests.integration.conftest import (
    ALL_QUEUES,
    HARNESS_WORKER,
    Services,
    celery_process,
    flush_broker,
    isolated_broker,
    producer_for,
    worker_env,
)
from tests.integration.factories import wait_until


def totals(client: redis.Redis) -> tuple[int, int]:
    rows = last_hour(client)
    return sum(r[1] for r in rows), sum(r[2] for r in rows)


def test_runs_are_counted_while_the_worker_runs_and_failures_apart(
    services: Services, tmp_path: Path
) -> None:
    broker = isolated_broker(services.broker_url, 12)
    flush_broker(broker)
    client = redis.Redis.from_url(redis_client_url(broker) or "")
    with celery_process(
        [*HARNESS_WORKER, *ALL_QUEUES, "--concurrency", "2"],
        worker_env(services, broker),
        tmp_path / "worker.log",
    ):
        producer = producer_for(broker)
        for i in range(20):
            producer.send_task("jobs.test_record_sku", args=[f"counted-{i}"], queue="default")
        # Fails, is retried twice 2 s apart, then is dead-lettered: three failed runs.
        producer.send_task("jobs.test_always_fails", args=["counted-fail"], queue="default")
        wait_until(lambda: totals(client) == (23, 3), timeout=60)
        time.sleep(2.5)  # nothing is counted twice by later flushes
        assert totals(client) == (23, 3)
        producer.send_task("jobs.test_record_sku", args=["counted-last"], queue="default")
        wait_until(lambda: totals(client) == (24, 3), timeout=30)
    assert totals(client) == (24, 3)
    for key in client.scan_iter("jobs_service:minute:*"):
        assert 0 < int(client.ttl(key)) <= 7200

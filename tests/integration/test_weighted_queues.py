"""Weighted queues as Sidekiq serves them, measured on a real worker with a real Redis."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import select

from app.models import InventoryAudit
from tests.integration.conftest import (
    Services,
    celery_process,
    flush_broker,
    isolated_broker,
)
from tests.integration.factories import make_product, wait_until

# Needs a Redis broker (the transport's records, scripts or Redis itself): a pass on
# RabbitMQ would leave it out (`-m "not redis_only"`).
pytestmark = pytest.mark.redis_only

PER_QUEUE = 400
SERVED = 300
WEIGHTS = {"urgent": 6, "default": 3, "low": 1}
#: Chi-square with 2 degrees of freedom above which 6:3:1 is rejected at p = 0.001.
CHI2_CRITICAL = 13.82


def served_order(services: Services, tmp_path: Path, order: str) -> list[str]:
    """Fill three queues, let one worker (concurrency 1, prefetch 1) serve SERVED jobs."""
    broker = isolated_broker(services.broker_url, 11)
    flush_broker(broker)
    product = make_product(inventory=0)
    producer = Celery("producer", broker=broker)
    producer.conf.update(task_serializer="json", broker_connection_retry_on_startup=True)
    with producer.connection_for_write() as connection:
        for i in range(PER_QUEUE):
            for queue in WEIGHTS:
                producer.send_task(
                    "jobs.update_inventory",
                    args=[product, 1, f"{queue}:{i}"],
                    queue=queue,
                    connection=connection,
                )
    env = {
        **os.environ,
        "BROKER_URL": broker,
        "DATABASE_URL": services.database_url,
        "QUEUE_ORDER": order,
    }
    args = [
        "worker",
        "--queues",
        "urgent,default,low",
        "--concurrency",
        "1",
        "--prefetch-multiplier",
        "1",
        "--without-mingle",
        "--without-gossip",
        "--hostname",
        f"weighted-{order}@%h",
        "--loglevel",
        "WARNING",
    ]
    with celery_process(args, env, tmp_path / "worker.log"):
        wait_until(lambda: len(audit_keys()) >= SERVED, timeout=120, every=0.2)
    return [key.split(":")[0] for key in audit_keys()[:SERVED]]


def audit_keys() -> list[str]:
    from app.db import session_scope

    with session_scope() as session:
        return list(
            session.scalars(select(InventoryAudit.idempotency_key).order_by(InventoryAudit.id))
        )


def chi_square(counts: Counter[str]) -> float:
    total = sum(counts.values())
    return sum((counts[q] - total * w / 10) ** 2 / (total * w / 10) for q, w in WEIGHTS.items())


def test_the_first_jobs_split_six_three_one_and_low_is_not_starved(
    services: Services, tmp_path: Path
) -> None:
    served = served_order(services, tmp_path, "weighted")

    counts = Counter(served)
    print(f"first {SERVED} jobs by queue: {dict(counts)}, chi-square {chi_square(counts):.2f}")
    assert chi_square(counts) < CHI2_CRITICAL, counts
    # every queue still held work (each had PER_QUEUE > SERVED jobs), yet low was served
    assert counts["low"] >= 10, counts


def test_strict_order_serves_urgent_first_and_would_fail_the_weighted_bound(
    services: Services, tmp_path: Path
) -> None:
    served = served_order(services, tmp_path, "strict")

    counts = Counter(served)
    assert counts == Counter({"urgent": SERVED})
    assert chi_square(counts) > CHI2_CRITICAL
    assert chi_square(Counter({"urgent": 100, "default": 100, "low": 100})) > CHI2_CRITICAL


@pytest.fixture(autouse=True)
def _no_leftovers(services: Services) -> None:
    flush_broker(isolated_broker(services.broker_url, 11))

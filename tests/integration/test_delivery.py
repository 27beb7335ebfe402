"""Time limits and warm shutdown, on a real prefork worker process."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import redis
from sqlalchemy import func, select

from app.db import session_scope
from app.models import DeadLetter, Product
from app.settings import redis_client_url
from tests.integration.conftest import (
    HARNESS_WORKER,
    Services,
    celery_process,
    flush_broker,
    isolated_broker,
    producer_for,
    worker_env,
)
from tests.integration.factories import scalar, wait_until


def dead_letters() -> list[DeadLetter]:
    with session_scope() as session:
        return list(session.scalars(select(DeadLetter).order_by(DeadLetter.id)))


def products() -> int:
    return int(scalar(select(func.count()).select_from(Product)))


def test_a_soft_time_limit_rolls_the_job_back_and_dead_letters_it(
    services: Services, tmp_path: Path
) -> None:
    broker = isolated_broker(services.broker_url, 9)
    flush_broker(broker)
    producer_for(broker).send_task("jobs.test_sleepy_write", args=["too-slow", 5], queue="default")

    with celery_process(
        [*HARNESS_WORKER, "--concurrency", "1"],
        worker_env(services, broker),
        tmp_path / "worker.log",
    ):
        [entry] = wait_until(dead_letters, timeout=60)

    assert products() == 0  # the insert was rolled back
    assert (entry.job_name, entry.reason, entry.attempts) == (
        "jobs.test_sleepy_write",
        "time_limit",
        1,
    )
    assert entry.error_type.endswith("SoftTimeLimitExceeded")
    assert entry.args == ["too-slow", 5] and entry.queue == "default"


def test_a_hard_time_limit_kills_the_job_and_dead_letters_it(
    services: Services, tmp_path: Path
) -> None:
    broker = isolated_broker(services.broker_url, 9)
    flush_broker(broker)
    producer = producer_for(broker)
    producer.send_task("jobs.test_stubborn", args=[30], queue="default")
    producer.send_task("jobs.test_slow_record", args=["after-the-killed-one", 0], queue="default")

    with celery_process(
        [*HARNESS_WORKER, "--concurrency", "1"],
        worker_env(services, broker),
        tmp_path / "worker.log",
    ):
        wait_until(dead_letters, timeout=60)
        wait_until(products, timeout=60)  # the replaced process goes on with the next job
    [entry] = dead_letters()

    assert (entry.job_name, entry.reason) == ("jobs.test_stubborn", "time_limit")
    assert entry.error_type.endswith("TimeLimitExceeded")


def test_warm_shutdown_finishes_the_running_job_and_leaves_the_rest_queued(
    services: Services, tmp_path: Path
) -> None:
    broker = isolated_broker(services.broker_url, 9)
    flush_broker(broker)
    producer = producer_for(broker)
    producer.send_task("jobs.test_slow_record", args=["running", 3], queue="default")
    for i in range(3):
        producer.send_task("jobs.test_slow_record", args=[f"queued-{i}", 0], queue="low")
    log = tmp_path / "worker.log"
    args = [*HARNESS_WORKER, "--queues", "default", "--concurrency", "1"]

    with celery_process(args, worker_env(services, broker), log) as worker:
        wait_until(lambda: "job started jobs.test_slow_record" in log.read_text(), timeout=60)
        stopped_at = time.monotonic()
        os.kill(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)
        took = time.monotonic() - stopped_at

    assert products() == 1 and took < 30  # it finished the running job, then stopped
    client = redis.Redis.from_url(redis_client_url(broker) or "")
    assert client.llen("low") == 3  # nothing else was taken
    assert not client.hlen("unacked")  # and nothing is left half-delivered

    with celery_process(
        [*HARNESS_WORKER, "--concurrency", "1"],
        worker_env(services, broker),
        tmp_path / "worker-2.log",
    ):
        wait_until(lambda: products() == 4, timeout=60)

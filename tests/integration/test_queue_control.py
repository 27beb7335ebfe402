"""Pausing queues, Celery's default `celery` queue, stranded queues, and no_ack consumers.

Each test runs real worker processes on a Redis database of its own, with default settings.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis
from celery import Celery
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.messaging import Consumer, Producer
from sqlalchemy import func, select

from app.models import Product
from app.settings import redis_client_url
from tests.integration.conftest import (
    ALL_QUEUES,
    HARNESS_WORKER,
    Services,
    celery_process,
    flush_broker,
    isolated_broker,
    producer_for,
    run_cli,
    worker_env,
)
from tests.integration.factories import scalar, wait_until

# Needs a Redis broker (the transport's records, scripts or Redis itself): a pass on
# RabbitMQ would leave it out (`-m "not redis_only"`).
pytestmark = pytest.mark.redis_only

DB = 14


def product_count(sku: str) -> int:
    return int(scalar(select(func.count()).select_from(Product).where(Product.sku == sku)))


def worker_args() -> list[str]:
    return [*HARNESS_WORKER, *ALL_QUEUES, "--concurrency", "1"]


def test_a_paused_queue_waits_on_every_worker_and_across_restarts(
    services: Services, tmp_path: Path
) -> None:
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    producer = producer_for(broker)
    paused = run_cli(services, "queues", "pause", "low", broker=broker)
    assert paused.returncode == 0, paused.stderr
    assert "low: paused" in paused.stdout
    log = tmp_path / "worker.log"
    with celery_process(worker_args(), worker_env(services, broker), log):
        wait_until(lambda: " ready." in log.read_text())
        producer.send_task("jobs.test_record_sku", args=["on-low"], queue="low")
        producer.send_task("jobs.test_record_sku", args=["on-default"], queue="default")
        wait_until(lambda: product_count("on-default") == 1, timeout=30)
        time.sleep(2)
        assert product_count("on-low") == 0
    shown = run_cli(services, "queues", "--json", broker=broker)
    rows = {row["queue"]: row for row in json.loads(shown.stdout)}
    assert rows["low"]["paused"] is True and rows["low"]["depth"] == 1
    assert rows["default"]["paused"] is False
    # A restarted worker still leaves it alone; resuming lets it run within a second or so.
    with celery_process(worker_args(), worker_env(services, broker), log):
        wait_until(lambda: log.read_text().count(" ready.") == 2)
        time.sleep(2)
        assert product_count("on-low") == 0
        resumed = run_cli(services, "queues", "resume", "low", broker=broker)
        assert "low: resumed" in resumed.stdout
        wait_until(lambda: product_count("on-low") == 1, timeout=10)


def test_pausing_lets_the_running_job_finish(services: Services, tmp_path: Path) -> None:
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    producer = producer_for(broker)
    log = tmp_path / "worker.log"
    with celery_process(worker_args(), worker_env(services, broker), log):
        wait_until(lambda: " ready." in log.read_text())
        producer.send_task("jobs.test_slow_record", args=["running", 3], queue="default")
        wait_until(lambda: "job started jobs.test_slow_record" in log.read_text())
        run_cli(services, "queues", "pause", "default", broker=broker)
        producer.send_task("jobs.test_record_sku", args=["queued-while-paused"], queue="default")
        wait_until(lambda: product_count("running") == 1, timeout=30)
        time.sleep(1.5)
        assert product_count("queued-while-paused") == 0
        run_cli(services, "queues", "resume", "default", broker=broker)
        wait_until(lambda: product_count("queued-while-paused") == 1, timeout=10)


def test_pausing_an_unknown_queue_is_a_clear_error(services: Services) -> None:
    result = run_cli(services, "queues", "pause", "nosuch")
    assert result.returncode == 2
    assert "unknown queue 'nosuch'" in result.stderr
    assert "Traceback" not in result.stderr


def test_jobs_sent_to_celerys_default_queue_run_as_default(
    services: Services, tmp_path: Path
) -> None:
    """`send_task` without a queue, as celery-node and a bare Celery producer send it."""
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    bare = Celery("bare", broker=broker)  # Celery's defaults: the `celery` queue
    bare.send_task("jobs.test_record_sku", args=["via-celery-queue"])
    client = redis.Redis.from_url(redis_client_url(broker) or "")
    assert int(client.llen("celery")) == 1
    log = tmp_path / "worker.log"
    with celery_process(worker_args(), worker_env(services, broker), log):
        wait_until(lambda: product_count("via-celery-queue") == 1, timeout=30)
    assert int(client.llen("celery")) == 0


def test_a_queue_no_worker_takes_is_reported_stranded(services: Services, tmp_path: Path) -> None:
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    producer = producer_for(broker)
    producer.send_task("jobs.test_record_sku", args=["lost-in-reports"], queue="reports")
    log = tmp_path / "worker.log"
    with celery_process(worker_args(), worker_env(services, broker), log):
        wait_until(lambda: " ready." in log.read_text())
        shown = run_cli(services, "queues", "--json", broker=broker)
        rows = {row["queue"]: row for row in json.loads(shown.stdout)}
        assert rows["reports"] == {
            "queue": "reports",
            "depth": 1,
            "oldest_age_seconds": None,
            "paused": False,
            "consumers": 0,
            "stranded": True,
        }
        assert rows["default"]["consumers"] == 1 and rows["celery"]["consumers"] == 1
        health = run_cli(services, "health", broker=broker)
    assert health.returncode == 1
    assert "1 job(s) wait in 'reports' and no live worker takes that queue" in health.stderr


def test_a_no_ack_consumer_leaves_no_record(services: Services) -> None:
    """Replies that `celery inspect` reads are never acknowledged: nothing may be recorded."""
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    from app.delivery.transport import Transport

    queue = Queue("replies", Exchange(""), routing_key="replies")
    received: list[object] = []
    with Connection(broker) as connection:
        connection.transport_cls = Transport
        Producer(connection.channel()).publish({"n": 1}, routing_key="replies", declare=[queue])
        with Consumer(
            connection, [queue], no_ack=True, callbacks=[lambda b, m: received.append(b)]
        ):
            connection.drain_events(timeout=5)
    client = redis.Redis.from_url(redis_client_url(broker) or "")
    assert received == [{"n": 1}]
    assert int(client.hlen("unacked")) == 0 and int(client.zcard("unacked_index")) == 0
    assert int(client.hlen("jobs_service:inflight")) == 0


def test_health_leaves_no_unacknowledged_record(services: Services, tmp_path: Path) -> None:
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    log = tmp_path / "worker.log"
    with celery_process(worker_args(), worker_env(services, broker), log):
        wait_until(lambda: " ready." in log.read_text())
        for _ in range(3):
            assert run_cli(services, "health", broker=broker).returncode == 0
        client = redis.Redis.from_url(redis_client_url(broker) or "")
        assert int(client.hlen("unacked")) == 0

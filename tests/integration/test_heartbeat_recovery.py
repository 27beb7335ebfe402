"""Recovery by heartbeat, with the default settings: a killed worker's jobs run again within
seconds, a live worker's jobs are never taken from it, and a message that keeps killing the
process holding it is dead-lettered instead of being handed out forever.

The default visibility timeout is six hours, so within these tests only the heartbeat can
bring a message back. Each worker is a process group of its own, killed outright.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from app.db import session_scope
from app.models import DeadLetter, Product
from app.settings import redis_client_url
from tests.integration.conftest import (
    Services,
    flush_broker,
    isolated_broker,
    producer_for,
    worker_env,
)
from tests.integration.factories import scalar, wait_until
from tests.integration.harness_jobs import RUNS_KEY
from tests.integration.test_worker_crash import CrashingWorker

# Needs a Redis broker (the transport's records, scripts or Redis itself): a pass on
# RabbitMQ would leave it out (`-m "not redis_only"`).
pytestmark = pytest.mark.redis_only

DB = 14


def client_for(broker: str) -> redis.Redis:
    return redis.Redis.from_url(redis_client_url(broker) or "")


def product_count(sku: str) -> int:
    return int(scalar(select(func.count()).select_from(Product).where(Product.sku == sku)))


def held(client: redis.Redis) -> int:
    """Deliveries recorded as held by some worker."""
    return int(client.hlen("jobs_service:inflight"))


def started_lines(log: Path, task_id: str) -> int:
    return log.read_text().count(f"job started jobs.test_slow_record[{task_id}]")


def ready(log: Path, starts: int = 1) -> None:
    wait_until(lambda: log.read_text().count(" ready.") >= starts, timeout=60)


def hold_a_slow_job(broker: str, worker: CrashingWorker, sku: str) -> None:
    """Start `worker` and have it take a 4 s job that writes product `sku` when it ends."""
    worker.start()
    ready(worker.log)
    producer_for(broker).send_task("jobs.test_slow_record", args=[sku, 4], queue="default")
    wait_until(lambda: held(client_for(broker)) == 1, timeout=30)


def restarting_until(worker: CrashingWorker, done: Callable[[], bool], seconds: float) -> int:
    """Start `worker` again each time it dies (as a supervisor would) until `done()`; the
    number of restarts."""
    restarts = 0
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, "not done in time"
        assert worker.process is not None
        if worker.process.poll() is not None:
            restarts += 1
            worker.start()
        time.sleep(0.2)
    return restarts


def test_a_killed_workers_job_runs_again_on_a_live_worker_within_seconds(
    services: Services, tmp_path: Path
) -> None:
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    client = client_for(broker)
    victim = CrashingWorker(worker_env(services, broker), tmp_path / "victim.log")
    survivor = CrashingWorker(worker_env(services, broker), tmp_path / "survivor.log")
    try:
        hold_a_slow_job(broker, victim, "held-by-victim")
        survivor.start()
        ready(survivor.log)
        victim.crash()
        killed = time.monotonic()
        wait_until(lambda: product_count("held-by-victim") == 1, timeout=60)
        print(f"the killed worker's job ran again {time.monotonic() - killed - 4:.1f} s after")
    finally:
        victim.stop()
        survivor.stop()
    assert "recovered 1 message(s) held by worker" in survivor.log.read_text()
    assert product_count("held-by-victim") == 1
    assert held(client) == 0 and int(client.hlen("unacked")) == 0


def test_a_killed_workers_job_runs_again_when_a_replacement_starts(
    services: Services, tmp_path: Path
) -> None:
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    worker = CrashingWorker(worker_env(services, broker), tmp_path / "worker.log")
    try:
        hold_a_slow_job(broker, worker, "held-when-killed")
        worker.crash()  # no other worker runs
        worker.start()  # the replacement, at once, as a supervisor would start it
        wait_until(lambda: product_count("held-when-killed") == 1, timeout=60)
    finally:
        worker.stop()
    assert product_count("held-when-killed") == 1
    assert "recovered 1 message(s) held by worker" in worker.log.read_text()


def test_a_live_workers_long_job_is_never_taken_from_it(services: Services, tmp_path: Path) -> None:
    """A job running far longer than the visibility timeout starts once, with a second
    worker idle beside it (before heartbeats, kombu's restore handed it to the second)."""
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    env = worker_env(services, broker, BROKER_VISIBILITY_TIMEOUT="2")
    first = CrashingWorker(env, tmp_path / "first.log")
    second = CrashingWorker(env, tmp_path / "second.log")
    try:
        first.start()
        ready(first.log)
        result = producer_for(broker).send_task(
            "jobs.test_slow_record", args=["long-job", 16], queue="default"
        )
        wait_until(lambda: started_lines(first.log, result.id) == 1, timeout=30)
        second.start()
        wait_until(lambda: product_count("long-job") == 1, timeout=60)
        time.sleep(3)  # a second start would show by now
    finally:
        first.stop()
        second.stop()
    assert started_lines(first.log, result.id) + started_lines(second.log, result.id) == 1
    assert product_count("long-job") == 1


def test_a_message_that_keeps_killing_its_process_is_dead_lettered_as_poison(
    services: Services, tmp_path: Path
) -> None:
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    client = client_for(broker)
    worker = CrashingWorker(worker_env(services, broker), tmp_path / "worker.log")
    producer = producer_for(broker)
    try:
        worker.start()
        ready(worker.log)
        poison = producer.send_task("jobs.test_kill_my_process", args=["p1"], queue="default")
        wait_until(lambda: scalar(select(func.count()).select_from(DeadLetter)), timeout=90)
        # The worker is still up and runs the next job.
        producer.send_task("jobs.test_record_sku", args=["after-poison"], queue="default")
        wait_until(lambda: product_count("after-poison") == 1, timeout=30)
        assert worker.process is not None and worker.process.poll() is None
        # (acknowledged before the stop: its SIGTERM reaches the pool processes too)
        wait_until(lambda: held(client) == 0, timeout=30)
    finally:
        worker.stop()
    with session_scope() as session:
        [entry] = session.scalars(select(DeadLetter))
        assert (entry.reason, entry.task_id, entry.job_name, entry.args) == (
            "poison",
            poison.id,
            "jobs.test_kill_my_process",
            ["p1"],
        )
        assert entry.attempts == 3 and entry.raw_message and poison.id in entry.raw_message
    # It killed the pool process three times, then was not handed out again.
    assert worker.log.read_text().count("kill_my_process p1 in") == 3
    assert int(client.llen("default")) == 0 and held(client) == 0
    assert not client.keys("jobs_service:deliveries:*")


def test_a_message_that_keeps_killing_its_whole_worker_is_dead_lettered_as_poison(
    services: Services, tmp_path: Path
) -> None:
    """Each delivery takes the whole worker down; a supervisor restarts it; the heartbeat
    recovery counts each death, and after the third the message is not handed out again."""
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    worker = CrashingWorker(worker_env(services, broker), tmp_path / "worker.log")
    producer = producer_for(broker)
    try:
        worker.start()
        ready(worker.log)
        poison = producer.send_task("jobs.test_kill_my_worker", args=["w1"], queue="default")
        restarts = restarting_until(
            worker, lambda: bool(scalar(select(func.count()).select_from(DeadLetter))), 120
        )
        producer.send_task("jobs.test_record_sku", args=["after-worker-poison"], queue="default")
        wait_until(lambda: product_count("after-worker-poison") == 1, timeout=30)
    finally:
        worker.stop()
    assert restarts == 3
    assert worker.log.read_text().count("kill_my_worker w1 in") == 3
    with session_scope() as session:
        [entry] = session.scalars(select(DeadLetter))
        assert (entry.reason, entry.task_id, entry.attempts) == ("poison", poison.id, 3)


def test_jobs_held_beside_a_poison_message_are_not_dead_lettered_with_it(
    services: Services, tmp_path: Path
) -> None:
    """A threads worker holds its running and prefetched jobs together, and a job that takes
    the whole worker down takes them down with it, each time: each of their deaths is counted.
    A message one death from the dead-letter store runs alone, so the third death is only the
    poison's own: it alone is dead-lettered, and every job held beside it runs."""
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    client = client_for(broker)
    worker = CrashingWorker(
        worker_env(services, broker), tmp_path / "worker.log", options=["--pool", "threads"]
    )
    producer = producer_for(broker)
    innocents = [f"beside-poison-{i}" for i in range(3)]

    def ran() -> set[str]:  # (a job whose acknowledgement died with its worker runs twice)
        return {json.loads(entry)["token"] for entry in client.lrange(RUNS_KEY, 0, -1)}

    try:
        worker.start()
        ready(worker.log)
        # Queued together, so that the worker (2 threads, 4 held) takes them together.
        with producer.connection_for_write() as connection:
            for token in innocents[:1]:
                producer.send_task(
                    "jobs.test_slow_run", [token, 2], queue="default", connection=connection
                )
            poison = producer.send_task(
                "jobs.test_kill_my_worker", ["w2"], queue="default", connection=connection
            )
            for token in innocents[1:]:
                producer.send_task(
                    "jobs.test_slow_run", [token, 2], queue="default", connection=connection
                )
        # until each of the four has run or been dead-lettered
        restarts = restarting_until(
            worker,
            lambda: scalar(select(func.count()).select_from(DeadLetter)) + len(ran()) >= 4,
            150,
        )
        wait_until(lambda: held(client) == 0, timeout=30)
    finally:
        worker.stop()
    with session_scope() as session:
        [entry] = session.scalars(select(DeadLetter))
        assert (entry.reason, entry.task_id, entry.attempts) == ("poison", poison.id, 3)
    assert restarts == 3 and worker.log.read_text().count("kill_my_worker w2 in") == 3
    assert ran() == set(innocents)
    assert int(client.llen("default")) == 0
    assert not client.keys("jobs_service:deliveries:*")


def test_a_job_that_asks_to_be_requeued_is_not_taken_for_poison(
    services: Services, tmp_path: Path
) -> None:
    """Reject(requeue=True) five times: five requeues, none a death, then the job runs."""
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    client = client_for(broker)
    worker = CrashingWorker(worker_env(services, broker), tmp_path / "worker.log")
    try:
        worker.start()
        ready(worker.log)
        producer_for(broker).send_task(
            "jobs.test_requeue_then_record", args=["requeued", 5], queue="default"
        )
        wait_until(lambda: product_count("requeued") == 1, timeout=60)
    finally:
        worker.stop()
    assert int(client.get("test:requeues:requeued") or 0) == 6
    assert scalar(select(func.count()).select_from(DeadLetter)) == 0
    assert not client.keys("jobs_service:deliveries:*")


def test_messages_sharing_one_delivery_tag_survive_a_warm_shutdown(
    services: Services, tmp_path: Path
) -> None:
    """celery-ts gives every message the delivery tag "celery"; each delivery gets its own."""
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    client = client_for(broker)
    producer = producer_for(broker)
    with producer.connection_for_write() as connection:
        for i in range(20):
            producer.send_task(
                "jobs.test_slow_record",
                args=[f"same-tag-{i}", 0.3],
                queue="default",
                connection=connection,
            )
    # Rewrite each queued envelope's tag as celery-ts sends it.
    raw = client.lrange("default", 0, -1)
    client.delete("default")
    for item in raw:
        envelope = json.loads(item)
        envelope["properties"]["delivery_tag"] = "celery"
        client.rpush("default", json.dumps(envelope))
    first = CrashingWorker(worker_env(services, broker), tmp_path / "first.log")
    try:
        first.start()
        wait_until(lambda: product_count("same-tag-0") + product_count("same-tag-19") >= 1)
        first.stop()  # SIGTERM: a warm shutdown
        first.start()
        wait_until(
            lambda: (
                scalar(
                    select(func.count()).select_from(Product).where(Product.sku.like("same-tag-%"))
                )
                == 20
            ),
            timeout=60,
        )
    finally:
        first.stop()
    for i in range(20):
        assert product_count(f"same-tag-{i}") == 1
    assert held(client) == 0 and int(client.hlen("unacked")) == 0

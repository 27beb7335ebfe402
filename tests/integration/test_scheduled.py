"""Retries and scheduled jobs wait in Redis's scheduled set, not in a worker's memory: each is
enqueued exactly once, at or after its due time, whatever the kills, restarts and pollers.

Workers run as process groups of their own with the default settings unless a test says
otherwise; each execution of `jobs.test_record_run` appends its start time to `test:runs` in
the broker's Redis.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu.connection import Connection

from app import celery
from app.delivery import transport
from app.delivery.records import Keys
from app.settings import redis_client_url
from tests.integration.conftest import (
    Services,
    flush_broker,
    isolated_broker,
    producer_for,
    run_cli,
    worker_env,
)
from tests.integration.factories import wait_until
from tests.integration.harness_jobs import RUNS_KEY, fail_then_record, record_run, retry_once
from tests.integration.test_broker_and_database_faults import OwnRedis
from tests.integration.test_worker_crash import CrashingWorker

# Needs a Redis broker (the transport's records, scripts or Redis itself): a pass on
# RabbitMQ would leave it out (`-m "not redis_only"`).
pytestmark = pytest.mark.redis_only

DB = 14
KEYS = Keys()


def client_for(broker: str) -> redis.Redis:
    return redis.Redis.from_url(redis_client_url(broker) or "")


def runs(client: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(RUNS_KEY, 0, -1)]


def waiting(client: redis.Redis) -> int:
    return int(client.zcard(KEYS.schedule))


def held(client: redis.Redis) -> int:
    return int(client.hlen(KEYS.inflight)) + int(client.hlen("unacked"))


def ready(log: Path, starts: int = 1) -> None:
    wait_until(lambda: log.read_text().count(" ready.") >= starts, timeout=60)


@contextmanager
def job_producer(broker: str) -> Iterator[Any]:
    """A producer on `broker` through this service's transport, as the app would pick it for
    that URL (a TCP or a unix-socket Redis, whatever the app's own broker is)."""
    url, transport_class = transport.broker_transport(broker)
    options = celery.conf.broker_transport_options
    connection = Connection(url, transport=transport_class, transport_options=options)
    with connection, connection.Producer() as producer:
        yield producer


@contextmanager
def workers(
    env: dict[str, str], tmp_path: Path, count: int, concurrency: int = 2
) -> Iterator[list[CrashingWorker]]:
    started = [CrashingWorker(env, tmp_path / f"worker-{i}.log", concurrency) for i in range(count)]
    try:
        for worker in started:
            worker.start()
        for worker in started:
            ready(worker.log)
        yield started
    finally:
        for worker in started:
            worker.stop()


def test_a_countdown_job_waits_in_redis_not_in_a_worker_and_runs_once_on_time(
    services: Services, worker: Any
) -> None:
    """The in-process worker, default settings: the job is in the set, no worker holds it."""
    from celery.worker import state as worker_state

    client = client_for(services.broker_url)
    client.delete(RUNS_KEY)
    enqueued = time.time()
    result = record_run.apply_async(["countdown"], countdown=3)
    assert waiting(client) == 1
    assert client.llen("default") == 0
    assert not [r for r in worker_state.reserved_requests if r.id == result.id]
    raw: Any = client.hget(KEYS.schedule_messages, result.id)
    entry = json.loads(bytes(raw).partition(b"\n")[0])
    assert entry["task"] == "jobs.test_record_run" and entry["queue"] == "default"
    wait_until(lambda: runs(client), timeout=30)
    time.sleep(1.5)  # a second run would show by now
    (run,) = runs(client)
    assert run["id"] == result.id
    assert run["at"] >= enqueued + 3
    assert run["at"] - (enqueued + 3) < 1.5  # polled within a fraction of a second
    assert waiting(client) == 0


def test_celerys_own_retry_of_a_plain_task_waits_in_redis_too(
    services: Services, worker: Any
) -> None:
    """Not a job: a bare `@celery.task` calling `self.retry(countdown=3)`."""
    client = client_for(services.broker_url)
    client.delete(RUNS_KEY)
    result = retry_once.delay("plain-task")
    wait_until(lambda: waiting(client) == 1, timeout=30)
    raw: Any = client.hget(KEYS.schedule_messages, result.id)
    assert json.loads(bytes(raw).partition(b"\n")[0])["retries"] == 1
    wait_until(lambda: runs(client), timeout=30)
    time.sleep(1)
    (run,) = runs(client)
    assert run["id"] == result.id and run["attempt"] == 2


def protocol_1_message(task_id: str, token: str, eta: dt.datetime) -> bytes:
    """A Celery 3 (protocol 1) message with its eta in the body, as a bare producer builds it."""
    body = {"task": "jobs.test_record_run", "id": task_id, "args": [token], "kwargs": {}}
    body["eta"] = eta.isoformat()
    return json.dumps(
        {
            "body": base64.b64encode(json.dumps(body).encode()).decode(),
            "content-type": "application/json",
            "content-encoding": "utf-8",
            "headers": {},
            "properties": {
                "body_encoding": "base64",
                "delivery_tag": "hand-made",
                "delivery_info": {"exchange": "", "routing_key": "default"},
                "delivery_mode": 2,
                "priority": 0,
            },
        }
    ).encode()


def test_a_foreign_producers_future_job_is_moved_to_the_set_not_held(
    services: Services, tmp_path: Path
) -> None:
    """A stock Celery producer's `send_task(eta=...)` and a hand-made protocol 1 message, both
    pushed onto the queue by their producers: the worker moves each into the scheduled set and
    ends its delivery; each runs once, after its eta."""
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    client = client_for(broker)
    with workers(worker_env(services, broker), tmp_path, 1) as (worker,):
        eta = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=6)
        stock = producer_for(broker).send_task(
            "jobs.test_record_run", args=["stock"], eta=eta, queue="default"
        )
        hand_made = str(uuid.uuid4())
        client.lpush("default", protocol_1_message(hand_made, "protocol-1", eta))
        wait_until(lambda: waiting(client) == 2, timeout=5)
        assert held(client) == 0 and client.llen("default") == 0
        assert "it waits in the scheduled set" in worker.log.read_text()
        wait_until(lambda: len(runs(client)) == 2, timeout=30)
        time.sleep(1.5)
    done = runs(client)
    assert sorted(r["id"] for r in done) == sorted([stock.id, hand_made])
    assert all(r["at"] >= eta.timestamp() for r in done)
    assert waiting(client) == 0 and held(client) == 0


@pytest.mark.heavy
def test_two_workers_polling_enqueue_each_due_job_exactly_once_never_early(
    services: Services, tmp_path: Path
) -> None:
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    client = client_for(broker)
    count = 2000
    with workers(worker_env(services, broker), tmp_path, 2):
        # Far enough ahead that every job is published before any falls due, on a busy machine.
        due = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=25)
        with job_producer(broker) as producer:
            ids = [
                record_run.apply_async([f"same-second-{i}"], eta=due, producer=producer).id
                for i in range(count)
            ]
        assert time.time() < due.timestamp(), "publishing outlasted the wait: raise it"
        assert waiting(client) == count and held(client) == 0
        wait_until(lambda: client.llen(RUNS_KEY) >= count, timeout=120)
        time.sleep(2)
    done = runs(client)
    assert Counter(r["id"] for r in done) == Counter(ids)  # each once
    lateness = sorted(r["at"] - due.timestamp() for r in done)
    assert lateness[0] >= 0
    print(
        f"{count} jobs due in the same second, two workers: start lateness (queue drain "
        f"included) p50 {statistics.median(lateness):.3f} s, max {lateness[-1]:.3f} s"
    )


@pytest.mark.heavy
def test_killed_workers_leave_every_scheduled_job_enqueued_once(
    services: Services, tmp_path: Path
) -> None:
    """Jobs fall due over 12 s while whole workers (their pollers with them) are SIGKILLed and
    replaced. Every job runs, none before its time; a job runs twice only where a killed worker
    held it mid-run and the heartbeat recovery put it back (counted in the survivors' logs)."""
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    client = client_for(broker)
    count = 1200
    start = time.time() + 4
    with workers(worker_env(services, broker), tmp_path, 2) as pair:
        with job_producer(broker) as producer:
            due = {
                record_run.apply_async(
                    [f"spread-{i}"], countdown=start + i * 0.01 - time.time(), producer=producer
                ).id: start + i * 0.01
                for i in range(count)
            }
        for kill in range(4):
            time.sleep(max(0.0, start + 1 + kill * 2.5 - time.time()))
            victim = pair[kill % 2]
            victim.crash()
            victim.start()
        wait_until(lambda: client.llen(RUNS_KEY) >= count, timeout=180)
        time.sleep(8)  # the recovery of the last victim's messages, if any
        logs = "".join(w.log.read_text() for w in pair)
    done = runs(client)
    per_job = Counter(r["id"] for r in done)
    assert set(per_job) == set(due)
    assert all(r["at"] >= due[r["id"]] for r in done)
    recovered = sum(
        int(line.split("recovered ")[1].split(" ")[0])
        for line in logs.splitlines()
        if "recovered " in line and " message(s) held by worker" in line
    )
    extra = sum(per_job.values()) - len(per_job)
    assert extra <= recovered
    assert waiting(client) == 0


def test_a_redis_restart_loses_no_scheduled_job(services: Services, tmp_path: Path) -> None:
    """Redis persisting every write (AOF, appendfsync always) is SIGKILLed and restarted while
    jobs wait: each runs once after its due time."""
    own = OwnRedis(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    own.start()
    client = client_for(own.url)
    count = 300
    try:
        with workers(worker_env(services, own.url), tmp_path, 1):
            due = time.time() + 8
            with job_producer(own.url) as producer:
                ids = [
                    record_run.apply_async(
                        [f"restart-{i}"], countdown=due - time.time(), producer=producer
                    ).id
                    for i in range(count)
                ]
            assert waiting(client) == count
            own.kill()
            time.sleep(1)
            own.start()
            assert waiting(client) == count
            wait_until(lambda: client.llen(RUNS_KEY) >= count, timeout=90)
            time.sleep(1.5)
            done = runs(client)
    finally:
        own.stop()
    assert Counter(r["id"] for r in done) == Counter(ids)
    assert all(r["at"] >= due for r in done)


def test_a_job_revoked_or_deleted_before_it_is_due_never_runs(
    services: Services, tmp_path: Path
) -> None:
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    client = client_for(broker)
    with workers(worker_env(services, broker), tmp_path, 1):
        # A revoke is a broadcast: a worker not yet listening to its control channel misses
        # it (as it missed one in a CI run). A ping answered says it listens.
        control = producer_for(broker).control
        wait_until(lambda: control.ping(timeout=1.0), timeout=30)
        with job_producer(broker) as producer:
            revoked, deleted, kept = (
                record_run.apply_async([token], countdown=5, producer=producer)
                for token in ("revoked", "deleted", "kept")
            )
        control.revoke(revoked.id)
        wait_until(lambda: waiting(client) == 2, timeout=10)
        shown = run_cli(services, "scheduled", "list", "--json", broker=broker)
        assert shown.returncode == 0, shown.stderr
        listed = json.loads(shown.stdout)
        assert {e["task_id"] for e in listed["entries"]} == {deleted.id, kept.id}
        gone = run_cli(services, "scheduled", "delete", deleted.id, broker=broker)
        assert gone.returncode == 0, gone.stderr
        assert waiting(client) == 1
        missing = run_cli(services, "scheduled", "delete", deleted.id, broker=broker)
        assert missing.returncode == 2 and "no scheduled job" in missing.stderr
        wait_until(lambda: runs(client), timeout=30)
        time.sleep(2)
    assert [r["id"] for r in runs(client)] == [kept.id]


def test_a_retry_waiting_longer_than_the_visibility_timeout_runs_once(
    services: Services, tmp_path: Path
) -> None:
    """A 2 s visibility timeout, a 6 s retry wait, two workers: the retry waits in the set
    (operators see it, with its error and next attempt) and runs once."""
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    client = client_for(broker)
    env = worker_env(services, broker, BROKER_VISIBILITY_TIMEOUT="2")
    with workers(env, tmp_path, 2):
        with job_producer(broker) as producer:
            result = fail_then_record.apply_async(["retry-once", 1], producer=producer)
        wait_until(lambda: waiting(client) == 1, timeout=30)
        # The retry is in the set before the first attempt's message is settled; once that
        # settles, and well before the 6 s wait ends, nothing holds the waiting job.
        wait_until(lambda: held(client) == 0 and waiting(client) == 1, timeout=4)
        listed = run_cli(services, "retries", "list", "--json", broker=broker)
        assert listed.returncode == 0, listed.stderr
        (entry,) = json.loads(listed.stdout)["entries"]
        assert entry["task_id"] == result.id
        assert entry["attempt"] == 2 and entry["error"] == "NotYet: retry-once: not yet"
        shown = run_cli(services, "scheduled", "show", result.id, broker=broker)
        assert shown.returncode == 0 and "jobs.test_fail_then_record" in shown.stdout
        wait_until(lambda: runs(client), timeout=30)
        time.sleep(3)  # past the visibility timeout again: a second run would show
    (run,) = runs(client)
    assert run["id"] == result.id and run["attempt"] == 2


def test_run_now_enqueues_a_waiting_job_at_once(services: Services, tmp_path: Path) -> None:
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    client = client_for(broker)
    with workers(worker_env(services, broker), tmp_path, 1):
        with job_producer(broker) as producer:
            later = record_run.apply_async(["in-an-hour"], countdown=3600, producer=producer)
        asked = time.time()
        moved = run_cli(services, "scheduled", "run-now", later.id, broker=broker)
        assert moved.returncode == 0, moved.stderr
        wait_until(lambda: runs(client), timeout=30)
    assert [r["id"] for r in runs(client)] == [later.id]
    assert runs(client)[0]["at"] - asked < 10


@pytest.mark.parametrize("args", [["scheduled", "show", "nope"], ["scheduled", "run-now", "x"]])
def test_unknown_scheduled_ids_are_one_line_errors(services: Services, args: list[str]) -> None:
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    done = run_cli(services, *args, broker=broker)
    assert done.returncode == 2
    assert "no scheduled job with task id" in done.stderr and "Traceback" not in done.stderr


def test_delete_all_of_one_job_leaves_the_others(services: Services, tmp_path: Path) -> None:
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    client = client_for(broker)
    with job_producer(broker) as producer:
        for i in range(3):
            record_run.apply_async([f"r{i}"], countdown=600, producer=producer)
        other = fail_then_record.apply_async(["f", 0], countdown=600, producer=producer)
    listed = run_cli(services, "scheduled", "list", "--job", "jobs.test_record_run", broker=broker)
    assert listed.returncode == 0 and listed.stdout.count("jobs.test_record_run") == 3
    both = run_cli(services, "scheduled", "delete", other.id, "--all", broker=broker)
    assert both.returncode == 2 and "name task ids, or --all" in both.stderr
    gone = run_cli(
        services, "scheduled", "delete", "--all", "--job", "jobs.test_record_run", broker=broker
    )
    assert gone.returncode == 0, gone.stderr
    assert gone.stdout.count(": deleted") == 3
    members: Any = client.zrange(KEYS.schedule, 0, -1)
    assert [bytes(m).decode() for m in members] == [other.id]

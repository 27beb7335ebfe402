"""Flow control across workers: concurrency limits, rate limits, unique jobs, expiring jobs.

Real workers (process groups of their own, the default settings unless a test says
otherwise) on an isolated Redis database. Each flow-control harness job appends what it did
to `test:flow` ({token, group, start, end, admitted, id, attempt}); a run that was killed
leaves only its task id in `test:flow:started`.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from app.db import session_scope
from app.delivery import records
from app.delivery.records import Keys
from tests.integration.conftest import Services, flush_broker, isolated_broker, run_cli, worker_env
from tests.integration.factories import wait_until
from tests.integration.harness_jobs import (
    FLOW_KEY,
    FLOW_STARTED_KEY,
    expiring,
    limited,
    rated,
    serial,
    unique,
)
from tests.integration.test_scheduled import client_for, job_producer, ready, workers
from tests.integration.test_worker_crash import CrashingWorker

# Needs a Redis broker (the transport's records, scripts or Redis itself): a pass on
# RabbitMQ would leave it out (`-m "not redis_only"`).
pytestmark = pytest.mark.redis_only

DB = 12
KEYS = Keys()


def spans(client: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(FLOW_KEY, 0, -1)]


def most_at_once(entries: list[dict[str, Any]]) -> int:
    """The most runs whose [start, end] overlap at one instant."""
    events = sorted(
        [(e["start"], 1) for e in entries] + [(e["end"], -1) for e in entries],
        key=lambda event: (event[0], event[1]),  # an end before a start at the same instant
    )
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def settled(client: redis.Redis) -> bool:
    """Nothing waits: the scheduled set, the limits' holders and waiting lists are empty."""
    return (
        client.zcard(KEYS.schedule) == 0
        and client.hlen(KEYS.limits) == 0
        and not list(client.scan_iter(match=KEYS.limit + "*"))
    )


def test_a_concurrency_limit_holds_across_two_workers_and_every_deferred_job_runs_once(
    services: Services, tmp_path: Path
) -> None:
    """Two workers at concurrency 4, default settings, 24 jobs in two groups limited to two
    at once each: never more than two of a group overlap, and each job runs exactly once."""
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    client = client_for(broker)
    with workers(worker_env(services, broker), tmp_path, 2, concurrency=4):
        with job_producer(broker) as producer:
            ids = [
                limited.apply_async([f"{group}-{i}", group, 0.3], producer=producer).id
                for i in range(12)
                for group in ("a", "b")
            ]
        wait_until(lambda: client.llen(FLOW_KEY) >= len(ids), timeout=120)
        wait_until(lambda: settled(client), timeout=30)
    done = spans(client)
    assert Counter(e["id"] for e in done) == Counter(ids)
    for group in ("a", "b"):
        ran = [e for e in done if e["group"] == group]
        assert most_at_once(ran) == 2  # the limit, and used: the workers had 8 processes
    assert all(e["attempt"] == 1 for e in done)  # waiting used up no attempt


def test_jobs_waiting_for_a_slot_run_in_arrival_order(services: Services, tmp_path: Path) -> None:
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    client = client_for(broker)
    with workers(worker_env(services, broker), tmp_path, 1, concurrency=4):
        with job_producer(broker) as producer:
            ids = [serial.apply_async([f"s-{i}", 0.2], producer=producer).id for i in range(10)]
        wait_until(lambda: client.llen(FLOW_KEY) >= len(ids), timeout=60)
        wait_until(lambda: settled(client), timeout=30)
    done = spans(client)
    assert [e["id"] for e in sorted(done, key=lambda e: e["start"])] == ids
    assert most_at_once(done) == 1


def test_a_rate_limit_holds_across_workers_and_defers_without_using_an_attempt(
    services: Services, tmp_path: Path
) -> None:
    """Five per second per group, 20 jobs on two workers: no six admissions (in Redis's
    clock, as the job sees it in `job_admitted_at`) within a second, each job starts right
    after its admission, and none is failed or retried."""
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    client = client_for(broker)
    with workers(worker_env(services, broker), tmp_path, 2, concurrency=4):
        with job_producer(broker) as producer:
            ids = [rated.apply_async([f"r-{i}", "g"], producer=producer).id for i in range(20)]
        wait_until(lambda: client.llen(FLOW_KEY) >= len(ids), timeout=60)
        wait_until(lambda: client.zcard(KEYS.schedule) == 0, timeout=30)
    done = spans(client)
    assert Counter(e["id"] for e in done) == Counter(ids)
    admitted = sorted(e["admitted"] for e in done)
    sixth_later = zip(admitted, admitted[5:], strict=False)
    assert all(later - earlier >= 1.0 - 1e-5 for earlier, later in sixth_later)  # (µs rounding)
    assert admitted[-1] - admitted[0] >= 3.0  # 20 at 5 per second: at least four windows
    assert all(0 <= e["start"] - e["admitted"] < 1.0 for e in done)
    assert all(e["attempt"] == 1 for e in done)


def test_a_unique_job_is_enqueued_once_while_queued_or_running_then_again_once_done(
    services: Services, tmp_path: Path
) -> None:
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    client = client_for(broker)
    with job_producer(broker) as producer:
        # A rollback releases the key: the job never existed.
        try:
            with session_scope():
                rolled_back = unique.apply_async(["u", 1], producer=producer).id
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        first = unique.apply_async(["u", 1], producer=producer).id
        assert first != rolled_back
        assert unique.apply_async(["u", 1], producer=producer).id == first  # queued
        other = unique.apply_async(["other", 0], producer=producer).id
        assert other != first
        listed = json.loads(run_cli(services, "flow", "--json", broker=broker).stdout)
        assert {(u["key"], u["task_id"]) for u in listed["unique"]} == {
            ("jobs.test_unique:u", first),
            ("jobs.test_unique:other", other),
        }
        with workers(worker_env(services, broker), tmp_path, 1):
            wait_until(lambda: client.llen(FLOW_STARTED_KEY) >= 1, timeout=30)
            assert unique.apply_async(["u", 1], producer=producer).id == first  # running
            wait_until(lambda: client.llen(FLOW_KEY) == 2, timeout=30)
            # (the key is released once the job has returned, just after it recorded its run)
            wait_until(lambda: not client.exists(KEYS.unique + "jobs.test_unique:u"), timeout=30)
            again = unique.apply_async(["u", 0], producer=producer).id
            assert again != first
            wait_until(lambda: client.llen(FLOW_KEY) == 3, timeout=30)
    assert Counter(e["id"] for e in spans(client)) == Counter([first, other, again])
    assert not list(client.scan_iter(match=KEYS.unique + "*"))


def test_a_unique_key_claimed_by_a_transaction_that_never_commits_does_not_refuse_later_jobs(
    services: Services, tmp_path: Path
) -> None:
    """A process that enqueues a unique job inside a transaction and dies before its commit
    leaves the key claimed, for a job that will never exist. While that transaction is open
    the key refuses; once PostgreSQL has ended it, the next enqueue takes the key over."""
    from tests.integration.test_outbox import producer as outbox_producer

    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    client = client_for(broker)
    dying = outbox_producer(services, broker, "unique", "orphan")
    assert dying.stdout is not None
    staged = dying.stdout.readline().strip()
    assert staged
    with job_producer(broker) as producer:
        # Its transaction is open: it may yet commit, so the key holds.
        assert unique.apply_async(["orphan", 0], producer=producer).id == staged
        dying.kill()  # SIGKILL before the commit: the job never existed
        dying.wait()
        # PostgreSQL ends the dead session's transaction as soon as it sees the socket close.
        taken = wait_until(
            lambda: (i := unique.apply_async(["orphan", 0], producer=producer).id) != staged and i,
            timeout=30,
        )
        assert client.get(KEYS.unique + "jobs.test_unique:orphan") == taken.encode()
        # The new holder is a job that exists: the next enqueue is refused in its favour.
        assert unique.apply_async(["orphan", 0], producer=producer).id == taken
        with workers(worker_env(services, broker), tmp_path, 1):
            wait_until(lambda: client.llen(FLOW_KEY) == 1, timeout=30)
            wait_until(
                lambda: not client.exists(KEYS.unique + "jobs.test_unique:orphan"), timeout=30
            )
    assert [e["id"] for e in spans(client)] == [taken]
    assert not list(client.scan_iter(match=KEYS.unique + "*"))


def test_a_sigkilled_workers_slots_and_unique_key_come_back(
    services: Services, tmp_path: Path
) -> None:
    """A worker holding both slots of a group and a unique key is SIGKILLed (default
    heartbeat settings). A second worker takes the recovered jobs: the waiting job gets a slot
    once recovery has put the dead worker's back, every job completes once, the limit holds,
    and the unique key can be claimed again once its job has run."""
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    client = client_for(broker)
    env = worker_env(services, broker)
    first = CrashingWorker(env, tmp_path / "first.log", concurrency=4)
    second = CrashingWorker(env, tmp_path / "second.log", concurrency=4)
    try:
        first.start()
        ready(first.log)
        with job_producer(broker) as producer:
            long_ids = [
                limited.apply_async([f"long-{i}", "k", 4], producer=producer).id for i in range(2)
            ]
            wait_until(lambda: client.llen(FLOW_STARTED_KEY) == 2, timeout=30)
            short_id = limited.apply_async(["short", "k", 0], producer=producer).id
            unique_id = unique.apply_async(["kill", 4], producer=producer).id
            wait_until(lambda: client.llen(FLOW_STARTED_KEY) == 3, timeout=30)
            wait_until(lambda: client.zcard(KEYS.schedule) == 1, timeout=30)  # short waits
            shown = json.loads(run_cli(services, "flow", "--json", broker=broker).stdout)
            (slots,) = [s for s in shown["limits"] if s["key"] == "jobs.test_limited:k"]
            assert len(slots["holders"]) == 2 and slots["waiting"] == 1
            first.crash()
            crashed = time.time()
            second.start()
            wait_until(lambda: client.llen(FLOW_KEY) == 4, timeout=90)
            short = next(e for e in spans(client) if e["id"] == short_id)
            # The dead worker's slots came back through recovery (5 s without a heartbeat),
            # not through their 120 s duration.
            assert short["start"] - crashed < 60
            # (released once the rerun has returned, a moment after it recorded its run)
            wait_until(lambda: not client.exists(KEYS.unique + "jobs.test_unique:kill"), 30)
            assert unique.apply_async(["kill", 0], producer=producer).id != unique_id
            wait_until(lambda: client.llen(FLOW_KEY) == 5, timeout=30)
            wait_until(lambda: settled(client), timeout=30)
    finally:
        first.stop()
        second.stop()
    done = spans(client)
    finished = Counter(e["id"] for e in done)
    assert all(finished[i] == 1 for i in (*long_ids, short_id, unique_id))
    assert most_at_once([e for e in done if e["group"] == "k"]) <= 2


def test_a_job_still_queued_after_expires_in_is_skipped_logged_and_counted(
    services: Services, tmp_path: Path
) -> None:
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    client = client_for(broker)
    with workers(worker_env(services, broker), tmp_path, 1) as (worker,):
        records.pause(client, "default")  # the worker takes nothing from it until resumed
        with job_producer(broker) as producer:
            stale = expiring.apply_async(["stale"], producer=producer).id
            time.sleep(2.5)  # expires_in is 2 s
            fresh = expiring.apply_async(["fresh"], producer=producer).id
        records.resume(client, "default")
        wait_until(lambda: client.llen(FLOW_KEY) >= 1, timeout=30)
        wait_until(lambda: f"job expired jobs.test_expiring[{stale}]" in worker.log.read_text())
    assert [e["id"] for e in spans(client)] == [fresh]


def test_two_runs_of_one_import_wait_for_each_other_instead_of_retrying_on_the_row_lock(
    services: Services, tmp_path: Path
) -> None:
    """import_data is limited to one run per import: the second waits for the slot (in the
    scheduled set) and finds the import done, where it used to hit the NOWAIT lock and retry."""
    from app.jobs import import_data
    from app.models import Import
    from tests.integration.factories import reload
    from tests.integration.test_job_import_data import new_import

    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    source = tmp_path / "big.csv"
    rows = "".join(f"SKU-{i},Item {i},1.00,{i % 50}\n" for i in range(40_000))
    source.write_text("sku,name,price,inventory\n" + rows)
    import_id = new_import(str(source))
    with workers(worker_env(services, broker), tmp_path, 2, concurrency=4) as started:
        with job_producer(broker) as producer:
            for _ in range(2):
                import_data.apply_async([import_id], producer=producer)
        wait_until(lambda: reload(Import, import_id).status == "completed", timeout=120)
        logs = lambda: "".join(w.log.read_text() for w in started)  # noqa: E731
        wait_until(lambda: logs().count("job finished jobs.import_data") == 2, timeout=60)
    text = logs()
    assert "deferred by its concurrency limit" in text
    assert "ImportInProgress" not in text
    assert reload(Import, import_id).rows_imported == 40_000


def raw_envelope(task: str, body: Any, headers: dict[str, Any] | None) -> bytes:
    """kombu's Redis envelope built by hand, as a producer in another language would."""
    import base64
    import uuid

    return json.dumps(
        {
            "body": base64.b64encode(json.dumps(body).encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers or {},
            "properties": {
                "body_encoding": "base64",
                "delivery_info": {"exchange": "", "routing_key": "default"},
                "delivery_mode": 2,
                "delivery_tag": str(uuid.uuid4()),
                "priority": 0,
            },
        }
    ).encode()


def test_hand_built_messages_for_controlled_jobs_cannot_stop_the_worker_or_get_lost(
    services: Services, tmp_path: Path
) -> None:
    """Raw bytes pushed into Redis for jobs under flow control: arguments the key function
    cannot take, flow headers of the wrong type, a batch that does not exist, Celery 3's
    protocol 1. Each is run or accounted for, and the worker goes on."""
    import uuid

    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    client = client_for(broker)
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}

    def protocol_2(task: str, args: list[Any], **extra: Any) -> tuple[str, bytes]:
        task_id = str(uuid.uuid4())
        headers = {"lang": "py", "task": task, "id": task_id, "retries": 0, **extra}
        return task_id, raw_envelope(task, [args, {}, embed], headers)

    bad_arity_id, bad_arity = protocol_2("jobs.test_limited", ["only-one-argument"])
    odd_id, odd_headers = protocol_2(
        "jobs.test_serial",
        ["odd-headers", 0],
        job_batch="not-a-batch",
        job_expires_at="soon",
        job_unique_key=5,
    )
    ghost_id, ghost_batch = protocol_2("jobs.test_serial", ["no-such-batch", 0], job_batch=999_999)
    old_id = str(uuid.uuid4())
    protocol_1 = raw_envelope(
        "jobs.test_serial",
        {"task": "jobs.test_serial", "id": old_id, "args": ["protocol-1", 0], "kwargs": {}},
        None,
    )
    good_id, good = protocol_2("jobs.test_serial", ["good", 0])
    for raw in (bad_arity, odd_headers, ghost_batch, protocol_1, good):
        client.lpush("default", raw)
    with workers(worker_env(services, broker), tmp_path, 1) as (worker,):
        wait_until(lambda: client.llen(FLOW_KEY) >= 4, timeout=60)
        wait_until(lambda: bad_arity_id in worker.log.read_text(), timeout=30)
        wait_until(lambda: settled(client), timeout=30)
        assert worker.process is not None and worker.process.poll() is None
    assert {e["id"] for e in spans(client)} == {odd_id, ghost_id, old_id, good_id}
    log = worker.log.read_text()
    assert f"job discarded jobs.test_limited[{bad_arity_id}]" in log  # bad arguments: discarded
    # The key function could not take its arguments: admitted without limits, then discarded.
    assert "could not work out the flow controls of a message" in log

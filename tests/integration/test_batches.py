"""Batches with callbacks, with real workers: each callback fires exactly once, whatever the
kills, retries, deaths and concurrent completions; nested batches fire children first; a
rollback adds nothing.

Callbacks are `jobs.test_batch_callback(label)`, which appends {label, batch, event} to
`test:batch:callbacks` in the broker's Redis.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, select

from app.db import session_scope
from app.jobs.base import perform_all_later
from app.jobs.batches import Batch, BatchError
from app.models import JobBatch
from tests.integration.conftest import (
    Services,
    flush_broker,
    isolated_broker,
    run_cli,
    worker_env,
)
from tests.integration.factories import wait_until
from tests.integration.harness_jobs import (
    BATCH_CALLBACKS_KEY,
    always_fails,
    barrier,
    batch_callback,
    batch_noop,
    grow,
    nest,
    record_run,
)
from tests.integration.test_scheduled import client_for, ready, workers
from tests.integration.test_worker_crash import CrashingWorker

DB = 15


def ran_more_than(client: redis.Redis, count: int) -> bool:
    return int(client.hlen("test:batch:runs")) > count


def callbacks(client: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(BATCH_CALLBACKS_KEY, 0, -1)]


@pytest.fixture
def broker(services: Services) -> Iterator[str]:
    """An isolated Redis database this process publishes to: the app's broker is switched to it
    for the test (the job layer's fast path publishes through the app's producer pool)."""
    from app import celery

    url = isolated_broker(services.broker_url, DB)
    flush_broker(url)
    original = celery.conf.broker_url
    _switch_broker(url)
    try:
        yield url
    finally:
        _switch_broker(original)


def _switch_broker(url: str) -> None:
    from app import celery

    # (kombu keeps one pool per connection: switching back finds the first one again, open)
    celery.conf.broker_url = url
    celery._pool = None
    celery.amqp._producer_pool = None


@pytest.mark.heavy
def test_a_batch_of_ten_thousand_jobs_survives_worker_kills_and_calls_back_once(
    services: Services, broker: str, tmp_path: Path
) -> None:
    client = client_for(broker)
    batch = Batch.create(
        "ten thousand",
        on_complete=batch_callback.s("complete"),
        on_success=batch_callback.s("success"),
    )
    with batch.jobs():
        perform_all_later(batch_noop.s(n) for n in range(10_000))
    env = worker_env(services, broker)
    first = CrashingWorker(env, tmp_path / "first.log")
    second = CrashingWorker(env, tmp_path / "second.log")
    try:
        for worker in (first, second):
            worker.start()
        ready(first.log)
        for runs_before_kill in (2_500, 5_000):  # whole workers SIGKILLed mid-run, restarted
            wait_until(partial(ran_more_than, client, runs_before_kill), timeout=120)
            first.crash()
            first.start()
            ready(first.log, starts=first.starts)
        wait_until(lambda: len(callbacks(client)) >= 2, timeout=240)
        time.sleep(2)  # a second callback would show
    finally:
        first.stop()
        second.stop()
    fired = callbacks(client)
    assert sorted(c["event"] for c in fired) == ["complete", "success"]
    assert all(c["batch"] == batch.id for c in fired)
    assert client.hlen("test:batch:runs") == 10_000
    progress = batch.progress()
    assert (progress.total, progress.pending, progress.dead) == (10_000, 0, 0)
    assert progress.completed_at is not None and progress.succeeded_at is not None


def test_a_batch_whose_job_dies_calls_on_death_and_on_complete_once_and_never_on_success(
    services: Services, broker: str, tmp_path: Path
) -> None:
    client = client_for(broker)
    batch = Batch.create(
        "one dies",
        on_complete=batch_callback.s("complete"),
        on_success=batch_callback.s("success"),
        on_death=batch_callback.s("death"),
    )
    with batch.jobs():
        for token in ("a", "b", "c"):
            record_run.delay(token)
        always_fails.delay("doomed")  # 3 attempts, 2 s apart, then dead-lettered
    with workers(worker_env(services, broker), tmp_path, 2):
        wait_until(lambda: {c["event"] for c in callbacks(client)} >= {"death", "complete"}, 60)
        time.sleep(2)
    assert sorted(c["event"] for c in callbacks(client)) == ["complete", "death"]
    progress = batch.progress()
    assert (progress.total, progress.pending, progress.failed, progress.dead) == (4, 0, 1, 1)
    shown = run_cli(services, "batches", "show", str(batch.id), "--json", broker=broker)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["dead"] == 1


def test_nested_batches_fire_each_childs_callbacks_before_its_parents(
    services: Services, broker: str, tmp_path: Path
) -> None:
    client = client_for(broker)
    top = Batch.create(
        "level 0",
        on_complete=batch_callback.s("complete-0"),
        on_success=batch_callback.s("success-0"),
    )
    with top.jobs():
        nest.delay(0, 3)
    with workers(worker_env(services, broker), tmp_path, 2):
        wait_until(lambda: "complete-0" in {c["label"] for c in callbacks(client)}, 60)
        time.sleep(1)
    fired = [c["label"] for c in callbacks(client)]
    assert sorted(fired) == sorted(f"{e}-{n}" for e in ("complete", "success") for n in range(4))
    for level in (1, 2, 3):  # each level's callbacks ran before its parent's were enqueued
        child = max(fired.index(f"{e}-{level}") for e in ("complete", "success"))
        parent = min(fired.index(f"{e}-{level - 1}") for e in ("complete", "success"))
        assert child < parent
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(JobBatch)) == 4
        levels = session.scalars(select(JobBatch).where(JobBatch.parent_id.is_not(None))).all()
        assert all(b.pending == 0 and b.succeeded_at is not None for b in levels)


def test_jobs_add_jobs_to_their_own_batch_and_it_completes_after_the_last(
    services: Services, broker: str, tmp_path: Path
) -> None:
    client = client_for(broker)
    batch = Batch.create("grows", on_success=batch_callback.s("grown"))
    with batch.jobs():
        grow.delay(3)
    with workers(worker_env(services, broker), tmp_path, 1):
        wait_until(lambda: callbacks(client), timeout=60)
        wait_until(lambda: client.hlen("test:batch:runs") == 4, timeout=30)
        time.sleep(1)
    assert [c["label"] for c in callbacks(client)] == ["grown"]
    progress = batch.progress()
    assert (progress.total, progress.pending) == (4, 0)  # the four grow jobs, not the noops


def test_the_last_two_jobs_finishing_at_once_on_two_workers_call_back_once(
    services: Services, broker: str, tmp_path: Path
) -> None:
    client = client_for(broker)
    batches = []
    for round_ in range(5):
        batch = Batch.create(f"race {round_}", on_complete=batch_callback.s(f"race-{round_}"))
        with batch.jobs():
            for _ in range(2):
                barrier.delay(f"race-{round_}", 2)
        batches.append(batch)
    with workers(worker_env(services, broker), tmp_path, 2):
        wait_until(lambda: len(callbacks(client)) >= 5, timeout=60)
        time.sleep(2)
    assert sorted(c["label"] for c in callbacks(client)) == [f"race-{n}" for n in range(5)]


def test_a_batch_made_in_a_transaction_that_rolls_back_leaves_nothing(
    services: Services, broker: str
) -> None:
    client = client_for(broker)
    with session_scope() as session:
        before = session.scalar(select(func.count()).select_from(JobBatch))
    with pytest.raises(RuntimeError), session_scope():
        batch = Batch.create("rolled back", on_complete=batch_callback.s("never"))
        with batch.jobs():
            record_run.delay("never")
        raise RuntimeError("roll back")
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(JobBatch)) == before
    assert client.llen("default") == 0
    # And a block that raises adds nothing, in or out of a transaction.
    kept = Batch.create("kept", on_complete=batch_callback.s("kept"))
    with pytest.raises(RuntimeError), kept.jobs():
        record_run.delay("never")
        raise RuntimeError("not added")
    assert kept.progress().total == 0 and client.llen("default") == 0
    with pytest.raises(BatchError, match="must be a job signature"):
        Batch.create("bad", on_complete="jobs.test_batch_callback")
    with pytest.raises(BatchError, match="do not nest"), kept.jobs(), kept.jobs():
        pass
    missing = run_cli(services, "batches", "show", "424242", broker=broker)
    assert missing.returncode == 2 and missing.stderr.strip() == "no batch 424242"

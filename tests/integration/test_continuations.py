"""Continuations on real workers: a checkpoint commits the cursor with the work it covers, so a
job stopped by a warm shutdown, killed outright, or failing mid-step resumes after its last
checkpoint and repeats nothing committed."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from celery.utils import uuid
from celery.worker import WorkController
from sqlalchemy import func, select, text

from app.db import session_scope
from app.models import Dataset, DeadLetter, JobContinuation, Product, Record
from tests.integration import harness_jobs
from tests.integration.conftest import (
    FinishedJobs,
    Services,
    flush_broker,
    isolated_broker,
    producer_for,
    worker_env,
)
from tests.integration.factories import make_product, reload, scalar, wait_until
from tests.integration.test_scheduled import client_for, ready
from tests.integration.test_worker_crash import CrashingWorker

DB = 10
RECORDS = 200_000


def big_dataset(records: int) -> int:
    """A dataset of `records` pending records, inserted by one SQL statement."""
    with session_scope() as session:
        dataset = Dataset(name="big")
        session.add(dataset)
        session.flush()
        session.execute(
            text(
                "INSERT INTO records (dataset_id, payload) "
                "SELECT :dataset, jsonb_build_object('n', n) FROM generate_series(1, :records) n"
            ),
            {"dataset": dataset.id, "records": records},
        )
        return dataset.id


def processed(dataset_id: int) -> int:
    return reload(Dataset, dataset_id).processed_count


def resumed_cursors(log: Path) -> list[int]:
    """The cursors the `job resumed` lines of a worker's log name."""
    return [
        int(c) for c in re.findall(r"job resumed .* at step process cursor (\d+)", log.read_text())
    ]


def _settled_progress(dataset_id: int, task_id: Any) -> Dataset:
    """The dataset once its progress and its continuation stop moving (a killed writer)."""

    def progress() -> tuple[int, Any]:
        return reload(Dataset, dataset_id).cursor, reload(JobContinuation, task_id).cursor

    seen = progress()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = progress()
        if now == seen and now[0] == now[1]:
            break
        seen = now
    return reload(Dataset, dataset_id)


def test_a_dataset_walk_stopped_by_sigterm_then_killed_by_sigkill_processes_every_record_once(
    services: Services, tmp_path: Path
) -> None:
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    dataset_id = big_dataset(RECORDS)
    env = worker_env(services, broker)
    task_id = uuid()
    logs = [tmp_path / f"worker-{i}.log" for i in range(3)]
    first, second, third = (CrashingWorker(env, log, concurrency=1) for log in logs)
    started = time.monotonic()
    try:
        first.start()
        ready(first.log)
        producer_for(broker).send_task(
            "jobs.large_data_process", args=[dataset_id], queue="low", task_id=task_id
        )
        wait_until(lambda: processed(dataset_id) >= 20_000, timeout=30, every=0.02)

        first.stop()  # SIGTERM to the main process: a warm shutdown

        at_stop = reload(Dataset, dataset_id)
        assert at_stop.status == "processing" and at_stop.processed_count < RECORDS
        progress = reload(JobContinuation, task_id)
        assert (progress.current_step, progress.cursor) == ("process", at_stop.cursor)
        assert progress.resumptions == 1
        assert "job interrupted jobs.large_data_process" in first.log.read_text()
        assert client_for(broker).llen("low") == 1  # enqueued again, waiting for a worker

        second.start()
        wait_until(lambda: processed(dataset_id) >= at_stop.processed_count + 20_000, timeout=30)
        second.crash()  # SIGKILL to the worker and its pool, mid-step

        # A COMMIT the pool process sent just before it died is still applied by PostgreSQL:
        # read once that has landed (two reads, half a second apart, agree).
        at_kill = _settled_progress(dataset_id, task_id)
        assert at_kill.processed_count < RECORDS
        assert reload(JobContinuation, task_id).cursor == at_kill.cursor

        third.start()  # its heartbeat recovery gives back the killed worker's message
        wait_until(lambda: reload(Dataset, dataset_id).status == "completed", timeout=60)
    finally:
        for worker in (first, second, third):
            worker.stop()
    elapsed = time.monotonic() - started

    assert resumed_cursors(logs[1]) == [at_stop.cursor]
    assert resumed_cursors(logs[2]) == [at_kill.cursor]
    with session_scope() as session:
        counts = dict(
            session.execute(
                select(Record.times_processed, func.count())
                .where(Record.dataset_id == dataset_id)
                .group_by(Record.times_processed)
            ).all()
        )
    assert counts == {1: RECORDS}  # no record processed twice, none skipped
    assert reload(Dataset, dataset_id).processed_count == RECORDS
    finished = reload(JobContinuation, task_id)
    assert (finished.completed_steps, finished.resumptions) == (["process"], 1)
    assert finished.finished_at is not None
    assert scalar(select(func.count()).select_from(DeadLetter)) == 0
    print(
        f"stopped at {at_stop.processed_count}, killed at {at_kill.processed_count}, "
        f"{RECORDS} records each processed once in {elapsed:.1f} s"
    )


def test_a_step_that_fails_after_progress_resumes_from_its_cursor_on_retry(
    worker: WorkController, finished_jobs: FinishedJobs
) -> None:
    products = [make_product(inventory=0, sku=f"walk-{i:03}") for i in range(95)]
    harness_jobs.walk_starts.clear()

    result = harness_jobs.continuable_walk.delay("walk-", 45)

    assert finished_jobs.wait(result.id, 2, timeout=30) == ["retry", "success"]
    # Four checkpoints committed 40 products; the fifth rolled back with its cursor.
    assert harness_jobs.walk_starts == [("walk-", None), ("walk-", products[39])]
    assert [reload(Product, p).inventory for p in products] == [1] * 95
    progress = reload(JobContinuation, result.id)
    assert (progress.completed_steps, progress.resumptions) == (["walk"], 0)
    assert progress.finished_at is not None

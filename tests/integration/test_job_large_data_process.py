"""jobs.large_data_process: keyset batches, each a checkpoint committed with its cursor, nothing
twice (the SIGTERM and SIGKILL cases are in test_continuations.py)."""

from __future__ import annotations

from celery.worker import WorkController
from sqlalchemy import func, select

from app.jobs import large_data_process
from app.models import Dataset, JobContinuation, Record
from tests.integration.conftest import run_at_once
from tests.integration.factories import make_dataset, reload, scalar, wait_until


def test_a_dataset_is_walked_batch_by_batch_to_completion(worker: WorkController) -> None:
    dataset_id = make_dataset(2500)

    result = large_data_process.delay(dataset_id)

    wait_until(lambda: reload(Dataset, dataset_id).status == "completed", timeout=60)
    dataset = reload(Dataset, dataset_id)
    last = scalar(select(func.max(Record.id)))
    assert (dataset.processed_count, dataset.cursor) == (2500, last)
    assert scalar(select(func.count()).select_from(Record).where(Record.times_processed != 1)) == 0
    wait_until(lambda: reload(JobContinuation, result.id).finished_at is not None, timeout=10)
    assert reload(JobContinuation, result.id).completed_steps == ["process"]


def test_a_stale_message_from_before_continuations_processes_nothing_again() -> None:
    dataset_id = make_dataset(2500)

    large_data_process.perform_now(dataset_id)
    # A message enqueued by the old job, with its cursor, delivered after the walk ended.
    large_data_process.perform_now(dataset_id, 0)

    dataset = reload(Dataset, dataset_id)
    assert (dataset.status, dataset.processed_count) == ("completed", 2500)
    assert scalar(select(func.count()).select_from(Record).where(Record.times_processed != 1)) == 0


def test_copies_running_at_once_process_each_record_once() -> None:
    dataset_id = make_dataset(3000)

    for _ in range(2):
        run_at_once(lambda: large_data_process.perform_now(dataset_id), copies=3)

    dataset = reload(Dataset, dataset_id)
    assert (dataset.status, dataset.processed_count) == ("completed", 3000)
    assert scalar(select(func.count()).select_from(Record).where(Record.times_processed != 1)) == 0

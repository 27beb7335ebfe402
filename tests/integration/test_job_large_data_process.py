"""jobs.large_data_process: keyset batches, the cursor committed with them, nothing twice."""

from __future__ import annotations

from celery.worker import WorkController
from sqlalchemy import func, select

from app.jobs import large_data_process
from app.jobs.testing import EnqueuedJobs
from app.models import Dataset, Record
from tests.integration.conftest import run_at_once
from tests.integration.factories import make_dataset, reload, scalar, wait_until


def test_a_dataset_is_walked_batch_by_batch_to_completion(worker: WorkController) -> None:
    dataset_id = make_dataset(2500)

    large_data_process.delay(dataset_id)

    wait_until(lambda: reload(Dataset, dataset_id).status == "completed", timeout=60)
    dataset = reload(Dataset, dataset_id)
    last = scalar(select(func.max(Record.id)))
    assert (dataset.processed_count, dataset.cursor) == (2500, last)
    assert scalar(select(func.count()).select_from(Record).where(Record.status == "pending")) == 0


def test_a_stale_message_resumes_from_the_committed_cursor(enqueued_jobs: EnqueuedJobs) -> None:
    dataset_id = make_dataset(2500)

    first = large_data_process.perform_now(dataset_id)
    # The first message is delivered again (a crash before its ack): it must not redo batch 1.
    second = large_data_process.perform_now(dataset_id, 0)

    assert second > first
    assert reload(Dataset, dataset_id).processed_count == 2000
    enqueued_jobs.perform_enqueued_jobs()
    dataset = reload(Dataset, dataset_id)
    assert (dataset.status, dataset.processed_count) == ("completed", 2500)


def test_copies_running_at_once_process_each_record_once() -> None:
    dataset_id = make_dataset(3000)

    for _ in range(2):
        run_at_once(lambda: large_data_process.perform_now(dataset_id), copies=3)

    dataset = reload(Dataset, dataset_id)
    assert (dataset.status, dataset.processed_count) == ("completed", 3000)

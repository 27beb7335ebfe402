"""jobs.batch_process / process_batch_range / process_item: each item once, completed once."""

from __future__ import annotations

from celery.worker import WorkController
from sqlalchemy import func, select

from app.devservers.smtp import SmtpServer
from app.jobs import batch_process, process_batch_range, process_item
from app.jobs.testing import EnqueuedJobs
from app.models import Batch, BatchItem
from tests.integration.conftest import run_at_once
from tests.integration.factories import make_batch, reload, scalar, wait_until


def items_with(status: str) -> int:
    return int(
        scalar(select(func.count()).select_from(BatchItem).where(BatchItem.status == status))
    )


def test_a_batch_of_a_thousand_items_completes_and_its_callback_runs_once(
    worker: WorkController, smtp: SmtpServer
) -> None:
    batch_id = make_batch(1000, invalid_every=100)

    assert batch_process.delay(batch_id).get(timeout=30) == 5  # 5 ranges of 200 items

    wait_until(lambda: reload(Batch, batch_id).status == "completed", timeout=60)
    batch = reload(Batch, batch_id)
    assert (batch.processed_count, batch.total_count) == (1000, 1000)
    assert (items_with("processed"), items_with("failed")) == (990, 10)
    [mail] = smtp.wait_for_messages(1, timeout=30)
    assert mail.message["Subject"] == f"Batch #{batch_id} completed"


def test_re_running_a_fanned_out_batch_enqueues_nothing(enqueued_jobs: EnqueuedJobs) -> None:
    batch_id = make_batch(450)

    assert batch_process.perform_now(batch_id) == 3
    assert batch_process.perform_now(batch_id) == 0

    assert len(enqueued_jobs.matching(process_batch_range)) == 3


def test_two_fan_outs_at_once_enqueue_each_range_once(enqueued_jobs: EnqueuedJobs) -> None:
    batch_id = make_batch(5000)

    results = run_at_once(lambda: batch_process.perform_now(batch_id), copies=3)

    ranges = [tuple(p.args) for p in enqueued_jobs.matching(process_batch_range)]
    assert sorted(results) == [0, 0, 25]
    assert len(ranges) == len(set(ranges)) == 25


def test_a_range_delivered_twice_counts_its_items_once(enqueued_jobs: EnqueuedJobs) -> None:
    batch_id = make_batch(3)
    first = scalar(select(func.min(BatchItem.id)).where(BatchItem.batch_id == batch_id))
    ids = list(range(first, first + 3))
    assert process_batch_range.perform_now(batch_id, ids[0], ids[-1]) == 3
    assert process_batch_range.perform_now(batch_id, ids[0], ids[-1]) == 0

    batch = reload(Batch, batch_id)
    assert (batch.processed_count, batch.status) == (3, "completed")
    # each delivery that finds the batch complete enqueues the (idempotent) callback
    assert len(enqueued_jobs.jobs) == 2
    assert {p.kwargs.get("idempotency_key") or p.args[2] for p in enqueued_jobs.jobs} == {
        f"batch-completed:{batch_id}"
    }


def test_copies_of_one_item_at_once_count_it_once() -> None:
    batch_id = make_batch(2)
    item = scalar(select(func.min(BatchItem.id)).where(BatchItem.batch_id == batch_id))

    results = run_at_once(lambda: process_item.perform_now(item), copies=4)

    assert sorted(results) == [0, 0, 0, 1]
    assert reload(Batch, batch_id).processed_count == 1

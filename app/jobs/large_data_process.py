"""jobs.large_data_process(dataset_id, cursor=None)."""

from __future__ import annotations

from typing import Annotated

from app.jobs.arguments import RowId
from app.jobs.base import job
from app.jobs.common import DATABASE_UNAVAILABLE, within
from app.jobs.continuable import Step, step
from app.services import datasets


@job(
    "jobs.large_data_process",
    queue_as="low",
    retry_on=[DATABASE_UNAVAILABLE],
    continuable=True,
    max_resumptions=100,
)
def large_data_process(
    dataset_id: RowId, cursor: Annotated[int, within(0, 2**63 - 1)] | None = None
) -> None:
    """Walk the dataset to the end in batches, each committed with its cursor (a checkpoint).

    A warm shutdown stops it after the batch in hand and enqueues it again; a crash resumes it
    after the last committed batch. `cursor` is accepted from messages enqueued before
    continuations and ignored: the dataset's committed cursor decides where to go on, so a
    stale or duplicated message (or a copy under another task id) processes no record twice.
    """
    step("process", lambda s: process_batches(s, dataset_id))


def process_batches(s: Step, dataset_id: int) -> None:
    """The `process` step: one checkpoint per batch until the dataset is completed."""
    while True:
        with s.checkpoint() as session:
            batch = datasets.process_next_batch(session, dataset_id)
            s.advance(batch.cursor)
        if batch.completed:
            return

"""jobs.large_data_process(dataset_id, cursor=None)."""

from __future__ import annotations

from typing import Annotated

from app.db import session_scope
from app.jobs.arguments import RowId
from app.jobs.base import job
from app.jobs.common import DATABASE_UNAVAILABLE, within
from app.services import datasets


@job("jobs.large_data_process", queue_as="low", retry_on=[DATABASE_UNAVAILABLE])
def large_data_process(
    dataset_id: RowId, cursor: Annotated[int, within(0, 2**63 - 1)] | None = None
) -> int:
    """Process the next batch after the committed cursor, then enqueue the next run.

    `cursor` is informational: the dataset's committed cursor decides where to resume, so a
    stale or duplicated message neither skips nor repeats records.
    """
    with session_scope() as session:
        step = datasets.process_next_batch(session, dataset_id)
        if not step.completed:
            large_data_process.delay(dataset_id, step.cursor)  # published after the commit
    return step.cursor

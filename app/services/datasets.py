"""Walking a large dataset in keyset order, one committed batch (with its cursor) at a time."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.models import Dataset, Record
from app.services.errors import NotFound

#: Records processed per transaction (one checkpoint of jobs.large_data_process).
BATCH_SIZE = 1000


class DatasetNotFound(NotFound):
    """The dataset does not exist."""

    def __init__(self, dataset_id: int) -> None:
        super().__init__("dataset", dataset_id)


@dataclass(frozen=True)
class Step:
    """What one `process_next_batch` did."""

    dataset_id: int
    processed: int
    cursor: int
    completed: bool


def process_next_batch(session: Session, dataset_id: int, batch_size: int = BATCH_SIZE) -> Step:
    """Process the records after the dataset's committed cursor and move the cursor past them.

    The cursor lives in the dataset row, locked for the transaction, and commits together with
    the records it covers: a redelivered or duplicated job resumes from it and processes no
    record twice. `id > cursor ORDER BY id LIMIT n` uses the (dataset_id, id) index, so every
    batch costs the same; the guide's OFFSET rescans all earlier rows on each batch.
    """
    dataset = session.scalar(select(Dataset).where(Dataset.id == dataset_id).with_for_update())
    if dataset is None:
        raise DatasetNotFound(dataset_id)
    if dataset.status == "completed":
        return Step(dataset_id, 0, dataset.cursor, completed=True)
    dataset.status = "processing"
    ids = list(
        session.scalars(
            select(Record.id)
            .where(Record.dataset_id == dataset_id, Record.id > dataset.cursor)
            .order_by(Record.id)
            .limit(batch_size)
        )
    )
    now = dt.datetime.now(dt.UTC)
    if ids:
        # No `status = 'pending'` guard: the cursor alone keeps a record from being processed
        # twice, and times_processed shows it (1 for every record of a completed dataset).
        session.execute(
            update(Record)
            .where(Record.dataset_id == dataset_id, Record.id >= ids[0], Record.id <= ids[-1])
            .values(
                status="processed",
                processed_at=now,
                times_processed=Record.times_processed + 1,
            )
        )
        dataset.cursor = ids[-1]
        dataset.processed_count += len(ids)
    if len(ids) < batch_size:
        dataset.status, dataset.completed_at = "completed", now
    session.flush()
    return Step(dataset_id, len(ids), dataset.cursor, dataset.status == "completed")

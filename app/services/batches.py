"""Batches: fanning items out in ranges, processing each item once, completing once."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, select, update
from sqlalchemy.orm import Session

from app.models import Batch, BatchItem
from app.services.errors import NotFound

#: Items one job processes in one transaction.
ITEMS_PER_JOB = 200


class BatchNotFound(NotFound):
    """The batch does not exist."""

    def __init__(self, batch_id: int) -> None:
        super().__init__("batch", batch_id)


class BatchItemNotFound(NotFound):
    """The batch item does not exist."""

    def __init__(self, item_id: int) -> None:
        super().__init__("batch item", item_id)


@dataclass(frozen=True)
class ItemRange:
    """Items `first_id`..`last_id` (inclusive) of a batch, the unit one job processes."""

    batch_id: int
    first_id: int
    last_id: int


@dataclass(frozen=True)
class Progress:
    """A batch's progress after some items finished."""

    batch_id: int
    finished_now: int  # items this call moved out of pending
    processed_count: int
    total_count: int
    status: str


def start_batch(session: Session, batch_id: int) -> bool:
    """Move a pending batch to processing and count its items; False if already started."""
    batch = session.scalar(select(Batch).where(Batch.id == batch_id).with_for_update())
    if batch is None:
        raise BatchNotFound(batch_id)
    if batch.status != "pending":
        return False
    batch.total_count = (
        session.scalar(
            select(func.count()).select_from(BatchItem).where(BatchItem.batch_id == batch_id)
        )
        or 0
    )
    batch.status = "processing"
    session.flush()
    return True


def pending_ranges(
    session: Session, batch_id: int, after_id: int, page_size: int, per_job: int = ITEMS_PER_JOB
) -> tuple[list[ItemRange], int | None]:
    """One page of the batch's pending items after `after_id`, as ranges of `per_job` items.

    Returns the ranges and the id to continue after (None when this was the last page).
    Keyset paging on (batch_id, id): every page costs the same, however deep.
    """
    ids = list(
        session.scalars(
            select(BatchItem.id)
            .where(
                BatchItem.batch_id == batch_id,
                BatchItem.id > after_id,
                BatchItem.status == "pending",
            )
            .order_by(BatchItem.id)
            .limit(page_size)
        )
    )
    ranges = [ItemRange(batch_id, chunk[0], chunk[-1]) for chunk in _chunks(ids, per_job)]
    return ranges, (ids[-1] if len(ids) == page_size else None)


def process_items(session: Session, batch_id: int, first_id: int, last_id: int) -> Progress:
    """Process the batch's pending items in the range, once each, and count them atomically.

    `UPDATE ... WHERE status = 'pending'` makes each item's transition happen once however
    many deliveries run it; the batch's counter grows by exactly the items moved, in the same
    transaction; and only the transaction that brings the count to the total completes it.
    """
    if batch_status(session, batch_id) == "pending":  # an item run before its batch's fan-out
        start_batch(session, batch_id)
    items = session.execute(
        select(BatchItem.id, BatchItem.payload)
        .where(
            BatchItem.batch_id == batch_id,
            BatchItem.id.between(first_id, last_id),
            BatchItem.status == "pending",
        )
        .order_by(BatchItem.id)
        .with_for_update(skip_locked=False)
    ).all()
    now = dt.datetime.now(dt.UTC)
    processed = [item_id for item_id, payload in items if _valid(payload)]
    failed = [item_id for item_id, payload in items if not _valid(payload)]
    if processed:
        session.execute(
            update(BatchItem)
            .where(BatchItem.id.in_(processed))
            .values(status="processed", processed_at=now)
        )
    if failed:
        session.execute(
            update(BatchItem)
            .where(BatchItem.id.in_(failed))
            .values(
                status="failed", processed_at=now, error="payload must be an object with a 'value'"
            )
        )
    finished = len(items)
    batch = session.execute(
        update(Batch)
        .where(Batch.id == batch_id)
        .values(processed_count=Batch.processed_count + finished)
        .returning(Batch.processed_count, Batch.total_count, Batch.status)
    ).one_or_none()
    if batch is None:
        raise BatchNotFound(batch_id)
    count, total, status = batch
    if count >= total and status == "processing":
        completed = session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.status == "processing")
            .values(status="completed", completed_at=now)
            .returning(Batch.status)
        ).scalar_one_or_none()
        status = completed or status
    return Progress(batch_id, finished, count, total, status)


def batch_of_item(session: Session, item_id: int) -> int:
    """The batch an item belongs to."""
    batch_id = session.scalar(select(BatchItem.batch_id).where(BatchItem.id == item_id))
    if batch_id is None:
        raise BatchItemNotFound(item_id)
    return batch_id


def batch_status(session: Session, batch_id: int) -> str:
    """The batch's status."""
    status = session.scalar(select(Batch.status).where(Batch.id == batch_id))
    if status is None:
        raise BatchNotFound(batch_id)
    return status


def _valid(payload: Any) -> bool:
    # The work an item stands for: here, a payload that carries a value.
    return isinstance(payload, dict) and "value" in payload


def _chunks(ids: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


#: Advisory-lock key space of batch fan-outs (keys are this plus the batch id).
FANOUT_LOCK_SPACE = 0x0B47C4 << 32


@contextmanager
def fanout_lock(connection: Connection, batch_id: int) -> Iterator[bool]:
    """Hold the batch's fan-out lock for the block; yields False if another run holds it.

    A session-level advisory lock on a connection of its own, since the fan-out commits
    page by page and publishes between the commits.
    """
    key = FANOUT_LOCK_SPACE + batch_id
    acquired = bool(connection.scalar(select(func.pg_try_advisory_lock(key))))
    connection.commit()
    try:
        yield acquired
    finally:
        if acquired:
            connection.scalar(select(func.pg_advisory_unlock(key)))
            connection.commit()


def fanout_position(session: Session, batch_id: int) -> int | None:
    """Where the batch's fan-out resumes (the last item id enqueued); None when it is done."""
    row = session.execute(
        select(Batch.fanout_cursor, Batch.fanned_out_at).where(Batch.id == batch_id)
    ).one_or_none()
    if row is None:
        raise BatchNotFound(batch_id)
    return None if row.fanned_out_at is not None else int(row.fanout_cursor)


def record_fanout(session: Session, batch_id: int, cursor: int, *, done: bool) -> None:
    """Remember that items up to `cursor` were enqueued (and, if `done`, all of them)."""
    values: dict[str, Any] = {"fanout_cursor": cursor}
    if done:
        values["fanned_out_at"] = dt.datetime.now(dt.UTC)
    session.execute(update(Batch).where(Batch.id == batch_id).values(**values))

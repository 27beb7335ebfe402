"""jobs.batch_process(batch_id), jobs.process_batch_range(...), jobs.process_item(item_id)."""

from __future__ import annotations

from app.db import get_engine, session_scope
from app.jobs.arguments import RowId
from app.jobs.base import job, perform_all_later
from app.jobs.common import DATABASE_UNAVAILABLE
from app.jobs.send_email import send_email
from app.services import batches
from app.services.batches import Progress

#: Items read per fan-out page (each page is one bulk enqueue).
FANOUT_PAGE = 2000


@job("jobs.batch_process", retry_on=[DATABASE_UNAVAILABLE])
def batch_process(batch_id: RowId) -> int:
    """Fan the batch's pending items out as range jobs, page by page; return ranges enqueued.

    Each page is published first and its end recorded after, so a crash in between re-sends
    at most that page (the items are processed once regardless) and never skips one. A batch
    whose fan-out finished, or is running in another job, enqueues nothing.
    """
    with session_scope() as session:
        batches.start_batch(session, batch_id)
        position = batches.fanout_position(session, batch_id)
    if position is None:
        return 0
    enqueued = 0
    with (
        get_engine().connect() as lock_connection,
        batches.fanout_lock(lock_connection, batch_id) as acquired,
    ):
        if not acquired:
            return 0
        with session_scope() as session:  # re-read under the lock: another run may have ended
            after = batches.fanout_position(session, batch_id)
        while after is not None:
            with session_scope() as session:
                ranges, next_after = batches.pending_ranges(session, batch_id, after, FANOUT_PAGE)
            perform_all_later(
                process_batch_range.s(r.batch_id, r.first_id, r.last_id) for r in ranges
            )
            enqueued += len(ranges)
            with session_scope() as session:
                last = ranges[-1].last_id if ranges else after
                batches.record_fanout(session, batch_id, last, done=next_after is None)
            after = next_after
    return enqueued


@job("jobs.process_batch_range", retry_on=[DATABASE_UNAVAILABLE])
def process_batch_range(batch_id: RowId, first_item_id: RowId, last_item_id: RowId) -> int:
    """Process the batch's pending items in the id range; return how many this run finished."""
    with session_scope() as session:
        progress = batches.process_items(session, batch_id, first_item_id, last_item_id)
        _after_progress(progress)
    return progress.finished_now


@job("jobs.process_item", retry_on=[DATABASE_UNAVAILABLE])
def process_item(item_id: RowId) -> int:
    """Process one batch item if it is still pending; return 1 if this run finished it."""
    with session_scope() as session:
        batch_id = batches.batch_of_item(session, item_id)
        progress = batches.process_items(session, batch_id, item_id, item_id)
        _after_progress(progress)
    return progress.finished_now


def _after_progress(progress: Progress) -> None:
    # The completion callback: enqueued (after commit) by every run that finds the batch
    # complete, so a crash right after the completing commit is healed by the redelivery;
    # its key makes it happen once.
    if progress.status == "completed":
        send_email.delay(
            None,
            "batch_completed",
            idempotency_key=f"batch-completed:{progress.batch_id}",
            context={"batch_id": progress.batch_id, "items": progress.total_count},
        )

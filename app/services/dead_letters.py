"""The dead-letter store: jobs that failed for good, kept for an operator.

Retention: the newest 10,000 entries, none older than 180 days (Sidekiq's dead set keeps
10,000 jobs or six months); older ones are pruned whenever an entry is added.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.models import DeadLetter
from app.services.errors import NotFound

MAX_ENTRIES = 10_000
MAX_AGE = dt.timedelta(days=180)


class DeadLetterNotFound(NotFound):
    """No dead letter has that id."""

    def __init__(self, entry_id: int) -> None:
        super().__init__("dead letter", entry_id)


@dataclass(frozen=True)
class Failure:
    """What is known of a job that failed for good."""

    task_id: str
    job_name: str
    queue: str | None
    args: Sequence[Any]
    kwargs: dict[str, Any]
    headers: dict[str, Any]
    reason: str
    error_type: str
    error_message: str
    traceback: str | None
    attempts: int | None
    enqueued_at: dt.datetime | None
    raw_message: str | None = None


def record(session: Session, failure: Failure) -> int:
    """Store the failure and prune past the retention bounds; return its id."""
    entry = DeadLetter(
        task_id=failure.task_id,
        job_name=failure.job_name,
        queue=failure.queue,
        args=list(failure.args),
        kwargs=dict(failure.kwargs),
        headers=dict(failure.headers),
        reason=failure.reason,
        error_type=failure.error_type,
        error_message=failure.error_message[:10_000],
        traceback=failure.traceback,
        attempts=failure.attempts,
        enqueued_at=failure.enqueued_at,
        raw_message=failure.raw_message,
    )
    session.add(entry)
    session.flush()
    prune(session)
    return entry.id


def prune(session: Session, now: dt.datetime | None = None) -> int:
    """Delete entries past the retention bounds; return how many."""
    cutoff = (now or dt.datetime.now(dt.UTC)) - MAX_AGE
    removed = list(
        session.scalars(
            delete(DeadLetter).where(DeadLetter.failed_at < cutoff).returning(DeadLetter.id)
        )
    )
    oldest_kept = session.scalar(
        select(DeadLetter.id).order_by(DeadLetter.id.desc()).offset(MAX_ENTRIES - 1).limit(1)
    )
    if oldest_kept is not None:
        removed += session.scalars(
            delete(DeadLetter).where(DeadLetter.id < oldest_kept).returning(DeadLetter.id)
        )
    return len(removed)


def entries(
    session: Session,
    *,
    limit: int = 50,
    job_name: str | None = None,
    before: int | None = None,
) -> list[DeadLetter]:
    """The newest entries first (those with an id below `before`, for the next page)."""
    query = select(DeadLetter).order_by(DeadLetter.id.desc()).limit(limit)
    if job_name:
        query = query.where(DeadLetter.job_name == job_name)
    if before is not None:
        query = query.where(DeadLetter.id < before)
    return list(session.scalars(query))


def count(session: Session) -> int:
    """How many entries the store holds."""
    return int(session.scalar(select(func.count()).select_from(DeadLetter)) or 0)


def get(session: Session, entry_id: int, *, lock: bool = False) -> DeadLetter:
    """One entry (locked for update if `lock`)."""
    query = select(DeadLetter).where(DeadLetter.id == entry_id)
    entry = session.scalar(query.with_for_update() if lock else query)
    if entry is None:
        raise DeadLetterNotFound(entry_id)
    return entry


def remove(session: Session, entry_id: int) -> DeadLetter:
    """Take an entry out of the store (to retry it or to discard it); return it."""
    entry = get(session, entry_id, lock=True)
    session.delete(entry)
    session.flush()
    return entry

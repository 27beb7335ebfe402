"""Where continuable jobs keep their progress: one `job_continuations` row per task id.

Retention: a finished continuation is kept 7 days (a late duplicate delivery of the job then
runs no step again), an unfinished one 30 days after its last checkpoint (longer than the
longest retry schedule, about three weeks); older rows are pruned whenever a job finishes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, func, or_, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.models import JobContinuation

KEEP_FINISHED = dt.timedelta(days=7)
KEEP_UNFINISHED = dt.timedelta(days=30)
#: Rows deleted per prune, so one finishing job never does a large delete.
PRUNE_BATCH = 500


@dataclass
class Progress:
    """How far one job got: what a continuation loads at the start and saves at checkpoints."""

    task_id: str
    job_name: str
    completed_steps: list[str] = field(default_factory=list)
    current_step: str | None = None
    cursor: Any = None
    resumptions: int = 0
    finished: bool = False

    def copy(self) -> Progress:
        """A copy to restore should a checkpoint's transaction roll back."""
        return Progress(
            self.task_id,
            self.job_name,
            list(self.completed_steps),
            self.current_step,
            self.cursor,
            self.resumptions,
            self.finished,
        )


def load(session: Session, task_id: str) -> Progress | None:
    """The progress saved under `task_id`, or None if the job never checkpointed."""
    row = session.get(JobContinuation, task_id)
    if row is None:
        return None
    return Progress(
        row.task_id,
        row.job_name,
        [str(name) for name in row.completed_steps],
        row.current_step,
        row.cursor,
        row.resumptions,
        row.finished_at is not None,
    )


def save(session: Session, progress: Progress) -> None:
    """Write `progress` in the session's transaction (it commits with the caller's work)."""
    values = {
        "job_name": progress.job_name,
        "completed_steps": progress.completed_steps,
        "current_step": progress.current_step,
        "cursor": progress.cursor,
        "resumptions": progress.resumptions,
        "updated_at": func.now(),
        "finished_at": func.now() if progress.finished else None,
    }
    statement = insert(JobContinuation).values(task_id=progress.task_id, **values)
    session.execute(
        statement.on_conflict_do_update(index_elements=["task_id"], set_=values),
        execution_options={"synchronize_session": False},
    )


def prune(session: Session, now: dt.datetime | None = None) -> int:
    """Delete continuations past their retention (at most PRUNE_BATCH); return how many."""
    now = now or dt.datetime.now(dt.UTC)
    stale = (
        select(JobContinuation.task_id)
        .where(
            # A finished row's updated_at is its finishing time: one index range serves both.
            JobContinuation.updated_at < now - KEEP_FINISHED,
            or_(
                JobContinuation.finished_at.is_not(None),
                JobContinuation.updated_at < now - KEEP_UNFINISHED,
            ),
        )
        .limit(PRUNE_BATCH)
    )
    result = session.execute(
        delete(JobContinuation).where(JobContinuation.task_id.in_(stale)),
        execution_options={"synchronize_session": False},
    )
    return int(getattr(result, "rowcount", 0) or 0)

"""Batches of jobs with callbacks, after Sidekiq Pro's Batch API.

    batch = Batch.create(
        description="nightly re-index",
        on_complete=report_reindex.s(run_id),   # every job has run (succeeded or died)
        on_success=notify_done.s(run_id),       # every job succeeded
        on_death=page_oncall.s(run_id),         # the first job was dead-lettered
    )
    with batch.jobs():                          # jobs enqueued here join the batch
        for shard in shards:
            reindex_shard.delay(shard)

The batch lives in PostgreSQL (`job_batches`, `job_batch_jobs`). Adding jobs follows the
enqueue-after-commit contract: at the end of the `jobs()` block the members are inserted, the
counters raised and the jobs written to the outbox in one transaction (the caller's open
`session_scope`, or one of its own), and published once it commits; a rollback leaves neither
members nor jobs. A job of the batch (the header `job_batch`) marks itself done when it
succeeds, is discarded or expires, and dead when it is dead-lettered, in a transaction whose
guarded update (`status = 'pending'`) counts each member once whatever the redeliveries. The
transaction that brings `pending` to 0 enqueues the callbacks (through the outbox, in that
transaction), under `completed_at IS NULL`-style guards: each fires exactly once, whatever the
crashes, redeliveries, retries and concurrent completions.

Nesting: a batch created while a job of batch P runs (or with `parent=`) is a member of P
(`batch:<id>`). When it completes, its callbacks are enqueued as jobs of P, and it is marked
done in P in the same transaction: P cannot complete before its children's callbacks have run,
so a child's callbacks fire (and run) before its parent's. A child with a dead job counts as
dead in its parent.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery.canvas import Signature
from sqlalchemy import text
from sqlalchemy.orm import Session

from app.celery_app import celery_app
from app.db import open_session, session_scope
from app.models import JobBatch

if TYPE_CHECKING:
    from app.jobs.base import Prepared

logger = logging.getLogger(__name__)

#: The message header naming the batch a job belongs to.
BATCH_HEADER = "job_batch"
#: The header a callback job carries: {"batch": id, "event": "complete"|"success"|"death"}.
CALLBACK_HEADER = "job_batch_callback"
EVENTS = ("complete", "success", "death")


class BatchError(ValueError):
    """A batch that does not exist, or jobs added to one that has completed."""


@dataclass(frozen=True)
class Progress:
    """Where a batch stands."""

    id: int
    parent_id: int | None
    description: str | None
    total: int
    pending: int
    failed: int
    dead: int
    created_at: dt.datetime
    completed_at: dt.datetime | None
    succeeded_at: dt.datetime | None
    died_at: dt.datetime | None
    callbacks: dict[str, str]  # event -> the callback job's name

    @property
    def done(self) -> int:
        return self.total - self.pending


#: The batch whose `jobs()` block is open in this thread or task, and what it collected.
_adding: ContextVar[tuple[int, list[Prepared]] | None] = ContextVar("batch_adding", default=None)
#: The batch of the job running in this process (its children nest under it).
current_batch: ContextVar[int | None] = ContextVar("current_batch", default=None)


class Batch:
    """A handle on one batch (by id)."""

    def __init__(self, batch_id: int) -> None:
        self.id = int(batch_id)

    def __repr__(self) -> str:
        return f"Batch({self.id})"

    @classmethod
    def create(
        cls,
        description: str | None = None,
        *,
        on_complete: Signature | None = None,
        on_success: Signature | None = None,
        on_death: Signature | None = None,
        parent: Batch | int | None = None,
    ) -> Batch:
        """A new, empty batch. Inside a job of another batch it is that batch's child (unless
        `parent` says otherwise); inside an open `session_scope` it is created in that
        transaction."""
        callbacks = {}
        for event, signature in (
            ("complete", on_complete),
            ("success", on_success),
            ("death", on_death),
        ):
            if signature is not None:
                callbacks[event] = _checked_callback(event, signature)
        parent_id = int(parent.id if isinstance(parent, Batch) else parent) if parent else None
        if parent_id is None:
            parent_id = current_batch.get()
        with _scope() as session:
            if parent_id is not None:
                _lock_open(session, parent_id)
            record = JobBatch(description=description, callbacks=callbacks, parent_id=parent_id)
            session.add(record)
            session.flush()
            if parent_id is not None:  # the child is a member of its parent until it completes
                _add_members(session, parent_id, [(f"batch:{record.id}", "batch")])
            return cls(record.id)

    @classmethod
    def current(cls) -> Batch | None:
        """The batch of the job running now (to add jobs to it from inside one of its jobs)."""
        batch_id = current_batch.get()
        return None if batch_id is None else cls(batch_id)

    @contextlib.contextmanager
    def jobs(self) -> Iterator[Batch]:
        """Jobs enqueued (`.delay()`, `apply_async`, `perform_all_later`) inside the block
        join the batch; they are published when the block ends (after the enclosing
        transaction commits, if one is open). An exception in the block adds nothing."""
        if _adding.get() is not None:
            raise BatchError("batch jobs() blocks do not nest; create a child batch instead")
        collected: list[Prepared] = []
        token = _adding.set((self.id, collected))
        try:
            yield self
        finally:
            _adding.reset(token)
        _add_jobs(self.id, collected)

    def progress(self) -> Progress:
        """Total, pending, failed and dead, and when each callback fired."""
        return progress(self.id)


def progress(batch_id: int) -> Progress:
    with session_scope() as session:
        record = session.get(JobBatch, batch_id)
        if record is None:
            raise BatchError(f"no batch {batch_id}")
        return _progress(record)


def recent(limit: int = 20) -> list[Progress]:
    """The newest batches first."""
    with session_scope() as session:
        rows = session.query(JobBatch).order_by(JobBatch.id.desc()).limit(limit).all()
        return [_progress(row) for row in rows]


def _progress(record: JobBatch) -> Progress:
    return Progress(
        id=record.id,
        parent_id=record.parent_id,
        description=record.description,
        total=record.total,
        pending=record.pending,
        failed=record.failed,
        dead=record.dead,
        created_at=record.created_at,
        completed_at=record.completed_at,
        succeeded_at=record.succeeded_at,
        died_at=record.died_at,
        callbacks={event: str(sig.get("task")) for event, sig in record.callbacks.items()},
    )


# Adding jobs -----------------------------------------------------------------------------------


def collecting(prepared: Sequence[Prepared]) -> bool:
    """Called by the job layer for jobs being enqueued: inside a `jobs()` block they join its
    batch (and are published when it ends); False outside one."""
    adding = _adding.get()
    if adding is None:
        return False
    batch_id, collected = adding
    for item in prepared:
        item.options["headers"][BATCH_HEADER] = batch_id
    collected.extend(prepared)
    return True


def _add_jobs(batch_id: int, prepared: list[Prepared]) -> None:
    from app.jobs.base import enqueue_prepared

    with _scope() as session:
        _lock_open(session, batch_id)
        _add_members(session, batch_id, [(p.task_id, p.job.name) for p in prepared])
        if prepared:
            enqueue_prepared(prepared)
        else:  # an empty block: nothing will ever finish, so it is complete now
            _settle_if_done(session, batch_id)


def _lock_open(session: Session, batch_id: int) -> None:
    row = session.execute(
        text("SELECT completed_at FROM job_batches WHERE id = :id FOR UPDATE"), {"id": batch_id}
    ).first()
    if row is None:
        raise BatchError(f"no batch {batch_id}")
    if row.completed_at is not None:
        raise BatchError(f"batch {batch_id} has completed; it takes no more jobs")


def _add_members(session: Session, batch_id: int, members: list[tuple[str, str]]) -> None:
    if not members:
        return
    added: int = session.execute(  # type: ignore[attr-defined]
        text(
            "INSERT INTO job_batch_jobs (batch_id, task_id, job_name) "
            "SELECT :batch, t, j FROM unnest(CAST(:tasks AS text[]), CAST(:jobs AS text[])) "
            "AS m(t, j) ON CONFLICT DO NOTHING"
        ),
        {"batch": batch_id, "tasks": [m[0] for m in members], "jobs": [m[1] for m in members]},
    ).rowcount
    session.execute(
        text("UPDATE job_batches SET total = total + :n, pending = pending + :n WHERE id = :id"),
        {"n": added, "id": batch_id},
    )


# Finishing -------------------------------------------------------------------------------------


def job_finished(batch_id: int, task_id: str, dead: bool = False) -> None:
    """A member job succeeded (or was discarded, or expired), or died: count it once, and
    enqueue the callbacks if it was the last."""
    with _scope() as session:
        _finish_member(session, batch_id, task_id, dead)


def job_failed(batch_id: int, task_id: str) -> None:
    """A member job failed an attempt and will retry: counted in `failed` once."""
    with _scope() as session:
        session.execute(
            text(
                "WITH member AS (UPDATE job_batch_jobs SET failures = failures + 1 "
                "WHERE batch_id = :batch AND task_id = :task AND status = 'pending' "
                "RETURNING failures) "
                "UPDATE job_batches SET failed = failed + 1 WHERE id = :batch "
                "AND (SELECT failures FROM member) = 1"
            ),
            {"batch": batch_id, "task": task_id},
        )


def _finish_member(session: Session, batch_id: int, task_id: str, dead: bool) -> None:
    row = session.execute(
        text(
            "WITH member AS (UPDATE job_batch_jobs SET status = :status "
            "WHERE batch_id = :batch AND task_id = :task AND status = 'pending' "
            "RETURNING failures) "
            "UPDATE job_batches SET pending = pending - 1, dead = dead + :dead, "
            "failed = failed + CASE WHEN :dead = 1 AND (SELECT failures FROM member) = 0 "
            "THEN 1 ELSE 0 END "
            "WHERE id = :batch AND EXISTS (SELECT 1 FROM member) "
            "RETURNING pending, died_at"
        ),
        {
            "batch": batch_id,
            "task": task_id,
            "status": "dead" if dead else "succeeded",
            "dead": 1 if dead else 0,
        },
    ).first()
    if row is None:  # not a member, or counted already (a redelivery)
        return
    if dead and row.died_at is None:
        _fire(session, batch_id, "death", "died_at")
    if row.pending == 0:
        _settle_if_done(session, batch_id)


def _settle_if_done(session: Session, batch_id: int) -> None:
    """The batch has nothing pending: mark it complete (once) and enqueue its callbacks, then
    count it done in its parent."""
    row = session.execute(
        text(
            "UPDATE job_batches SET completed_at = now(), "
            "succeeded_at = CASE WHEN dead = 0 THEN now() END "
            "WHERE id = :id AND pending = 0 AND completed_at IS NULL "
            "RETURNING dead, parent_id, callbacks"
        ),
        {"id": batch_id},
    ).first()
    if row is None:
        return
    events = ["complete"] + (["success"] if row.dead == 0 else [])
    signatures = [(e, row.callbacks[e]) for e in events if e in row.callbacks]
    logger.info(
        "batch %d complete (%s); enqueueing %s",
        batch_id,
        "every job succeeded" if row.dead == 0 else f"{row.dead} dead",
        ", ".join(f"on_{e}" for e, _ in signatures) or "no callbacks",
        extra={"event": "batch_complete", "batch_id": batch_id},
    )
    _enqueue_callbacks(session, batch_id, row.parent_id, signatures)
    if row.parent_id is not None:
        _finish_member(session, row.parent_id, f"batch:{batch_id}", dead=row.dead > 0)


def _fire(session: Session, batch_id: int, event: str, column: str) -> None:
    row = session.execute(
        text(
            f"UPDATE job_batches SET {column} = now() WHERE id = :id AND {column} IS NULL "
            "RETURNING parent_id, callbacks"
        ),
        {"id": batch_id},
    ).first()
    if row is None:
        return
    logger.warning(
        "batch %d: a job died; enqueueing %s",
        batch_id,
        "on_death" if event in row.callbacks else "no callback",
        extra={"event": "batch_death", "batch_id": batch_id},
    )
    if event in row.callbacks:
        _enqueue_callbacks(session, batch_id, row.parent_id, [(event, row.callbacks[event])])


def _enqueue_callbacks(
    session: Session, batch_id: int, parent_id: int | None, signatures: list[tuple[str, Any]]
) -> None:
    """Enqueue callbacks in this transaction (the outbox); in a child batch, as jobs of its
    parent, so that the parent completes only after they ran."""
    from app.jobs.base import Job, enqueue_prepared

    prepared = []
    for event, data in signatures:
        signature = Signature.from_dict(data, app=celery_app)
        job = celery_app.tasks.get(signature.task)
        if not isinstance(job, Job):
            logger.error("batch %d: on_%s names no job: %r", batch_id, event, signature.task)
            continue
        headers: dict[str, Any] = {CALLBACK_HEADER: {"batch": batch_id, "event": event}}
        if parent_id is not None:
            headers[BATCH_HEADER] = parent_id
        options = {k: v for k, v in (signature.options or {}).items() if k != "headers"}
        item = job.prepare(
            signature.args,
            signature.kwargs,
            task_id=f"batch-{batch_id}-{event}",
            headers=headers,
            **options,
        )
        prepared.append(item)
    if parent_id is not None and prepared:
        _add_members(session, parent_id, [(p.task_id, p.job.name) for p in prepared])
    if prepared:
        enqueue_prepared(prepared)


def _checked_callback(event: str, signature: Any) -> dict[str, Any]:
    from app.jobs.base import Job

    if not isinstance(signature, Signature):
        raise BatchError(f"on_{event} must be a job signature (job.s(...)), got {signature!r}")
    job = celery_app.tasks.get(signature.task)
    if not isinstance(job, Job):
        raise BatchError(f"on_{event} must name a job, got {signature.task!r}")
    job.prepare(signature.args, signature.kwargs)  # a bad call fails here, not at the end
    return dict(signature)


@contextlib.contextmanager
def _scope() -> Iterator[Session]:
    """The caller's open `session_scope`, or a new one."""
    session = open_session()
    if session is not None:
        yield session
        return
    with session_scope() as own:
        yield own

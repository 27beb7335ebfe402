"""Job batches (app/jobs/batches.py): a set of jobs with callbacks, and its members."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, created_at, one_of, primary_key

MEMBER_STATUSES = ("pending", "succeeded", "dead")


class JobBatch(Base):
    """A batch of jobs. `pending` counts members that have neither succeeded nor died; the
    transaction that brings it to 0 enqueues the callbacks, once (the `*_at` columns)."""

    __tablename__ = "job_batches"
    __table_args__ = (
        CheckConstraint("pending >= 0", name="pending_not_negative"),
        CheckConstraint("pending <= total", name="pending_within_total"),
        Index("ix_job_batches_parent_id", "parent_id"),
    )

    id: Mapped[int] = primary_key()
    #: The batch this one is a member of (a batch created inside a batch's job).
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("job_batches.id"))
    description: Mapped[str | None] = mapped_column(String(255))
    #: {"complete"|"success"|"death": a job signature as a dict}.
    callbacks: Mapped[dict[str, Any]] = mapped_column(default=dict)
    total: Mapped[int] = mapped_column(default=0, server_default="0")
    pending: Mapped[int] = mapped_column(default=0, server_default="0")
    #: Members that failed at least once (retrying, or dead).
    failed: Mapped[int] = mapped_column(default=0, server_default="0")
    dead: Mapped[int] = mapped_column(default=0, server_default="0")
    created_at: Mapped[dt.datetime] = created_at()
    #: When every member had run (on_complete enqueued), every member succeeded (on_success),
    #: and the first member died (on_death).
    completed_at: Mapped[dt.datetime | None]
    succeeded_at: Mapped[dt.datetime | None]
    died_at: Mapped[dt.datetime | None]


class JobBatchJob(Base):
    """A member of a batch: a job (its task id), or a child batch (`batch:<id>`)."""

    __tablename__ = "job_batch_jobs"
    __table_args__ = (one_of("status", MEMBER_STATUSES),)

    batch_id: Mapped[int] = mapped_column(
        ForeignKey("job_batches.id", ondelete="CASCADE"), primary_key=True
    )
    task_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    job_name: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), default="pending", server_default="pending")
    failures: Mapped[int] = mapped_column(default=0, server_default="0")

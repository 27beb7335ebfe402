"""Continuations: how far a continuable job got, so a stopped or crashed run resumes there."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import CheckConstraint, Index, String, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base


class JobContinuation(Base):
    """The progress of one job (its task id, which retries and requeues keep): the steps it
    completed, the step it is in and that step's cursor, and how often it was requeued."""

    __tablename__ = "job_continuations"
    __table_args__ = (
        CheckConstraint("resumptions >= 0", name="resumptions_not_negative"),
        Index(None, "updated_at"),  # pruning
    )

    task_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    job_name: Mapped[str] = mapped_column(String(255))
    completed_steps: Mapped[list[Any]] = mapped_column(default=list, server_default="[]")
    current_step: Mapped[str | None] = mapped_column(String(255))
    #: Any JSON value the step chose; NULL before its first checkpoint.
    cursor: Mapped[Any] = mapped_column(JSONB(none_as_null=True), nullable=True)
    #: Times the job stopped at a checkpoint (a warm shutdown) and was enqueued again.
    resumptions: Mapped[int] = mapped_column(default=0, server_default="0")
    updated_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())
    #: Set when the job's body returned: a later delivery of the same task id runs no step.
    finished_at: Mapped[dt.datetime | None]

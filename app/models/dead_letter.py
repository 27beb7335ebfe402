"""Dead letters: jobs that failed for good, kept for an operator to inspect, retry or discard."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Index, String, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, one_of, primary_key

#: exhausted, unhandled and time_limit are jobs that ran; malformed is a message that could not
#: become a job; poison is one whose deliveries kept killing the worker that held it.
DEAD_LETTER_REASONS = ("exhausted", "unhandled", "time_limit", "malformed", "poison")


class DeadLetter(Base):
    """A job that failed for good, or a message that could not run (see DEAD_LETTER_REASONS)."""

    __tablename__ = "dead_letters"
    __table_args__ = (
        one_of("reason", DEAD_LETTER_REASONS),
        Index(None, "failed_at"),
        # The web view's Dead page filtered by job, newest first, a page at a time.
        Index(None, "job_name", "id"),
    )

    id: Mapped[int] = primary_key()
    task_id: Mapped[str] = mapped_column(String(255))
    job_name: Mapped[str] = mapped_column(String(255))
    queue: Mapped[str | None] = mapped_column(String(64))
    args: Mapped[list[Any]]
    kwargs: Mapped[dict[str, Any]]
    headers: Mapped[dict[str, Any]]  # the job layer's (attempt counts), to see how it got here
    reason: Mapped[str] = mapped_column(String(16))
    error_type: Mapped[str] = mapped_column(String(255))
    error_message: Mapped[str] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int | None]
    enqueued_at: Mapped[dt.datetime | None]
    failed_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())
    #: The message as the broker held it (truncated), for messages that never became a job.
    raw_message: Mapped[str | None] = mapped_column(Text)

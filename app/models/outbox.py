"""The transactional outbox: jobs enqueued inside a transaction, written in that transaction."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import String, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, primary_key


class OutboxMessage(Base):
    """A job enqueued in a committed transaction and not yet known to be published.

    The enqueuing process publishes and deletes its rows right after the commit; the relay in
    every worker publishes whatever that left (the broker was down, the process died).
    """

    __tablename__ = "outbox_messages"

    id: Mapped[int] = primary_key()  # publishing order: a producer's commit order
    task_id: Mapped[str] = mapped_column(String(255))
    job_name: Mapped[str] = mapped_column(String(255))
    #: kombu's JSON of {"args", "kwargs", "options"}: what `apply_async` was given, with a
    #: countdown turned into its eta at enqueue time.
    payload: Mapped[str] = mapped_column(Text)
    #: When the row was written (clock_timestamp: the insert, not the transaction's start).
    created_at: Mapped[dt.datetime] = mapped_column(server_default=func.clock_timestamp())

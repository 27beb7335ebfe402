"""Batches of items processed together, with their progress."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, Index, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, created_at, one_of, primary_key

BATCH_STATUSES = ("pending", "processing", "completed", "failed")
BATCH_ITEM_STATUSES = ("pending", "processed", "failed")


class Batch(Base):
    """A batch; `processed_count` never exceeds `total_count`."""

    __tablename__ = "batches"
    __table_args__ = (
        one_of("status", BATCH_STATUSES),
        CheckConstraint("total_count >= 0", name="total_count_not_negative"),
        CheckConstraint(
            "processed_count >= 0 AND processed_count <= total_count",
            name="processed_count_in_range",
        ),
    )

    id: Mapped[int] = primary_key()
    total_count: Mapped[int] = mapped_column(default=0, server_default="0")
    processed_count: Mapped[int] = mapped_column(default=0, server_default="0")
    status: Mapped[str] = mapped_column(default="pending", server_default="pending")
    # Fan-out progress: the last item id whose range was enqueued, and when all were.
    fanout_cursor: Mapped[int] = mapped_column(default=0, server_default="0")
    fanned_out_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime] = created_at()
    completed_at: Mapped[dt.datetime | None]


class BatchItem(Base):
    """One item of a batch; the job pages through them by (batch_id, id)."""

    __tablename__ = "batch_items"
    __table_args__ = (
        one_of("status", BATCH_ITEM_STATUSES),
        Index(None, "batch_id", "id"),
    )

    id: Mapped[int] = primary_key()
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(default="pending", server_default="pending")
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")
    error: Mapped[str | None] = mapped_column(Text)
    processed_at: Mapped[dt.datetime | None]

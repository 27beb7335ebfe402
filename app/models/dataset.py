"""Datasets and their records, for the large-data job that walks them by keyset."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, created_at, one_of, primary_key

DATASET_STATUSES = ("pending", "processing", "completed", "failed")
RECORD_STATUSES = ("pending", "processed")


class Dataset(Base):
    """A dataset; `cursor` is the last record id processed, so a resumed job continues there."""

    __tablename__ = "datasets"
    __table_args__ = (
        one_of("status", DATASET_STATUSES),
        CheckConstraint("cursor >= 0", name="cursor_not_negative"),
        CheckConstraint("processed_count >= 0", name="processed_count_not_negative"),
    )

    id: Mapped[int] = primary_key()
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(default="pending", server_default="pending")
    cursor: Mapped[int] = mapped_column(default=0, server_default="0")
    processed_count: Mapped[int] = mapped_column(default=0, server_default="0")
    created_at: Mapped[dt.datetime] = created_at()
    completed_at: Mapped[dt.datetime | None]


class Record(Base):
    """One record of a dataset."""

    __tablename__ = "records"
    __table_args__ = (
        one_of("status", RECORD_STATUSES),
        CheckConstraint("times_processed >= 0", name="times_processed_not_negative"),
        Index(None, "dataset_id", "id"),  # keyset paging: WHERE dataset_id = ? AND id > ?
    )

    id: Mapped[int] = primary_key()
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(default="pending", server_default="pending")
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")
    processed_at: Mapped[dt.datetime | None]
    #: How many times a run processed the record: 1 once done, whatever crashed or stopped.
    times_processed: Mapped[int] = mapped_column(default=0, server_default="0")

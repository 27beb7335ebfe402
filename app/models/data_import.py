"""Imports of rows from an outside source."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import CheckConstraint, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, created_at, one_of, primary_key

IMPORT_STATUSES = ("pending", "processing", "completed", "failed")


class Import(Base):
    """An import and its counters; `rows_seen` is also where a resumed import picks up."""

    __tablename__ = "imports"
    __table_args__ = (
        one_of("status", IMPORT_STATUSES),
        CheckConstraint(
            "rows_seen >= 0 AND rows_imported >= 0 AND rows_rejected >= 0"
            " AND rows_imported + rows_rejected <= rows_seen",
            name="row_counts_consistent",
        ),
    )

    id: Mapped[int] = primary_key()
    status: Mapped[str] = mapped_column(default="pending", server_default="pending")
    source: Mapped[str] = mapped_column(Text)
    rows_seen: Mapped[int] = mapped_column(default=0, server_default="0")
    rows_imported: Mapped[int] = mapped_column(default=0, server_default="0")
    rows_rejected: Mapped[int] = mapped_column(default=0, server_default="0")
    errors: Mapped[list[Any]] = mapped_column(default=list, server_default="[]")
    created_at: Mapped[dt.datetime] = created_at()
    completed_at: Mapped[dt.datetime | None]

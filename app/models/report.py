"""Reports, such as the daily report; one per date and type."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, created_at, one_of, primary_key

REPORT_TYPES = ("daily",)


class Report(Base):
    """A report's figures; the unique (date, type) makes a second run for the day a no-op."""

    __tablename__ = "reports"
    __table_args__ = (
        UniqueConstraint("date", "type"),
        one_of("type", REPORT_TYPES),
    )

    id: Mapped[int] = primary_key()
    date: Mapped[dt.date]
    # `type` as Rails names the column; `report_type` in Python to keep the builtin free.
    report_type: Mapped[str] = mapped_column("type", String(32))
    data: Mapped[dict[str, Any]]
    created_at: Mapped[dt.datetime] = created_at()

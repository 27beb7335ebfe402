"""Email deliveries: one row per email the service decided to send."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, created_at, one_of, primary_key

DELIVERY_STATUSES = ("pending", "sent", "failed")


class EmailDelivery(Base):
    """An email to a user, recorded under a unique key so a redelivered job sends nothing twice."""

    __tablename__ = "email_deliveries"
    __table_args__ = (
        one_of("status", DELIVERY_STATUSES),
        Index(None, "user_id"),
    )

    id: Mapped[int] = primary_key()
    # A user's email, or (user_id NULL) one to configured addresses, such as the daily report.
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    recipient: Mapped[str] = mapped_column(Text)  # the address(es) it goes to, comma-separated
    email_type: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    status: Mapped[str] = mapped_column(default="pending", server_default="pending")
    sent_at: Mapped[dt.datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = created_at()

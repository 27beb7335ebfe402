"""Payments charged through the gateway."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

from sqlalchemy import CheckConstraint, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, created_at, one_of, primary_key

PAYMENT_STATUSES = ("pending", "succeeded", "insufficient_funds", "card_expired", "failed")


def _new_idempotency_key() -> str:
    return uuid.uuid4().hex


class Payment(Base):
    """A charge for an order; the gateway sees `idempotency_key`, so a retry never charges twice."""

    __tablename__ = "payments"
    __table_args__ = (
        one_of("status", PAYMENT_STATUSES),
        CheckConstraint("amount > 0", name="amount_positive"),
        Index(None, "order_id"),
    )

    id: Mapped[int] = primary_key()
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"))
    amount: Mapped[Decimal]
    status: Mapped[str] = mapped_column(default="pending", server_default="pending")
    card_token: Mapped[str] = mapped_column(String(200))
    idempotency_key: Mapped[str] = mapped_column(
        String(200), unique=True, default=_new_idempotency_key
    )
    gateway_charge_id: Mapped[str | None] = mapped_column(String(200), unique=True)
    created_at: Mapped[dt.datetime] = created_at()
    processed_at: Mapped[dt.datetime | None]

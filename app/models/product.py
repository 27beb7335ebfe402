"""Products and their inventory audit trail (one aggregate: stock changes go through it)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from sqlalchemy import CheckConstraint, ForeignKey, Index, String, func
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, created_at, primary_key


class Product(Base):
    """A product with its stock level; the database refuses negative stock."""

    __tablename__ = "products"
    __table_args__ = (
        CheckConstraint("inventory >= 0", name="inventory_not_negative"),
        CheckConstraint("price >= 0", name="price_not_negative"),
    )

    id: Mapped[int] = primary_key()
    sku: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    inventory: Mapped[int] = mapped_column(default=0, server_default="0")
    price: Mapped[Decimal]
    created_at: Mapped[dt.datetime] = created_at()


class InventoryAudit(Base):
    """One applied stock change; its unique idempotency key makes a redelivery a no-op."""

    __tablename__ = "inventory_audits"
    __table_args__ = (
        CheckConstraint("change <> 0", name="change_not_zero"),
        Index(None, "product_id"),
    )

    id: Mapped[int] = primary_key()
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    change: Mapped[int]
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    processed_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())

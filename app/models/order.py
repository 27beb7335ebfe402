"""Orders and their items."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from sqlalchemy import CheckConstraint, ForeignKey, Index, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.models.base import Base, created_at, one_of, primary_key

ORDER_STATUSES = ("pending", "processed", "failed")


class Order(Base):
    """A customer's order; `process_order` moves it from pending to processed or failed."""

    __tablename__ = "orders"
    __table_args__ = (
        one_of("status", ORDER_STATUSES),
        CheckConstraint("total >= 0", name="total_not_negative"),
        CheckConstraint(
            "(status = 'processed') = (processed_at IS NOT NULL)", name="processed_at_iff_processed"
        ),
        Index(None, "created_at"),  # the daily report sums orders by day
        Index(None, "user_id"),
    )

    id: Mapped[int] = primary_key()
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    status: Mapped[str] = mapped_column(default="pending", server_default="pending")
    total: Mapped[Decimal] = mapped_column(default=Decimal("0"), server_default="0")
    created_at: Mapped[dt.datetime] = created_at()
    processed_at: Mapped[dt.datetime | None]
    failure_reason: Mapped[str | None] = mapped_column(Text)

    items: Mapped[list[OrderItem]] = relationship(
        back_populates="order", cascade="all, delete-orphan", order_by="OrderItem.id"
    )


class OrderItem(Base):
    """A line of an order: a product, a quantity and the unit price at the time of ordering."""

    __tablename__ = "order_items"
    __table_args__ = (
        CheckConstraint("quantity > 0", name="quantity_positive"),
        CheckConstraint("unit_price >= 0", name="unit_price_not_negative"),
        Index(None, "order_id"),
        Index(None, "product_id"),
    )

    id: Mapped[int] = primary_key()
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id", ondelete="CASCADE"))
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    quantity: Mapped[int]
    unit_price: Mapped[Decimal]

    order: Mapped[Order] = relationship(back_populates="items")

"""Processing an order: reserve every item's stock or none, total it, mark it processed."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from app.models import InventoryAudit, Order, Product, User
from app.services.errors import NotFound


class OrderNotFound(NotFound):
    """The order does not exist, or its producer has not committed it yet."""

    def __init__(self, order_id: int) -> None:
        super().__init__("order", order_id)


@dataclass(frozen=True)
class OrderOutcome:
    """Where the order stands after `process_order`."""

    order_id: int
    user_id: int
    status: str
    total: Decimal
    failure_reason: str | None
    changed: bool  # False: it was not pending, nothing was done


def is_premium_order(session: Session, order_id: int) -> bool:
    """Whether the order belongs to a premium customer (False if it cannot be found)."""
    premium = session.scalar(
        select(User.premium).join(Order, Order.user_id == User.id).where(Order.id == order_id)
    )
    return bool(premium)


def process_order(session: Session, order_id: int) -> OrderOutcome:
    """Reserve the order's stock (all items or none), total it and mark it processed.

    The order row is locked, so two deliveries of the same job run one after the other and
    the second finds the order no longer pending. Products are locked in id order, so two
    orders sharing products cannot deadlock.
    """
    order = session.scalar(
        select(Order)
        .where(Order.id == order_id)
        .options(selectinload(Order.items))
        .with_for_update(of=Order)
    )
    if order is None:
        raise OrderNotFound(order_id)
    if order.status != "pending":
        return _outcome(order, changed=False)
    if not order.items:
        return _fail(order, "the order has no items")

    wanted: dict[int, int] = {}
    for item in order.items:
        wanted[item.product_id] = wanted.get(item.product_id, 0) + item.quantity
    products = {
        p.id: p
        for p in session.scalars(
            select(Product)
            .where(Product.id.in_(sorted(wanted)))
            .order_by(Product.id)
            .with_for_update()
        )
    }
    shortages = [
        f"{products[pid].sku} (wanted {qty}, {products[pid].inventory} in stock)"
        for pid, qty in sorted(wanted.items())
        if products[pid].inventory < qty
    ]
    if shortages:
        return _fail(order, "insufficient stock: " + ", ".join(shortages))

    for item in order.items:
        # One audit row per item, keyed by it: the reservation is recorded once.
        session.add(
            InventoryAudit(
                product_id=item.product_id,
                change=-item.quantity,
                idempotency_key=f"order-item:{item.id}",
            )
        )
    for pid, qty in wanted.items():
        products[pid].inventory -= qty
    order.total = sum((item.unit_price * item.quantity for item in order.items), Decimal("0"))
    order.status = "processed"
    order.processed_at = dt.datetime.now(dt.UTC)
    session.flush()
    return _outcome(order, changed=True)


def _fail(order: Order, reason: str) -> OrderOutcome:
    order.status = "failed"
    order.failure_reason = reason
    return _outcome(order, changed=True)


def _outcome(order: Order, *, changed: bool) -> OrderOutcome:
    return OrderOutcome(
        order.id, order.user_id, order.status, order.total, order.failure_reason, changed
    )

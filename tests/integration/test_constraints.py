"""The invariants the jobs rely on are enforced by the database, not by the code in front of it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from decimal import Decimal

import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import session_scope
from app.models import (
    Batch,
    EmailDelivery,
    InventoryAudit,
    Order,
    OrderItem,
    Payment,
    Product,
    Report,
    User,
)
from tests.integration.conftest import Services


def seed(session: Session) -> tuple[User, Product, Order]:
    user = User(email="ada@example.com")
    product = Product(sku="SKU-1", name="Widget", inventory=5, price=Decimal("2.50"))
    session.add_all([user, product])
    session.flush()
    order = Order(
        user_id=user.id,
        items=[OrderItem(product_id=product.id, quantity=1, unit_price=Decimal("2.50"))],
    )
    session.add(order)
    session.flush()
    return user, product, order


def violates(change: Callable[[Session, User, Product, Order], None]) -> str:
    """Apply `change` after seeding; return the name of the constraint the database cites."""
    with pytest.raises(IntegrityError) as caught, session_scope() as session:
        user, product, order = seed(session)
        change(session, user, product, order)
        session.flush()
    diag = getattr(caught.value.orig, "diag", None)
    return str(getattr(diag, "constraint_name", ""))


CASES: dict[str, tuple[Callable[[Session, User, Product, Order], None], str]] = {
    "inventory never below zero": (
        lambda s, u, p, o: setattr(p, "inventory", -1),
        "ck_products_inventory_not_negative",
    ),
    "sku is unique": (
        lambda s, u, p, o: s.add(Product(sku="SKU-1", name="Copy", price=Decimal(1))),
        "uq_products_sku",
    ),
    "order status is a known one": (
        lambda s, u, p, o: setattr(o, "status", "shipped"),
        "ck_orders_status_known",
    ),
    "a processed order has processed_at": (
        lambda s, u, p, o: setattr(o, "status", "processed"),
        "ck_orders_processed_at_iff_processed",
    ),
    "an order belongs to an existing user": (
        lambda s, u, p, o: s.add(Order(user_id=u.id + 1000)),
        "fk_orders_user_id_users",
    ),
    "item quantity is positive": (
        lambda s, u, p, o: s.add(
            OrderItem(order_id=o.id, product_id=p.id, quantity=0, unit_price=Decimal(1))
        ),
        "ck_order_items_quantity_positive",
    ),
    "an inventory change is applied once per key": (
        lambda s, u, p, o: s.add_all(
            [
                InventoryAudit(product_id=p.id, change=1, idempotency_key="k"),
                InventoryAudit(product_id=p.id, change=1, idempotency_key="k"),
            ]
        ),
        "uq_inventory_audits_idempotency_key",
    ),
    "payment status is a known one": (
        lambda s, u, p, o: s.add(
            Payment(order_id=o.id, amount=Decimal(1), card_token="tok", status="maybe")
        ),
        "ck_payments_status_known",
    ),
    "an email is delivered once per key": (
        lambda s, u, p, o: s.add_all(
            [
                EmailDelivery(
                    user_id=u.id,
                    email_type="order_confirmation",
                    idempotency_key="e",
                    recipient="a@b.c",
                ),
                EmailDelivery(
                    user_id=u.id,
                    email_type="order_confirmation",
                    idempotency_key="e",
                    recipient="a@b.c",
                ),
            ]
        ),
        "uq_email_deliveries_idempotency_key",
    ),
    "a batch never counts more than its total": (
        lambda s, u, p, o: s.add(Batch(total_count=2, processed_count=3)),
        "ck_batches_processed_count_in_range",
    ),
    "one report per date and type": (
        lambda s, u, p, o: s.add_all(
            [
                Report(date=dt.date(2026, 1, 1), report_type="daily", data={}),
                Report(date=dt.date(2026, 1, 1), report_type="daily", data={}),
            ]
        ),
        "uq_reports_date_type",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_database_refuses(case: str, services: Services) -> None:
    change, constraint = CASES[case]
    assert violates(change) == constraint


def test_a_valid_aggregate_is_accepted(services: Services) -> None:
    with session_scope() as session:
        _, product, order = seed(session)
        order_id, product_id = order.id, product.id
    with session_scope() as session:
        stored = session.get(Order, order_id)
        assert stored is not None
        assert stored.status == "pending"
        assert [item.product_id for item in stored.items] == [product_id]

"""Rows the integration tests start from, each made and committed in one call."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any, TypeVar

from sqlalchemy import insert, select

from app.db import session_scope
from app.models import (
    Batch,
    BatchItem,
    Dataset,
    Order,
    OrderItem,
    Payment,
    Product,
    Record,
    User,
)

T = TypeVar("T")
_serial = itertools.count(1)


def make_user(*, premium: bool = False, email: str | None = None) -> int:
    with session_scope() as session:
        user = User(email=email or f"user{next(_serial)}@example.com", premium=premium)
        session.add(user)
        session.flush()
        return user.id


def make_product(*, inventory: int = 10, price: str = "2.50", sku: str | None = None) -> int:
    with session_scope() as session:
        product = Product(
            sku=sku or f"SKU-{next(_serial)}",
            name="Widget",
            inventory=inventory,
            price=Decimal(price),
        )
        session.add(product)
        session.flush()
        return product.id


def make_order(user_id: int, items: Sequence[tuple[int, int, str]]) -> int:
    """An order of (product_id, quantity, unit_price) items."""
    with session_scope() as session:
        order = Order(
            user_id=user_id,
            items=[OrderItem(product_id=p, quantity=q, unit_price=Decimal(u)) for p, q, u in items],
        )
        session.add(order)
        session.flush()
        return order.id


def make_payment(*, card_token: str = "tok_ok", amount: str = "12.50") -> int:
    user_id = make_user()
    order_id = make_order(user_id, [(make_product(), 1, amount)])
    with session_scope() as session:
        payment = Payment(order_id=order_id, amount=Decimal(amount), card_token=card_token)
        session.add(payment)
        session.flush()
        return payment.id


def make_batch(items: int, *, invalid_every: int = 0) -> int:
    """A pending batch of `items` items; every `invalid_every`-th has a payload that fails."""
    with session_scope() as session:
        batch = Batch()
        session.add(batch)
        session.flush()
        rows = [
            {
                "batch_id": batch.id,
                "payload": {"bad": i} if invalid_every and i % invalid_every == 0 else {"value": i},
            }
            for i in range(1, items + 1)
        ]
        for start in range(0, len(rows), 5000):
            session.execute(insert(BatchItem), rows[start : start + 5000])
        return batch.id


def make_dataset(records: int) -> int:
    with session_scope() as session:
        dataset = Dataset(name=f"dataset-{next(_serial)}")
        session.add(dataset)
        session.flush()
        rows = [{"dataset_id": dataset.id, "payload": {"n": i}} for i in range(records)]
        for start in range(0, len(rows), 5000):
            session.execute(insert(Record), rows[start : start + 5000])
        return dataset.id


def reload(model: type[T], row_id: int) -> T:
    with session_scope() as session:
        row = session.get(model, row_id)
        assert row is not None, f"{model.__name__} {row_id} is gone"
        return row


def count(statement: Any) -> int:
    with session_scope() as session:
        return len(session.execute(statement).all())


def scalar(statement: Any) -> Any:
    with session_scope() as session:
        return session.scalar(statement)


def wait_until(condition: Callable[[], Any], timeout: float = 60.0, every: float = 0.1) -> Any:
    """Poll `condition` until it is truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(every)


__all__ = ["select"]

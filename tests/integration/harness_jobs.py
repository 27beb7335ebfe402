"""Jobs that exist only to exercise the harness (the service's own jobs come with their issue)."""

from __future__ import annotations

from decimal import Decimal

from app import celery
from app.db import session_scope
from app.models import Product


class Boom(RuntimeError):
    """Raised on purpose after a write, to show the scope rolls it back."""


@celery.task(name="tests.create_product")
def create_product(sku: str, inventory: int, fail_after_write: bool = False) -> int:
    """Insert a product in one transaction; optionally fail after the insert."""
    with session_scope() as session:
        product = Product(sku=sku, name=sku.title(), inventory=inventory, price=Decimal("1.00"))
        session.add(product)
        session.flush()
        if fail_after_write:
            raise Boom(f"failing after writing {sku}")
        return product.id

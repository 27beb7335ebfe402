"""Stock changes: each applied once per idempotency key, never below zero."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.models import InventoryAudit, Product
from app.services.errors import DomainError, NotFound


class ProductNotFound(NotFound):
    """The product does not exist."""

    def __init__(self, product_id: int) -> None:
        super().__init__("product", product_id)


class InsufficientInventory(DomainError):
    """The change would take the product's stock below zero."""

    def __init__(self, product_id: int, change: int, available: int) -> None:
        self.product_id, self.change, self.available = product_id, change, available
        super().__init__(
            f"product {product_id} has {available} in stock; a change of {change} would "
            f"leave {available + change}"
        )


class IdempotencyKeyReused(DomainError):
    """The key was already used for a different change."""


@dataclass(frozen=True)
class InventoryChange:
    """What `change_inventory` did."""

    product_id: int
    applied: bool  # False: this key had been applied before, nothing changed
    inventory: int


def lock_product(session: Session, product_id: int) -> Product:
    """The product, locked FOR UPDATE until the transaction ends."""
    product = session.scalar(select(Product).where(Product.id == product_id).with_for_update())
    if product is None:
        raise ProductNotFound(product_id)
    return product


def change_inventory(
    session: Session, product_id: int, change: int, idempotency_key: str
) -> InventoryChange:
    """Apply `change` to the product's stock once per key, with its audit row."""
    product = lock_product(session, product_id)  # serialises changes to one product
    recorded = session.scalar(
        insert(InventoryAudit)
        .values(product_id=product_id, change=change, idempotency_key=idempotency_key)
        .on_conflict_do_nothing(index_elements=["idempotency_key"])
        .returning(InventoryAudit.id)
    )
    if recorded is None:  # a redelivery: the key is already in the audit trail
        earlier = session.scalar(
            select(InventoryAudit).where(InventoryAudit.idempotency_key == idempotency_key)
        )
        if earlier is not None and (earlier.product_id, earlier.change) != (product_id, change):
            raise IdempotencyKeyReused(
                f"idempotency key {idempotency_key!r} was used for a change of "
                f"{earlier.change} to product {earlier.product_id}"
            )
        return InventoryChange(product_id, applied=False, inventory=product.inventory)
    if product.inventory + change < 0:
        raise InsufficientInventory(product_id, change, product.inventory)
    product.inventory += change
    session.flush()
    return InventoryChange(product_id, applied=True, inventory=product.inventory)

"""jobs.update_inventory(product_id, quantity_change, idempotency_key=None)."""

from __future__ import annotations

from typing import Annotated, Any

from app.db import session_scope
from app.jobs.arguments import RowId
from app.jobs.base import job
from app.jobs.common import DATABASE_UNAVAILABLE, IdempotencyKey, nonzero, within
from app.jobs.policies import RetryOn
from app.services import inventory

#: The largest single stock change accepted; anything bigger is a producer's bug.
MAX_CHANGE = 1_000_000

QuantityChange = Annotated[int, nonzero, within(-MAX_CHANGE, MAX_CHANGE)]


@job(
    "jobs.update_inventory",
    bind=True,
    retry_on=[RetryOn(inventory.ProductNotFound, wait=5, attempts=3), DATABASE_UNAVAILABLE],
)
def update_inventory(
    self: Any,
    product_id: RowId,
    quantity_change: QuantityChange,
    idempotency_key: IdempotencyKey | None = None,
) -> int:
    """Apply a stock change once per key (the task id by default, kept across retries).

    Raises InsufficientInventory (the job fails, nothing changes) rather than clamping.
    """
    key = idempotency_key or f"task:{self.request.id}"
    with session_scope() as session:
        change = inventory.change_inventory(session, product_id, quantity_change, key)
    return change.inventory

"""jobs.process_order(order_id)."""

from __future__ import annotations

import logging

from sqlalchemy.exc import SQLAlchemyError

from app.db import session_scope
from app.jobs.arguments import RowId
from app.jobs.base import job
from app.jobs.common import DATABASE_UNAVAILABLE
from app.jobs.policies import RetryOn
from app.jobs.send_email import send_email
from app.services import orders

logger = logging.getLogger(__name__)


def order_queue(order_id: int) -> str:
    """`urgent` for a premium customer's order, else `default` (the seed's queue_as block)."""
    try:
        with session_scope() as session:
            return "urgent" if orders.is_premium_order(session, order_id) else "default"
    except SQLAlchemyError as exc:  # routing must not lose the job: fall back to default
        logger.warning("cannot tell whether order %s is premium (%s); using default", order_id, exc)
        return "default"


@job(
    "jobs.process_order",
    queue_as=order_queue,
    # A producer may enqueue before its own commit is visible: look again shortly.
    retry_on=[RetryOn(orders.OrderNotFound, wait=5, attempts=3), DATABASE_UNAVAILABLE],
)
def process_order(order_id: RowId) -> str:
    """Reserve stock, total and mark the order processed; then send its confirmation."""
    with session_scope() as session:
        outcome = orders.process_order(session, order_id)
        if outcome.status == "processed":
            # On every delivery that finds the order processed, not only the one that processed
            # it: a crash between commit and publish is healed by the redelivery, and the
            # email's key makes the duplicates harmless.
            send_email.delay(
                outcome.user_id,
                "order_confirmation",
                idempotency_key=f"order-confirmation:{order_id}",
                context={"order_id": order_id, "total": str(outcome.total)},
            )
    return outcome.status

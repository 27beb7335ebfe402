"""Charging a payment through the gateway, exactly once per payment."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Order, Payment
from app.services.errors import NotFound
from app.services.payment_gateway import (
    CardExpired,
    InsufficientFunds,
    PaymentDeclined,
    PaymentGatewayClient,
)


class PaymentNotFound(NotFound):
    """The payment does not exist, or its producer has not committed it yet."""

    def __init__(self, payment_id: int) -> None:
        super().__init__("payment", payment_id)


@dataclass(frozen=True)
class PaymentOutcome:
    """Where the payment stands after `process_payment`."""

    payment_id: int
    user_id: int
    amount: Decimal
    status: str
    changed: bool  # False: it was not pending, nothing was charged
    declined: PaymentDeclined | None = None


def process_payment(
    session: Session, payment_id: int, gateway: PaymentGatewayClient
) -> PaymentOutcome:
    """Charge a pending payment; record success or the decline.

    The payment row stays locked during the call, so a second delivery waits and then finds
    it settled. The gateway gets the payment's idempotency key, so a charge retried after a
    timeout or a crash (when the first attempt may have gone through) is charged once.
    Timeouts and gateway failures propagate: the payment stays pending for the retry.
    """
    row = session.execute(
        select(Payment, Order.user_id)
        .join(Order, Order.id == Payment.order_id)
        .where(Payment.id == payment_id)
        .with_for_update(of=Payment)
    ).one_or_none()
    if row is None:
        raise PaymentNotFound(payment_id)
    payment, user_id = row
    if payment.status != "pending":
        return PaymentOutcome(payment.id, user_id, payment.amount, payment.status, False)
    declined: PaymentDeclined | None = None
    try:
        charge = gateway.charge(
            idempotency_key=payment.idempotency_key,
            amount=payment.amount,
            card_token=payment.card_token,
        )
    except InsufficientFunds as exc:
        payment.status, declined = "insufficient_funds", exc
    except CardExpired as exc:
        payment.status, declined = "card_expired", exc
    else:
        payment.status = "succeeded"
        payment.gateway_charge_id = charge.charge_id
    payment.processed_at = dt.datetime.now(dt.UTC)
    session.flush()
    return PaymentOutcome(payment.id, user_id, payment.amount, payment.status, True, declined)

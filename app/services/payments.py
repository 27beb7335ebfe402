"""Charging a payment through the gateway, exactly once per payment."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import Table, bindparam, select
from sqlalchemy.orm import Session

from app.models import Order, Payment
from app.services.errors import NotFound
from app.services.payment_gateway import (
    CardExpired,
    InsufficientFunds,
    PaymentDeclined,
    PaymentGatewayClient,
)
from app.services.statements import settling


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
    row = session.execute(_LOCK, {"payment_id": payment_id}).one_or_none()
    if row is None:
        raise PaymentNotFound(payment_id)
    if row.status != "pending":
        return PaymentOutcome(payment_id, row.user_id, row.amount, row.status, False)
    declined: PaymentDeclined | None = None
    settled: dict[str, Any] = {}
    try:
        charge = gateway.charge(
            idempotency_key=row.idempotency_key,
            amount=row.amount,
            card_token=row.card_token,
        )
    except InsufficientFunds as exc:
        settled["status"], declined = "insufficient_funds", exc
    except CardExpired as exc:
        settled["status"], declined = "card_expired", exc
    else:
        settled["status"], settled["gateway_charge_id"] = "succeeded", charge.charge_id
    settled["processed_at"] = dt.datetime.now(dt.UTC)
    statement = settling(_PAYMENTS, "payment_id", frozenset(settled))
    session.execute(statement, {**settled, "payment_id": payment_id})
    return PaymentOutcome(payment_id, row.user_id, row.amount, settled["status"], True, declined)


#: The tables: the lock and the settling are statements on columns, not ORM objects (two
#: statements a charge), each built once with its values as parameters (building one cost
#: more of the worker's CPU than running it).
_PAYMENTS = cast(Table, Payment.__table__)
_ORDERS = cast(Table, Order.__table__)

_LOCK = (
    select(
        _PAYMENTS.c.status,
        _PAYMENTS.c.amount,
        _PAYMENTS.c.card_token,
        _PAYMENTS.c.idempotency_key,
        _ORDERS.c.user_id,
    )
    .join_from(_PAYMENTS, _ORDERS, _ORDERS.c.id == _PAYMENTS.c.order_id)
    .where(_PAYMENTS.c.id == bindparam("payment_id"))
    .with_for_update(of=_PAYMENTS)
)

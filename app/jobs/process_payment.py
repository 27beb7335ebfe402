"""jobs.process_payment(payment_id)."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from app.db import session_scope
from app.delivery.flow import Rate
from app.jobs.arguments import RowId
from app.jobs.base import Job, job
from app.jobs.common import DATABASE_UNAVAILABLE
from app.jobs.policies import DiscardOn, RetryOn
from app.jobs.send_email import send_email
from app.services import payments
from app.services.payment_gateway import (
    CardExpired,
    GatewayTimeout,
    GatewayUnavailable,
    PaymentGatewayClient,
)
from app.settings import get_settings

logger = logging.getLogger(__name__)

#: Seconds a charge request may take; past it the outcome is unknown and the job retries.
GATEWAY_TIMEOUT = 10.0
#: Charges started per second per gateway, across every worker (a gateway's own API limit,
#: PAYMENT_GATEWAY_RATE, 20 unless set); a payment over it waits in the scheduled set, without
#: using up an attempt.
GATEWAY_RATE = get_settings().payment_gateway_rate


def _gateway_key(payment_id: Any = None, **_: Any) -> str:
    """The rate limit's key: the gateway's host and port."""
    return urlsplit(get_settings().payment_gateway_url).netloc


def gateway() -> PaymentGatewayClient:
    """A client of the configured payment gateway."""
    return PaymentGatewayClient(get_settings().payment_gateway_url, timeout=GATEWAY_TIMEOUT)


def _card_expired(job: Job, error: BaseException) -> None:
    logger.warning(
        "payment %s: card expired; the customer must update it (%s)", job.request.args, error
    )


@job(
    "jobs.process_payment",
    queue_as="urgent",
    rate_limit=Rate(GATEWAY_RATE, per=1.0, key=_gateway_key),
    retry_on=[
        RetryOn(GatewayTimeout, GatewayUnavailable, wait="polynomial", attempts=5),
        RetryOn(payments.PaymentNotFound, wait=5, attempts=3),
        DATABASE_UNAVAILABLE,
    ],
    discard_on=[DiscardOn(CardExpired, callback=_card_expired)],
)
def process_payment(payment_id: RowId) -> str:
    """Charge the payment once; on insufficient funds tell the customer; on expiry, stop."""
    with session_scope() as session:
        outcome = payments.process_payment(session, payment_id, gateway())
        if outcome.status == "insufficient_funds":
            send_email.delay(
                outcome.user_id,
                "insufficient_funds",
                idempotency_key=f"insufficient-funds:{payment_id}",
                context={"payment_id": payment_id, "amount": str(outcome.amount)},
            )
    if isinstance(outcome.declined, CardExpired):
        raise outcome.declined  # recorded as card_expired; the policy discards, no retry
    return outcome.status

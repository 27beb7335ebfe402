"""Delivering an email once per idempotency key, whatever the number of deliveries of the job."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.models import EmailDelivery, User
from app.services import mailer
from app.services.errors import DomainError, NotFound
from app.services.mailer import PermanentMailError

Transport = Callable[[EmailMessage], None]


class UserNotFound(NotFound):
    """The user does not exist, or its producer has not committed it yet."""

    def __init__(self, user_id: int) -> None:
        super().__init__("user", user_id)


class NoRecipients(DomainError):
    """An email to configured addresses was given none."""


@dataclass(frozen=True)
class DeliveryOutcome:
    """What `deliver_email` did."""

    delivery_id: int
    status: str
    sent: bool  # False: the key had been delivered (or had failed for good) before
    failure: PermanentMailError | None = None


def deliver_email(
    session: Session,
    *,
    user_id: int | None,
    email_type: str,
    idempotency_key: str,
    context: Mapping[str, Any],
    sender: str,
    default_recipients: Sequence[str],
    transport: Transport,
) -> DeliveryOutcome:
    """Render and send the email once per key; a permanent refusal is recorded as failed.

    The delivery row is locked while the message is sent, so two copies of the job cannot
    both send it: the second waits, then finds it sent. Transient failures propagate and roll
    the row back, so the retry starts afresh.
    """
    if email_type not in mailer.EMAIL_TYPES:
        raise mailer.UnknownEmailType(
            f"unknown email type {email_type!r}; known: {', '.join(mailer.EMAIL_TYPES)}"
        )
    if user_id is not None:
        address = session.scalar(select(User.email).where(User.id == user_id))
        if address is None:
            raise UserNotFound(user_id)
        recipients: Sequence[str] = [address]
    else:
        recipients = list(context.get("to") or default_recipients)
        if not recipients:
            raise NoRecipients(f"{email_type} email has no recipients")
    session.execute(
        insert(EmailDelivery)
        .values(
            user_id=user_id,
            email_type=email_type,
            idempotency_key=idempotency_key,
            recipient=", ".join(recipients),
        )
        .on_conflict_do_nothing(index_elements=["idempotency_key"])
    )
    delivery = session.scalar(
        select(EmailDelivery)
        .where(EmailDelivery.idempotency_key == idempotency_key)
        .with_for_update()
    )
    assert delivery is not None
    if delivery.status != "pending":
        return DeliveryOutcome(delivery.id, delivery.status, sent=False)
    message = mailer.render(
        email_type,
        to=", ".join(recipients),
        sender=sender,
        context=context,
        message_id_key=idempotency_key,
    )
    try:
        transport(message)
    except PermanentMailError as exc:
        delivery.status, delivery.error = "failed", str(exc)
        session.flush()
        return DeliveryOutcome(delivery.id, delivery.status, sent=False, failure=exc)
    delivery.status, delivery.sent_at = "sent", dt.datetime.now(dt.UTC)
    session.flush()
    return DeliveryOutcome(delivery.id, delivery.status, sent=True)

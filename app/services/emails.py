"""Delivering an email once per idempotency key, whatever the number of deliveries of the job."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any, cast

from sqlalchemy import Table, bindparam, select
from sqlalchemy.dialects.postgresql import Insert, insert
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ReturningInsert

from app.models import EmailDelivery, User
from app.services import mailer
from app.services.errors import DomainError, NotFound
from app.services.mailer import PermanentMailError
from app.services.statements import settling, value

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

    Claiming the key is one statement: the row is inserted (from the user's row, for a user's
    email) or, already there and pending, locked, and what the send needs comes back. Only a
    key already settled, or a user not found, takes a second statement to tell which.
    """
    if email_type not in mailer.EMAIL_TYPES:
        raise mailer.UnknownEmailType(
            f"unknown email type {email_type!r}; known: {', '.join(mailer.EMAIL_TYPES)}"
        )
    row = {"user_id": user_id, "email_type": email_type, "idempotency_key": idempotency_key}
    if user_id is not None:
        claimed = session.execute(_CLAIM_FOR_USER, row).one_or_none()
    else:
        recipients = list(context.get("to") or default_recipients)
        if not recipients:
            raise NoRecipients(f"{email_type} email has no recipients")
        claimed = session.execute(_CLAIM, {**row, "recipient": ", ".join(recipients)}).one_or_none()
    if claimed is None:
        settled = session.execute(_SETTLED, {"idempotency_key": idempotency_key}).one_or_none()
        if settled is None:  # nothing inserted: the user's row is not there
            assert user_id is not None
            raise UserNotFound(user_id)
        return DeliveryOutcome(settled.id, settled.status, sent=False)
    delivery_id, to = claimed
    message = mailer.render(
        email_type,
        to=to,
        sender=sender,
        context=context,
        message_id_key=idempotency_key,
    )
    try:
        transport(message)
    except PermanentMailError as exc:
        _settle(session, delivery_id, status="failed", error=str(exc))
        return DeliveryOutcome(delivery_id, "failed", sent=False, failure=exc)
    _settle(session, delivery_id, status="sent", sent_at=dt.datetime.now(dt.UTC))
    return DeliveryOutcome(delivery_id, "sent", sent=True)


#: The tables, for statements that return columns rather than loading ORM objects (two
#: statements a send, the same for every email).
_DELIVERIES = cast(Table, EmailDelivery.__table__)
_USERS = cast(Table, User.__table__)


def _claiming(claim: Insert) -> ReturningInsert[Any]:
    return claim.on_conflict_do_update(
        index_elements=["idempotency_key"],
        # Touching the row takes its lock (waiting for a copy that holds it); a settled key is
        # left untouched and comes back as no row.
        set_={"idempotency_key": claim.excluded.idempotency_key},
        where=_DELIVERIES.c.status == "pending",
    ).returning(_DELIVERIES.c.id, _DELIVERIES.c.recipient)


# The statements are built once, their values parameters: building one (the conflict clause's
# `excluded` alias of the whole table above all) cost more of the worker's CPU than the
# round trip that runs it.
_CLAIM_COLUMNS = ("user_id", "email_type", "idempotency_key")
#: A user's email: the row made from the user's (no row when there is no such user).
_CLAIM_FOR_USER = _claiming(
    insert(_DELIVERIES).from_select(
        [*_CLAIM_COLUMNS, "recipient"],
        select(*(value(_DELIVERIES, name) for name in _CLAIM_COLUMNS), _USERS.c.email).where(
            _USERS.c.id == bindparam("user_id")
        ),
    )
)
#: An email to configured addresses (no user).
_CLAIM = _claiming(
    insert(_DELIVERIES).values(
        {name: value(_DELIVERIES, name) for name in (*_CLAIM_COLUMNS, "recipient")}
    )
)
_SETTLED = select(_DELIVERIES.c.id, _DELIVERIES.c.status).where(
    _DELIVERIES.c.idempotency_key == bindparam("idempotency_key")
)


def _settle(session: Session, delivery_id: int, **values: Any) -> None:
    statement = settling(_DELIVERIES, "delivery_id", frozenset(values))
    session.execute(statement, {**values, "delivery_id": delivery_id})

"""jobs.send_email(user_id, email_type, idempotency_key=None, context=None)."""

from __future__ import annotations

import logging
from email.message import EmailMessage
from typing import Annotated, Any

from app.db import session_scope
from app.jobs.arguments import RowId
from app.jobs.base import Job, job
from app.jobs.common import DATABASE_UNAVAILABLE, IdempotencyKey, one_of
from app.jobs.policies import DiscardOn, RetryOn
from app.services import emails, mailer
from app.settings import get_settings

logger = logging.getLogger(__name__)

#: Seconds an SMTP conversation may take before it counts as a timeout.
SMTP_TIMEOUT = 10.0
#: An email type the mailer can render: checked when the job is enqueued, not at delivery.
EmailType = Annotated[str, one_of("an email type", mailer.EMAIL_TYPES)]


def smtp_transport(message: EmailMessage) -> None:
    """Send through the configured SMTP server."""
    settings = get_settings()
    mailer.send(message, host=settings.smtp_host, port=settings.smtp_port, timeout=SMTP_TIMEOUT)


def _unique_per_order(
    user_id: Any = None,
    email_type: Any = None,
    idempotency_key: Any = None,
    context: Any = None,
) -> str | None:
    """An order confirmation is enqueued once per order while one is queued, waiting or being
    sent (process_order enqueues it on every delivery that finds the order processed); other
    emails are not unique."""
    if email_type == "order_confirmation" and isinstance(context, dict):
        order_id = context.get("order_id")
        return None if order_id is None else f"order:{order_id}"
    return None


def _log_undeliverable(job: Job, error: BaseException) -> None:
    logger.error("email not delivered (%s[%s]): %s", job.name, job.request.id, error)


@job(
    "jobs.send_email",
    bind=True,
    unique_for=3600,
    unique_key=_unique_per_order,
    retry_on=[
        # 4xx replies and dropped connections: polynomially longer, 5 attempts.
        RetryOn(mailer.TransientMailError, wait="polynomial", attempts=5),
        RetryOn(mailer.MailTimeout, wait=60, attempts=3),
        RetryOn(emails.UserNotFound, wait=5, attempts=3),
        DATABASE_UNAVAILABLE,
    ],
    discard_on=[
        # 5xx: the delivery is already recorded as failed; retrying cannot help.
        DiscardOn(mailer.PermanentMailError, callback=_log_undeliverable),
        DiscardOn(mailer.UnknownEmailType, emails.NoRecipients, callback=_log_undeliverable),
    ],
    redact=("context",),
)
def send_email(
    self: Any,
    user_id: RowId | None,
    email_type: EmailType,
    idempotency_key: IdempotencyKey | None = None,
    context: dict[str, Any] | None = None,
) -> str:
    """Send the email once per key (the task id by default); `user_id` None: configured to."""
    settings = get_settings()
    with session_scope() as session:
        outcome = emails.deliver_email(
            session,
            user_id=user_id,
            email_type=email_type,
            idempotency_key=idempotency_key or f"task:{self.request.id}",
            context=context or {},
            sender=settings.mail_from,
            default_recipients=settings.report_recipients,
            transport=smtp_transport,
        )
    if outcome.failure is not None:
        raise outcome.failure  # after the commit that recorded it: the policy discards
    return outcome.status

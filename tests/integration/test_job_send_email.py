"""jobs.send_email over real SMTP: once per key, retried when transient, discarded when not."""

from __future__ import annotations

import sys

import pytest
from celery.worker import WorkController
from sqlalchemy import select

from app.devservers.smtp import SmtpServer
from app.jobs import send_email
from app.jobs.testing import EnqueuedJobs
from app.models import EmailDelivery
from tests.integration.conftest import FinishedJobs, deliver_twice, run_at_once
from tests.integration.factories import count, make_user, scalar

CONTEXT = {"order_id": 5, "total": "9.99"}


def delivery(key: str) -> EmailDelivery:
    found = scalar(select(EmailDelivery).where(EmailDelivery.idempotency_key == key))
    assert found is not None
    return found  # type: ignore[no-any-return]


def test_an_email_is_rendered_sent_and_recorded(worker: WorkController, smtp: SmtpServer) -> None:
    user = make_user(email="ada@example.com")

    assert send_email.delay(user, "order_confirmation", "k1", CONTEXT).get(timeout=30) == "sent"

    [mail] = smtp.messages_to("ada@example.com")
    assert mail.message["Subject"] == "Your order #5 is confirmed"
    record = delivery("k1")
    assert (record.status, record.recipient, record.sent_at is not None) == (
        "sent",
        "ada@example.com",
        True,
    )


def test_an_email_to_configured_addresses_needs_no_user(smtp: SmtpServer) -> None:
    send_email.perform_now(None, "batch_completed", "batch-1", {"batch_id": 1, "items": 3})
    [mail] = smtp.messages_to("ops@example.com")
    assert mail.message["Subject"] == "Batch #1 completed"


def test_the_same_key_twice_sends_one_email(smtp: SmtpServer) -> None:
    user = make_user()
    send_email.perform_now(user, "order_confirmation", "once", CONTEXT)
    assert send_email.perform_now(user, "order_confirmation", "once", CONTEXT) == "sent"
    assert len(smtp.messages) == 1


def test_the_same_message_delivered_twice_sends_one_email(
    worker: WorkController, smtp: SmtpServer, finished_jobs: FinishedJobs
) -> None:
    task_id = deliver_twice(send_email, make_user(), "order_confirmation", None, CONTEXT)
    finished_jobs.wait(task_id, 2)
    assert len(smtp.messages) == 1


def test_two_copies_at_once_send_one_email(smtp: SmtpServer) -> None:
    user = make_user()
    smtp.delay_next(0.5)  # the first copy holds the delivery while it talks to the server
    run_at_once(lambda: send_email.perform_now(user, "order_confirmation", "race", CONTEXT), 4)
    assert len(smtp.messages) == 1


def test_a_421_is_retried_polynomially_longer_and_then_delivered(
    worker: WorkController, smtp: SmtpServer, finished_jobs: FinishedJobs
) -> None:
    smtp.fail_next(421)
    result = send_email.delay(make_user(), "order_confirmation", "busy", CONTEXT)

    assert result.get(timeout=30) == "sent"
    assert finished_jobs.outcomes(result.id) == ["retry", "success"]
    assert len(smtp.messages) == 1


def test_a_dropped_connection_is_retried(smtp: SmtpServer, enqueued_jobs: EnqueuedJobs) -> None:
    smtp.drop_next()
    send_email.perform_now(make_user(), "order_confirmation", "dropped", CONTEXT)

    [retry] = enqueued_jobs.jobs
    assert 3 <= retry.options["countdown"] < 3.2  # 1**4 + 2 s, plus up to 15 % of 1 s
    enqueued_jobs.perform_enqueued_jobs()
    assert len(smtp.messages) == 1


def test_a_timeout_is_retried_after_a_minute(
    smtp: SmtpServer, enqueued_jobs: EnqueuedJobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    # app.jobs.send_email is the task; its module is reached through sys.modules.
    monkeypatch.setattr(sys.modules["app.jobs.send_email"], "SMTP_TIMEOUT", 0.3)
    smtp.delay_next(1.0)
    send_email.perform_now(make_user(), "order_confirmation", "slow", CONTEXT)

    [retry] = enqueued_jobs.jobs
    assert 60 <= retry.options["countdown"] < 69
    assert delivery_count("slow") == 0  # rolled back: the retry starts afresh


def delivery_count(key: str) -> int:
    return count(select(EmailDelivery.id).where(EmailDelivery.idempotency_key == key))


def test_a_550_marks_the_delivery_failed_and_is_discarded(
    worker: WorkController, smtp: SmtpServer, finished_jobs: FinishedJobs
) -> None:
    smtp.fail_next(550)
    result = send_email.delay(make_user(), "order_confirmation", "refused", CONTEXT)

    assert result.get(timeout=30) is None
    assert finished_jobs.outcomes(result.id) == ["discard"]
    record = delivery("refused")
    assert record.status == "failed" and "550" in (record.error or "")
    assert smtp.messages == []


def test_an_unknown_email_type_is_discarded(smtp: SmtpServer) -> None:
    assert send_email.perform_now(make_user(), "newsletter", "n1") is None
    assert smtp.messages == []


def test_a_user_not_yet_visible_is_retried(enqueued_jobs: EnqueuedJobs) -> None:
    send_email.perform_now(999_999, "order_confirmation", "ghost", CONTEXT)
    [retry] = enqueued_jobs.jobs
    assert 5 <= retry.options["countdown"] < 5.8

"""jobs.process_payment against the gateway simulator: charged once, whatever happens."""

from __future__ import annotations

import sys

import pytest
from celery.worker import WorkController

from app.devservers.gateway import GatewaySimulator
from app.devservers.smtp import SmtpServer
from app.jobs import process_payment
from app.jobs.testing import EnqueuedJobs
from app.models import Payment
from tests.integration.conftest import FinishedJobs, deliver_twice, run_at_once
from tests.integration.factories import make_payment, reload


def test_a_payment_is_charged_once_and_recorded(
    worker: WorkController, gateway: GatewaySimulator
) -> None:
    payment_id = make_payment(amount="12.50")

    assert process_payment.delay(payment_id).get(timeout=30) == "succeeded"

    payment = reload(Payment, payment_id)
    [charge] = gateway.charges
    assert payment.gateway_charge_id == charge.id
    assert (charge.idempotency_key, str(charge.amount)) == (payment.idempotency_key, "12.50")


def test_insufficient_funds_is_recorded_and_the_customer_emailed(
    worker: WorkController, gateway: GatewaySimulator, smtp: SmtpServer
) -> None:
    payment_id = make_payment(card_token="tok_insufficient_funds")

    assert process_payment.delay(payment_id).get(timeout=30) == "insufficient_funds"

    assert gateway.charges == []
    [mail] = smtp.wait_for_messages(1, timeout=30)
    assert "insufficient funds" in mail.message["Subject"]


def test_an_expired_card_is_recorded_and_the_job_discarded_without_retry(
    worker: WorkController, finished_jobs: FinishedJobs
) -> None:
    payment_id = make_payment(card_token="tok_expired")

    result = process_payment.delay(payment_id)

    assert result.get(timeout=30) is None
    assert finished_jobs.outcomes(result.id) == ["discard"]
    assert reload(Payment, payment_id).status == "card_expired"


def test_a_gateway_failure_is_retried_with_backoff_and_charges_once(
    worker: WorkController, gateway: GatewaySimulator, finished_jobs: FinishedJobs
) -> None:
    gateway.fail_next(1)
    payment_id = make_payment()

    result = process_payment.delay(payment_id)

    assert result.get(timeout=30) == "succeeded"
    assert finished_jobs.outcomes(result.id) == ["retry", "success"]
    assert len(gateway.charges) == 1


def test_a_timeout_after_the_charge_went_through_does_not_charge_twice(
    gateway: GatewaySimulator, enqueued_jobs: EnqueuedJobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.modules["app.jobs.process_payment"], "GATEWAY_TIMEOUT", 0.3)
    gateway.timeout_next(1, 1.0)
    payment_id = make_payment()

    process_payment.perform_now(payment_id)  # times out; the gateway charged anyway
    assert reload(Payment, payment_id).status == "pending"
    [retry] = enqueued_jobs.jobs
    assert 3 <= retry.options["countdown"] < 3.2

    enqueued_jobs.perform_enqueued_jobs()
    assert reload(Payment, payment_id).status == "succeeded"
    assert len(gateway.charges) == 1 and gateway.requests == 2


def test_the_same_message_delivered_twice_charges_once(
    worker: WorkController, gateway: GatewaySimulator, finished_jobs: FinishedJobs
) -> None:
    task_id = deliver_twice(process_payment, make_payment())
    finished_jobs.wait(task_id, 2)
    assert len(gateway.charges) == 1
    assert gateway.requests == 1  # the second delivery found the payment settled


def test_two_copies_at_once_charge_once(gateway: GatewaySimulator) -> None:
    payment_id = make_payment()
    results = run_at_once(lambda: process_payment.perform_now(payment_id), copies=4)
    assert results == ["succeeded"] * 4
    assert len(gateway.charges) == 1

"""jobs.process_order on the real worker: reserve all or nothing, once, then confirm once."""

from __future__ import annotations

from decimal import Decimal

import pytest
from celery.worker import WorkController
from sqlalchemy import func, select

from app.db import session_scope
from app.devservers.smtp import SmtpServer
from app.jobs import process_order, send_email
from app.jobs.testing import EnqueuedJobs
from app.models import InventoryAudit, Order, OrderItem, Product
from tests.integration.conftest import FinishedJobs, deliver_twice, run_at_once
from tests.integration.factories import make_order, make_product, make_user, reload, scalar


def order_of(quantities: dict[int, int], *, premium: bool = False) -> int:
    return make_order(
        make_user(premium=premium), [(pid, qty, "2.50") for pid, qty in quantities.items()]
    )


# The seed's RSpec examples ---------------------------------------------------------------------


def test_processes_the_order() -> None:
    order_id = order_of({make_product(): 1})

    process_order.perform_now(order_id)

    assert reload(Order, order_id).status == "processed"


def test_enqueues_email_notification(enqueued_jobs: EnqueuedJobs) -> None:
    order_id = order_of({make_product(): 1})

    process_order.perform_now(order_id)

    enqueued_jobs.assert_enqueued(
        send_email, args=[reload(Order, order_id).user_id, "order_confirmation"]
    )


# On the worker ---------------------------------------------------------------------------------


def test_an_order_is_processed_and_confirmed_by_email(
    worker: WorkController, smtp: SmtpServer
) -> None:
    a, b = make_product(inventory=5), make_product(inventory=3)
    order_id = order_of({a: 2, b: 3})

    assert process_order.delay(order_id).get(timeout=30) == "processed"

    order = reload(Order, order_id)
    assert (order.total, order.processed_at is not None) == (Decimal("12.50"), True)
    assert (reload(Product, a).inventory, reload(Product, b).inventory) == (3, 0)
    [mail] = smtp.wait_for_messages(1, timeout=30)
    assert f"order #{order_id}" in mail.message["Subject"]


def test_insufficient_stock_fails_the_order_and_reserves_nothing(worker: WorkController) -> None:
    plenty, scarce = make_product(inventory=10), make_product(inventory=1, sku="SCARCE")
    order_id = order_of({plenty: 2, scarce: 2})

    assert process_order.delay(order_id).get(timeout=30) == "failed"

    order = reload(Order, order_id)
    assert order.failure_reason == "insufficient stock: SCARCE (wanted 2, 1 in stock)"
    assert (reload(Product, plenty).inventory, reload(Product, scarce).inventory) == (10, 1)
    assert scalar(select(func.count()).select_from(InventoryAudit)) == 0


def test_a_premium_customers_order_goes_to_urgent(enqueued_jobs: EnqueuedJobs) -> None:
    regular, premium = order_of({make_product(): 1}), order_of({make_product(): 1}, premium=True)

    process_order.delay(regular)
    process_order.delay(premium)

    enqueued_jobs.assert_enqueued(process_order, args=[regular], queue="default")
    enqueued_jobs.assert_enqueued(process_order, args=[premium], queue="urgent")


def test_an_order_not_yet_visible_is_retried_after_five_seconds(
    worker: WorkController, finished_jobs: FinishedJobs
) -> None:
    user, product = make_user(), make_product()
    result = process_order.delay(4242)  # its producer has not committed it yet

    finished_jobs.wait(result.id, 1)
    with session_scope() as session:  # now the producer commits
        session.add(
            Order(
                id=4242,
                user_id=user,
                items=[OrderItem(product_id=product, quantity=1, unit_price=Decimal(1))],
            )
        )

    assert result.get(timeout=30) == "processed"
    assert finished_jobs.outcomes(result.id) == ["retry", "success"]


def test_arguments_that_cannot_name_an_order_are_discarded(enqueued_jobs: EnqueuedJobs) -> None:
    result = process_order.apply(("not-an-id",))
    assert result.successful() and result.result is None
    enqueued_jobs.assert_no_enqueued()


def test_the_same_message_delivered_twice_processes_the_order_once(
    worker: WorkController, smtp: SmtpServer, finished_jobs: FinishedJobs
) -> None:
    product = make_product(inventory=5)
    order_id = order_of({product: 2})

    task_id = deliver_twice(process_order, order_id)

    assert finished_jobs.wait(task_id, 2) == ["success", "success"]
    assert reload(Product, product).inventory == 3
    assert scalar(select(func.count()).select_from(InventoryAudit)) == 1
    smtp.wait_for_messages(1, timeout=30)
    with pytest.raises(TimeoutError):
        smtp.wait_for_messages(2, timeout=2)


def test_two_copies_at_once_process_the_order_once(smtp: SmtpServer) -> None:
    product = make_product(inventory=5)
    order_id = order_of({product: 2})

    results = run_at_once(lambda: process_order.perform_now(order_id), copies=4)

    assert results == ["processed"] * 4
    assert reload(Product, product).inventory == 3

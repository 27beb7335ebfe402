"""jobs.update_inventory: one change per key, never below zero, exact under contention."""

from __future__ import annotations

import random

import pytest
from celery.worker import WorkController
from sqlalchemy import func, select

from app.jobs import update_inventory
from app.jobs.base import perform_all_later
from app.models import InventoryAudit, Product
from app.services.inventory import InsufficientInventory
from tests.integration.conftest import FinishedJobs, deliver_twice, run_at_once
from tests.integration.factories import make_product, reload, scalar, wait_until


def audits() -> int:
    return int(scalar(select(func.count()).select_from(InventoryAudit)))


def test_a_change_is_applied_with_its_audit_row(worker: WorkController) -> None:
    product = make_product(inventory=10)

    assert update_inventory.delay(product, 5, "restock-1").get(timeout=30) == 15

    assert reload(Product, product).inventory == 15
    assert audits() == 1


def test_the_same_key_twice_changes_the_stock_once() -> None:
    product = make_product(inventory=10)

    update_inventory.perform_now(product, -3, "sale-7")
    update_inventory.perform_now(product, -3, "sale-7")

    assert reload(Product, product).inventory == 7
    assert audits() == 1


def test_the_same_message_delivered_twice_changes_the_stock_once(
    worker: WorkController, finished_jobs: FinishedJobs
) -> None:
    product = make_product(inventory=10)

    task_id = deliver_twice(update_inventory, product, 4)  # key: the task id

    finished_jobs.wait(task_id, 2)
    assert reload(Product, product).inventory == 14
    assert audits() == 1


def test_stock_never_goes_below_zero() -> None:
    product = make_product(inventory=2)

    with pytest.raises(InsufficientInventory, match="has 2 in stock; a change of -3"):
        update_inventory.perform_now(product, -3, "too-much")

    assert reload(Product, product).inventory == 2
    assert audits() == 0


@pytest.mark.parametrize("bad", [0, "5", 10**9, True])
def test_absurd_or_wrongly_typed_changes_are_discarded(bad: object) -> None:
    product = make_product(inventory=2)
    result = update_inventory.apply((product, bad))
    assert result.successful() and result.result is None
    assert reload(Product, product).inventory == 2


def test_many_concurrent_changes_to_one_hot_product_end_exactly_at_the_sum(
    worker: WorkController,
) -> None:
    hot = make_product(inventory=100_000)
    rng = random.Random(5)
    changes = [rng.randint(-50, 50) or 1 for _ in range(1500)]

    perform_all_later(
        update_inventory.s(hot, change, f"hot-{i}") for i, change in enumerate(changes)
    )

    wait_until(lambda: audits() == len(changes), timeout=120)
    assert reload(Product, hot).inventory == 100_000 + sum(changes)


def test_copies_racing_on_one_key_apply_it_once() -> None:
    product = make_product(inventory=10)

    results = run_at_once(lambda: update_inventory.perform_now(product, 1, "race"), copies=6)

    assert results == [11] * 6
    assert reload(Product, product).inventory == 11
    assert audits() == 1

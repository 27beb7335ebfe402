"""The harness itself: a real worker takes jobs from Redis and writes to PostgreSQL."""

from __future__ import annotations

from celery import Celery
from celery.worker import WorkController
from sqlalchemy import func, select

from app.db import session_scope
from app.models import Product
from app.settings import get_endpoints
from tests.integration.conftest import Services
from tests.integration.harness_jobs import Boom, create_product

TIMEOUT = 30


def count_products() -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(Product)) or 0


def test_a_delayed_job_runs_on_the_worker_and_commits_its_row(worker: WorkController) -> None:
    product_id = create_product.delay("widget", 7).get(timeout=TIMEOUT)

    with session_scope() as session:
        product = session.get(Product, product_id)
        assert product is not None
        assert (product.sku, product.inventory) == ("widget", 7)


def test_a_job_that_fails_after_writing_leaves_no_row(worker: WorkController) -> None:
    result = create_product.delay("doomed", 1, fail_after_write=True)

    try:
        result.get(timeout=TIMEOUT)
    except Boom:
        pass
    else:
        raise AssertionError("the job should have failed")
    assert count_products() == 0


def test_a_job_sent_by_name_from_a_bare_app_is_processed(
    worker: WorkController, services: Services
) -> None:
    # Another service knows only the broker and the job's name, not this code base.
    backend = get_endpoints().result_backend  # the broker's Redis, or rpc:// on RabbitMQ
    producer = Celery("producer", broker=services.broker_url, backend=backend)
    producer.conf.accept_content = ["json"]
    producer.conf.result_accept_content = ["json"]
    producer.conf.task_default_queue = "default"

    # On RabbitMQ `default` is the service's quorum queue: a producer publishes to it without
    # declaring it (stock Celery would declare a classic queue, which RabbitMQ refuses).
    rabbit = services.broker_url.startswith("amqp")
    sent = producer.send_task(
        "tests.create_product", args=["by-name", 3], **({"declare": []} if rabbit else {})
    )
    product_id = sent.get(timeout=TIMEOUT)

    assert isinstance(product_id, int)
    assert count_products() == 1


def test_each_test_starts_with_empty_tables() -> None:
    assert count_products() == 0

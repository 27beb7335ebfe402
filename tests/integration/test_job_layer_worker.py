"""The job layer on the real worker, broker and database."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid
from itertools import pairwise
from pathlib import Path

import pytest
from celery import chain, group
from celery.exceptions import TimeoutError as ResultTimeout
from celery.worker import WorkController
from sqlalchemy import select

from app.db import session_scope
from app.jobs.base import perform_all_later
from app.jobs.testing import EnqueuedJobs
from app.models import Product
from app.settings import get_endpoints
from tests.integration import harness_jobs as jobs
from tests.integration.conftest import Services

FIRST = f"{jobs.FirstProblem.__module__}.FirstProblem"
SECOND = f"{jobs.SecondProblem.__module__}.SecondProblem"


def sku_exists(sku: str) -> bool:
    with session_scope() as session:
        return session.scalar(select(Product.id).where(Product.sku == sku)) is not None


def test_two_failures_of_one_kind_and_one_of_another_then_success(
    worker: WorkController,
) -> None:
    token = uuid.uuid4().hex
    jobs.SCRIPTS[token] = [jobs.FirstProblem, jobs.FirstProblem, jobs.SecondProblem, None]

    assert jobs.scripted_on_worker.delay(token).get(timeout=60) == "succeeded"

    runs = [e for e in jobs.EXECUTIONS if e["token"] == token]
    assert [r["attempt"] for r in runs] == [1, 2, 3, 4]
    assert [r["executions"] for r in runs] == [
        {},
        {FIRST: 1},
        {FIRST: 2},
        {FIRST: 2, SECOND: 1},
    ]
    assert {r["queue"] for r in runs} == {"default"}
    gaps = [later["started"] - earlier["started"] for earlier, later in pairwise(runs)]
    # The policies' waits (no jitter): 1 s, 1 s, then 2 s; the worker adds only its latency.
    for gap, wait in zip(gaps, (1, 1, 2), strict=True):
        assert wait <= gap < wait + 3, gaps


def test_a_job_enqueued_in_a_transaction_is_published_only_after_the_commit(
    worker: WorkController,
) -> None:
    with session_scope() as session:
        result = jobs.record_sku.delay("after-commit")
        session.add(Product(sku="parent", name="Parent", price=0))
        time.sleep(1.0)  # had it been published, the worker would have run it by now
        assert not result.ready()
        assert not sku_exists("after-commit")

    assert isinstance(result.get(timeout=30), int)
    assert sku_exists("after-commit") and sku_exists("parent")


def test_a_job_enqueued_in_a_transaction_that_rolls_back_is_never_published(
    worker: WorkController,
) -> None:
    with pytest.raises(RuntimeError), session_scope():
        result = jobs.record_sku.delay("rolled-back")
        raise RuntimeError("the transaction fails")

    with pytest.raises(ResultTimeout):
        result.get(timeout=2)
    assert not sku_exists("rolled-back")


def test_outside_a_transaction_a_job_is_published_at_once(worker: WorkController) -> None:
    assert isinstance(jobs.record_sku.delay("at-once").get(timeout=30), int)


def test_captured_jobs_follow_the_transaction_too(
    services: Services, enqueued_jobs: EnqueuedJobs
) -> None:
    with session_scope():
        jobs.record_sku.delay("kept")
        enqueued_jobs.assert_no_enqueued()
    enqueued_jobs.assert_enqueued(jobs.record_sku, args=["kept"], queue="default")

    with pytest.raises(RuntimeError), session_scope():
        jobs.record_sku.delay("dropped")
        raise RuntimeError("rollback")
    assert enqueued_jobs.matching(jobs.record_sku, args=["dropped"]) == []


def test_a_job_sent_by_name_from_an_app_that_never_imports_this_service(
    worker: WorkController, services: Services, tmp_path: Path
) -> None:
    producer = textwrap.dedent(
        """
        import sys
        from celery import Celery

        app = Celery("another_service", broker=sys.argv[1], backend=sys.argv[2])
        app.conf.update(accept_content=["json"], result_accept_content=["json"])
        # On RabbitMQ the queue is the service's quorum queue: publish to it, do not declare
        # it (stock Celery would declare a classic queue, which RabbitMQ refuses).
        rabbit = sys.argv[1].startswith("amqp")
        result = app.send_task(
            "jobs.test_record_sku",
            args=["sent-by-name"],
            queue="default",
            **({"declare": []} if rabbit else {}),
        )
        print(result.get(timeout=30))
        assert "app" not in sys.modules, "the producer imported the service"
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", producer, services.broker_url, get_endpoints().result_backend],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().isdigit()
    assert sku_exists("sent-by-name")


def test_jobs_compose_with_celery_canvas(worker: WorkController) -> None:
    ids = group(jobs.record_sku.s("in-a-group"), jobs.record_sku.s("also-in-it")).delay()
    assert len(ids.get(timeout=30)) == 2
    assert chain(jobs.record_sku.si("first"), jobs.record_sku.si("second")).delay().get(timeout=30)
    assert all(sku_exists(s) for s in ("in-a-group", "also-in-it", "first", "second"))


def test_perform_all_later_publishes_every_job_and_each_is_processed(
    worker: WorkController,
) -> None:
    results = perform_all_later(jobs.record_sku.s(f"bulk-{i}") for i in range(300))

    assert len({r.id for r in results}) == 300
    expected = {f"bulk-{i}" for i in range(300)}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with session_scope() as session:
            skus = set(session.scalars(select(Product.sku).where(Product.sku.like("bulk-%"))))
        if skus == expected:
            break
        time.sleep(0.2)
    assert skus == expected

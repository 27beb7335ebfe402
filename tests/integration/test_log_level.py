"""LOG_LEVEL is the level of `celery -A app worker` when the command line gives no `-l`."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.models import Product
from tests.integration.conftest import (
    ALL_QUEUES,
    Services,
    celery_process,
    flush_broker,
    isolated_broker,
    producer_for,
    worker_env,
)
from tests.integration.factories import make_product, reload, wait_until

#: A worker as an operator starts it: no --loglevel.
PLAIN_WORKER = ["worker", "--without-mingle", "--without-gossip", "--concurrency", "1"]


@pytest.mark.parametrize(
    ("log_level", "job_lines_shown"),
    [(None, True), ("WARNING", False)],
    ids=["unset-means-info", "warning"],
)
def test_the_worker_logs_at_log_level_without_dash_l(
    services: Services, tmp_path: Path, log_level: str | None, job_lines_shown: bool
) -> None:
    broker = isolated_broker(services.broker_url, 14)
    flush_broker(broker)
    product = make_product(inventory=1)
    env = worker_env(services, broker)
    env.pop("LOG_LEVEL", None)
    if log_level is not None:
        env["LOG_LEVEL"] = log_level
    log = tmp_path / "worker.log"

    with celery_process([*PLAIN_WORKER, *ALL_QUEUES], env, log):
        producer_for(broker).send_task(
            "jobs.update_inventory", args=[product, 2, "log-level"], queue="default"
        )
        wait_until(lambda: reload(Product, product).inventory == 3, timeout=60)
        if job_lines_shown:
            wait_until(lambda: "job finished jobs.update_inventory" in log.read_text(), timeout=30)

    text = log.read_text()
    assert ("job started jobs.update_inventory" in text) is job_lines_shown, text
    assert ("job finished jobs.update_inventory" in text) is job_lines_shown, text

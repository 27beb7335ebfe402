"""LOG_FORMAT=json on a real worker: every line a JSON object; the caller's correlation id in
every line the job and the jobs it enqueues write, Celery's own lines about them included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from celery import Celery

from app.devservers.smtp import SmtpServer
from app.models import Order
from tests.integration.conftest import (
    ALL_QUEUES,
    HARNESS_WORKER,
    Services,
    celery_process,
    flush_broker,
    isolated_broker,
    worker_env,
)
from tests.integration.factories import make_order, make_product, make_user, reload, wait_until


def test_json_lines_carry_the_callers_correlation_id_through_enqueued_jobs(
    services: Services, smtp: SmtpServer, tmp_path: Path
) -> None:
    broker = isolated_broker(services.broker_url, 4)
    flush_broker(broker)
    order = make_order(make_user(), [(make_product(), 1, "5.00")])
    Celery("caller", broker=broker).send_task(
        "jobs.process_order",
        args=[order],
        queue="default",
        headers={"x-correlation-id": "checkout-7f3a"},
    )
    log = tmp_path / "worker.log"

    with celery_process(
        [*HARNESS_WORKER, *ALL_QUEUES, "--concurrency", "1"],
        worker_env(services, broker, LOG_FORMAT="json"),
        log,
    ):
        wait_until(lambda: reload(Order, order).status == "processed", timeout=60)
        smtp.wait_for_messages(1, timeout=60)
        wait_until(lambda: "jobs.send_email" in log.read_text(), timeout=30)

    lines: list[dict[str, Any]] = []
    for raw in log.read_text().splitlines():
        if raw.startswith("{"):
            lines.append(json.loads(raw))
    in_jobs = [
        line for line in lines if line.get("job") in ("jobs.process_order", "jobs.send_email")
    ]
    assert {line["job"] for line in in_jobs} == {"jobs.process_order", "jobs.send_email"}
    assert all(line.get("correlation_id") == "checkout-7f3a" for line in in_jobs), in_jobs
    # Celery's own line after the job's body returned carries the job's fields too.
    succeeded = [line for line in lines if " succeeded in " in line["message"]]
    assert {line.get("job") for line in succeeded} == {"jobs.process_order", "jobs.send_email"}
    assert all(line.get("correlation_id") == "checkout-7f3a" for line in succeeded), succeeded
    finished = [line for line in in_jobs if line.get("event") == "finish"]
    assert {(line["job"], line["outcome"]) for line in finished} == {
        ("jobs.process_order", "success"),
        ("jobs.send_email", "success"),
    }
    assert all(
        {"time", "level", "task_id", "queue", "attempt", "duration"} <= set(line)
        for line in finished
    )

"""`jobs-service` as an operator runs it: enqueue, queues, schedule, health."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from celery.worker import WorkController

from app.models import Product
from tests.integration.conftest import (
    ALL_QUEUES,
    HARNESS_WORKER,
    Services,
    celery_process,
    flush_broker,
    isolated_broker,
    run_cli,
    worker_env,
)
from tests.integration.factories import make_product, reload, wait_until


def cli(broker: str, services: Services, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(services, *args, broker=broker)


def test_enqueue_queues_schedule_and_health(services: Services, tmp_path: Path) -> None:
    broker = isolated_broker(services.broker_url, 3)
    flush_broker(broker)
    product = make_product(inventory=0)

    one = cli(broker, services, "enqueue", "jobs.update_inventory", f"[{product}, 2]", "--json")
    assert one.returncode == 0, one.stderr
    assert len(json.loads(one.stdout)["task_ids"]) == 1
    many = cli(
        broker, services, "enqueue", "jobs.update_inventory", f"[{product}, 1]", "--count", "1500"
    )
    assert many.returncode == 0 and "enqueued jobs.update_inventory x1500" in many.stdout
    assert "enqueueing jobs.update_inventory" in many.stderr  # the progress bar

    depths = {
        row["queue"]: row for row in json.loads(cli(broker, services, "queues", "--json").stdout)
    }
    assert depths["default"]["depth"] == 1501
    assert depths["default"]["oldest_age_seconds"] >= 0
    assert depths["urgent"]["depth"] == 0 and depths["urgent"]["oldest_age_seconds"] is None
    assert "QUEUE" in cli(broker, services, "queues").stdout

    schedule = {
        row["entry"]: row for row in json.loads(cli(broker, services, "schedule", "--json").stdout)
    }
    assert schedule["daily-report"]["task"] == "jobs.daily_report"
    assert schedule["daily-report"]["next_run"].endswith("00:05:00+00:00")
    assert schedule["queue-depths"]["task"] == "jobs.record_queue_depths"

    unhealthy = cli(broker, services, "health", "--timeout", "1")
    assert unhealthy.returncode == 1 and "no worker answered" in unhealthy.stderr
    with celery_process(
        [*HARNESS_WORKER, *ALL_QUEUES, "--concurrency", "2"],
        worker_env(services, broker),
        tmp_path / "worker.log",
    ):
        wait_until(lambda: reload(Product, product).inventory == 1502, timeout=120)
        healthy = cli(broker, services, "health", "--json")
    assert healthy.returncode == 0 and json.loads(healthy.stdout)["healthy"] is True


def test_bad_input_gets_one_clear_line(services: Services) -> None:
    broker = isolated_broker(services.broker_url, 3)
    cases = {
        ("enqueue", "jobs.nope", "[1]"): "unknown job 'jobs.nope'; known jobs: jobs.",
        ("enqueue", "jobs.update_inventory", "[1, 2"): "ARGS: expected JSON",
        ("enqueue", "jobs.update_inventory", '{"a": 1}'): "ARGS: expected a JSON array",
        ("enqueue", "jobs.update_inventory", "[1, 0]"): "must not be zero",
    }
    for args, message in cases.items():
        result = cli(broker, services, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr


def test_an_import_shows_progress_and_its_outcome(
    services: Services, worker: WorkController, tmp_path: Path
) -> None:
    csv = tmp_path / "products.csv"
    csv.write_text("sku,name,price,inventory\nA-1,Anvil,1.00,3\nB-2,,1.00,1\n")
    # the in-process worker consumes the tests' own broker
    result = cli(services.broker_url, services, "import", str(csv))

    assert result.returncode == 0, result.stderr
    assert "import 1: completed; 2 rows, 1 imported, 1 rejected" in result.stdout
    assert "line 3: name must be 1 to 200 characters" in result.stdout
    assert "import 1:" in result.stderr  # the progress line

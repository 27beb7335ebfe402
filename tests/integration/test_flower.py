"""Flower, started with the Procfile's command, sees the service's jobs: over its HTTP API,
and on its tasks page in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from tests.integration.conftest import (
    ALL_QUEUES,
    HARNESS_WORKER,
    ROOT,
    Services,
    celery_process,
    flush_broker,
    isolated_broker,
    worker_env,
)
from tests.integration.factories import make_product, wait_until
from tests.integration.test_broker_and_database_faults import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass(frozen=True)
class RunningFlower:
    url: str
    task_id: str


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def task_info(url: str) -> dict[str, Any] | None:
    try:
        return dict(get_json(url))
    except OSError:
        return None


@pytest.fixture(scope="module")
def flower(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningFlower]:
    tmp_path = tmp_path_factory.mktemp("flower")
    broker = isolated_broker(services.broker_url, 2)
    flush_broker(broker)
    port = free_port()
    command = next(
        line.split(":", 1)[1]
        for line in (Path(ROOT) / "Procfile").read_text().splitlines()
        if line.startswith("flower:")
    )
    env = worker_env(services, broker, FLOWER_PORT=str(port), FLOWER_UNAUTHENTICATED_API="true")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    with open(tmp_path / "flower.log", "wb") as log:
        process = subprocess.Popen(
            ["sh", "-c", command],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until(
                lambda: task_info(f"{url}/api/workers?refresh=false") is not None, timeout=60
            )
            with celery_process(
                [*HARNESS_WORKER, *ALL_QUEUES, "--concurrency", "1"],
                worker_env(services, broker),
                tmp_path / "worker.log",
            ):
                producer = Celery("producer", broker=broker)
                # Task events are off by default (TASK_EVENTS); Flower turns them on in the
                # workers it sees with a periodic broadcast. Wait until this worker says they
                # are on, so the job's events are not sent before Flower's broadcast lands.
                wait_until(
                    lambda: bool(producer.control.enable_events(reply=True, timeout=1)),
                    timeout=60,
                )
                product = make_product(inventory=0)
                result = producer.send_task(
                    "jobs.update_inventory", args=[product, 2, "seen-by-flower"], queue="default"
                )
                wait_until(
                    lambda: (
                        (task_info(f"{url}/api/task/info/{result.id}") or {}).get("state")
                        == "SUCCESS"
                    ),
                    timeout=60,
                )
                yield RunningFlower(url, result.id)
        finally:
            os.killpg(process.pid, 15)
            process.wait(timeout=30)


def test_flowers_api_reports_the_job(flower: RunningFlower) -> None:
    info = get_json(f"{flower.url}/api/task/info/{flower.task_id}")
    assert info["name"] == "jobs.update_inventory"
    assert info["state"] == "SUCCESS"
    assert "jobs.update_inventory" in json.dumps(get_json(f"{flower.url}/api/tasks"))


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)
def test_flowers_tasks_page_lists_the_services_jobs(flower: RunningFlower, tmp_path: Path) -> None:
    assert CHROMIUM is not None
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,900",
        "--virtual-time-budget=8000",
    ]
    page = f"{flower.url}/tasks"
    screenshot = tmp_path / "flower-tasks.png"
    subprocess.run(
        [*flags, f"--screenshot={screenshot}", page], check=True, capture_output=True, timeout=120
    )
    dom = subprocess.run(
        [*flags, "--dump-dom", page], check=True, capture_output=True, text=True, timeout=120
    ).stdout

    assert screenshot.stat().st_size > 10_000
    assert "jobs.update_inventory" in dom and flower.task_id in dom

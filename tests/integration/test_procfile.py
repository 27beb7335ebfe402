"""The Procfile as an operator runs it: honcho starts its worker and beat, and jobs get done."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from celery import Celery

from app.models import Product
from tests.integration.conftest import ROOT, Services, flush_broker, isolated_broker
from tests.integration.factories import make_product, reload, wait_until


def test_the_procfile_worker_and_beat_run_jobs(services: Services, tmp_path: Path) -> None:
    procfile = (Path(ROOT) / "Procfile").read_text()
    assert {line.split(":")[0] for line in procfile.splitlines() if line} == {
        "worker",
        "beat",
        "flower",
        "web",  # the operator's web view (tests/integration/test_web.py)
        "smtp",  # the development SMTP server and payment gateway, for `make serve`
        "gateway",
    }
    broker = isolated_broker(services.broker_url, 13)
    flush_broker(broker)
    env = {
        **os.environ,
        "BROKER_URL": broker,
        "DATABASE_URL": services.database_url,
        "QUEUE_DEPTH_INTERVAL": "1",
        "WORKER_CONCURRENCY": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    product = make_product(inventory=1)
    log = tmp_path / "honcho.log"

    with open(log, "wb") as out:
        honcho = subprocess.Popen(
            [sys.executable, "-m", "honcho", "-f", "Procfile", "start", "worker", "beat"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            producer = Celery("producer", broker=broker)
            producer.send_task(
                "jobs.update_inventory", args=[product, 4, "from-procfile"], queue="default"
            )
            wait_until(lambda: reload(Product, product).inventory == 5, timeout=90)
            # beat's queue-depth entry, run by the worker
            wait_until(
                lambda: "job finished jobs.record_queue_depths" in log.read_text(), timeout=60
            )
        finally:
            os.killpg(honcho.pid, signal.SIGTERM)
            honcho.wait(timeout=60)

    text = log.read_text()
    assert "celery@" in text and "beat: Starting" in text

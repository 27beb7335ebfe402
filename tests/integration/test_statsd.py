"""The job layer's metrics, sent to Etsy's StatsD daemon (npm `statsd`) and read back from
what it flushes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from app.delivery.records import Keys
from app.settings import redis_client_url
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

#: Where `make setup` installs the daemon (npm install --prefix .state/npm statsd).
STATSD = Path(os.environ.get("STATSD_DAEMON", Path(ROOT) / ".state/npm/node_modules/statsd"))


def flushed(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def totals(flushes: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for flush in flushes:
        for name, value in flush[kind].items():
            if kind == "counters":
                merged[name] = merged.get(name, 0) + value
            elif kind == "timers":
                merged.setdefault(name, []).extend(value)
            else:
                merged[name] = value
    return merged


@pytest.mark.skipif(
    not (STATSD / "stats.js").exists() or not shutil.which("node"),
    reason="the StatsD daemon is not installed (make setup installs it with npm)",
)
def test_job_metrics_reach_the_statsd_daemon(services: Services, tmp_path: Path) -> None:
    port, output = free_port(), tmp_path / "flushes.jsonl"
    config = tmp_path / "statsd.js"
    config.write_text(
        json.dumps(
            {
                "port": port,
                "address": "127.0.0.1",
                "mgmt_port": free_port(),
                "mgmt_address": "127.0.0.1",
                "flushInterval": 500,
                "backends": [str(Path(ROOT) / "tests/statsd/json_lines_backend.js")],
                "jsonLinesFile": str(output),
            }
        )
    )
    daemon = subprocess.Popen(
        ["node", str(STATSD / "stats.js"), str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    broker = isolated_broker(services.broker_url, 5)
    flush_broker(broker)
    try:
        wait_until(lambda: flushed(output), timeout=30)
        product = make_product(inventory=0)
        producer = Celery("producer", broker=broker)
        for i in range(3):  # stamped as the job layer stamps what it enqueues
            producer.send_task(
                "jobs.update_inventory",
                args=[product, 1, f"m-{i}"],
                queue="default",
                headers={"job_enqueued_at": time.time()},
            )
        producer.send_task(
            "jobs.update_inventory", args=[product, -100, "too-much"], queue="default"
        )
        producer.send_task("jobs.update_inventory", args=[product, "x"], queue="default")
        producer.send_task(
            "jobs.update_inventory", args=[999_999, 1, "no-such-product"], queue="default"
        )  # ProductNotFound: retried
        env = worker_env(
            services,
            broker,
            STATSD_HOST="127.0.0.1",
            STATSD_PORT=str(port),
            STATSD_PREFIX="svc",
            QUEUE_DEPTH_INTERVAL="1",
        )
        with celery_process(
            [*HARNESS_WORKER, *ALL_QUEUES, "--concurrency", "1"], env, tmp_path / "worker.log"
        ):
            name = "svc.jobs.update_inventory"
            wait_until(
                lambda: totals(flushed(output), "counters").get(f"{name}.failure"), timeout=60
            )
            # A job an hour ahead: the worker moves it into the scheduled set.
            producer.send_task("jobs.test_record_run", args=["later"], countdown=3600)
            waiting = redis.Redis.from_url(redis_client_url(broker) or "")
            wait_until(lambda: waiting.zcard(Keys().schedule) == 1, timeout=30)
            # Flow control: seven jobs limited to five a second, two deferred; a job past its
            # expiry is skipped.
            for i in range(7):
                producer.send_task("jobs.test_rated", args=[f"r-{i}", "g"], queue="default")
            producer.send_task(
                "jobs.test_expiring",
                args=["late"],
                queue="default",
                headers={"job_expires_at": time.time() - 1},
            )
            wait_until(
                lambda: (
                    totals(flushed(output), "counters").get("svc.jobs.test_rated.success") == 7
                    and "svc.jobs.flow.expired" in totals(flushed(output), "counters")
                ),
                timeout=60,
            )
            producer.send_task("jobs.record_queue_depths", queue="urgent")
            wait_until(
                lambda: "svc.scheduled.size" in totals(flushed(output), "gauges"), timeout=60
            )
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)

    flushes = flushed(output)
    counters, timers = totals(flushes, "counters"), totals(flushes, "timers")
    assert counters[f"{name}.success"] == 3
    # The too-much change; and the ProductNotFound job's, if its 3 attempts (5 s apart) ran out.
    assert counters[f"{name}.failure"] in (1, 2)
    assert counters[f"{name}.discard"] == 1
    assert counters[f"{name}.retry"] >= 1
    assert len(timers[f"{name}.duration"]) >= 6
    # The three stamped jobs report their queue wait; the others carried no enqueue time. The
    # retries the job layer enqueues are stamped with their due time, so each that started
    # (attempt 2 or 3, five seconds apart: how many run before the end depends on the pace)
    # may add one.
    log = (tmp_path / "worker.log").read_text()
    retried = len(re.findall(r"job started jobs\.update_inventory\[\S+\] \S+ attempt=[23]", log))
    assert 3 <= len(timers[f"{name}.queue_wait"]) <= 3 + retried
    assert all(ms >= 0 for ms in timers[f"{name}.queue_wait"])
    assert counters["svc.jobs.flow.deferred.rate"] >= 2
    assert counters["svc.jobs.flow.expired"] == counters["svc.jobs.test_expiring.expired"] == 1
    gauges = totals(flushes, "gauges")
    assert gauges["svc.queues.default.depth"] == 0
    # The job an hour ahead, and the ProductNotFound retry if it still waits for its time.
    assert gauges["svc.scheduled.size"] in (1, 2)
    assert gauges["svc.scheduled.oldest_overdue"] == 0
    assert gauges["svc.outbox.pending"] == 0 and gauges["svc.outbox.oldest_age"] == 0

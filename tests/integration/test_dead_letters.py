"""The dead-letter store: what lands there, its retention, and the operator's commands."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from celery.worker import WorkController
from sqlalchemy import func, insert, select

from app.db import session_scope
from app.models import DeadLetter, Product
from app.services import dead_letters
from tests.integration.conftest import (
    ROOT,
    Services,
    flush_broker,
    isolated_broker,
    run_cli,
    worker_env,
)
from tests.integration.factories import make_product, reload, scalar, wait_until
from tests.integration.harness_jobs import NotYet, always_fails


def failure(
    job_name: str, args: list[object], kwargs: dict[str, object] | None = None, **overrides: object
) -> dead_letters.Failure:
    values: dict[str, object] = {
        "task_id": "t-1",
        "job_name": job_name,
        "queue": "default",
        "args": args,
        "kwargs": kwargs or {},
        "headers": {},
        "reason": "exhausted",
        "error_type": "app.services.errors.NotFound",
        "error_message": "gone",
        "traceback": "Traceback (most recent call last): ...",
        "attempts": 3,
        "enqueued_at": None,
    }
    values.update(overrides)
    return dead_letters.Failure(**values)  # type: ignore[arg-type]


def cli(services: Services, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(services, *args)


def test_retention_keeps_the_newest_ten_thousand_and_nothing_older_than_six_months(
    services: Services,
) -> None:
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=181)
    row = {
        "task_id": "t",
        "job_name": "jobs.x",
        "args": [],
        "kwargs": {},
        "headers": {},
        "reason": "unhandled",
        "error_type": "E",
        "error_message": "m",
    }
    with session_scope() as session:
        session.execute(insert(DeadLetter), [{**row, "failed_at": old}] * 5)
        session.execute(insert(DeadLetter), [row] * (dead_letters.MAX_ENTRIES + 2))
        newest = dead_letters.record(session, failure("jobs.y", []))

    assert scalar(select(func.count()).select_from(DeadLetter)) == dead_letters.MAX_ENTRIES
    assert scalar(select(func.min(DeadLetter.failed_at))) > old
    assert scalar(select(func.max(DeadLetter.id))) == newest


def test_operators_list_show_retry_and_discard_with_personal_data_redacted(
    services: Services, worker: WorkController
) -> None:
    product = make_product(inventory=1)
    with session_scope() as session:
        mail = dead_letters.record(
            session,
            failure(
                "jobs.send_email", [1, "order_confirmation", "k", {"email": "ada@example.com"}]
            ),
        )
        stock = dead_letters.record(session, failure("jobs.update_inventory", [product, 4, "r"]))

    listed = cli(services, "dead-letters", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)["entries"]
    assert [e["id"] for e in entries] == [stock, mail]
    assert "ada@example.com" not in listed.stdout and "[REDACTED]" in listed.stdout
    table = cli(services, "dead-letters", "list")
    assert "jobs.update_inventory" in table.stdout and "(2 of 2 shown)" in table.stdout

    shown = cli(services, "dead-letters", "show", str(mail))
    assert "Traceback" in shown.stdout and "ada@example.com" not in shown.stdout

    retried = cli(services, "dead-letters", "retry", str(stock))
    assert retried.returncode == 0 and f"retried #{stock}" in retried.stdout
    wait_until(lambda: reload(Product, product).inventory == 5, timeout=30)

    discarded = cli(services, "dead-letters", "discard", str(mail))
    assert f"discarded #{mail}" in discarded.stdout
    assert scalar(select(func.count()).select_from(DeadLetter)) == 0

    missing = cli(services, "dead-letters", "show", "999")
    assert missing.returncode == 2 and "dead letter 999 not found" in missing.stderr


def test_a_bad_configuration_is_one_line(services: Services) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "dead-letters", "list"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": "mysql://u:pw@h/db"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("configuration error: DATABASE_URL: expected")


def test_a_dead_lettered_job_keeps_its_first_enqueue_time_all_its_executions_and_one_error_line(
    services: Services, tmp_path: Path
) -> None:
    """Three executions, two retries 2 s apart in a real worker: the entry's `enqueued_at` is
    the first enqueue, its counts include the last execution, and the worker's log holds one
    ERROR line for it and no traceback (the traceback is in the entry)."""
    from tests.integration.test_scheduled import job_producer, workers

    broker = isolated_broker(services.broker_url, 14)
    flush_broker(broker)
    with workers(worker_env(services, broker), tmp_path, 1) as (worker,):
        with job_producer(broker) as producer:
            first = time.time()
            result = always_fails.apply_async(["doomed"], producer=producer)
        wait_until(lambda: scalar(select(func.count()).select_from(DeadLetter)), timeout=60)
        time.sleep(1)  # the last log lines
    with session_scope() as session:
        (entry,) = dead_letters.entries(session)
        assert entry.task_id == result.id and entry.attempts == 3
        assert entry.enqueued_at is not None
        assert abs(entry.enqueued_at.timestamp() - first) < 1  # not the last retry's (4 s on)
        assert entry.headers["job_executions"] == {f"{NotYet.__module__}.NotYet": 3}
        assert entry.traceback and "NotYet: doomed: never" in entry.traceback
    shown = run_cli(services, "dead-letters", "show", str(entry.id), "--json")
    assert json.loads(shown.stdout)["attempts"] == 3
    log = worker.log.read_text()
    errors = [line for line in log.splitlines() if "ERROR" in line and result.id in line]
    assert len(errors) == 1 and "job dead-lettered" in errors[0], errors
    assert "Traceback" not in log

"""The transactional outbox: a job enqueued in a committed transaction runs, whatever happens to
the broker or the enqueuing process after the commit; a rollback leaves nothing.

Producers run as processes of their own (`tests.integration.outbox_producer`), workers as
process groups with the default settings (each relays the outbox).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, select

from app.db import session_scope
from app.models import InventoryAudit, OutboxMessage, Product
from app.settings import redis_client_url
from tests.integration.conftest import (
    ROOT,
    Services,
    flush_broker,
    isolated_broker,
    run_cli,
    worker_env,
)
from tests.integration.factories import make_product, reload, scalar, wait_until
from tests.integration.harness_jobs import RUNS_KEY, Boom, record_run
from tests.integration.test_broker_and_database_faults import OwnRedis
from tests.integration.test_scheduled import workers

DB = 14
#: Nothing listens here: a producer pointed at it cannot publish.
DEAD_BROKER = "redis://127.0.0.1:9/0"


def runs(client: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(RUNS_KEY, 0, -1)]


def in_outbox() -> int:
    return int(scalar(select(func.count()).select_from(OutboxMessage)))


def producer(services: Services, broker: str, *args: str) -> subprocess.Popen[str]:
    env = {**worker_env(services, broker), "OUTBOX_RELAY": "false"}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.outbox_producer", *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_commit_made_while_redis_is_down_succeeds_and_its_job_runs_once_redis_is_back(
    services: Services, tmp_path: Path
) -> None:
    (tmp_path / "redis").mkdir()
    own = OwnRedis(tmp_path / "redis")
    own.start()
    client = redis.Redis.from_url(redis_client_url(own.url) or "")
    try:
        with workers(worker_env(services, own.url), tmp_path, 1):
            enqueuing = producer(services, own.url, "wait", "while-redis-down", "1")
            assert enqueuing.stdout is not None and enqueuing.stdin is not None
            assert enqueuing.stdout.readline().strip() == "staged"
            own.kill()  # at the moment of the commit
            enqueuing.stdin.write("commit\n")
            enqueuing.stdin.flush()
            out, err = enqueuing.communicate(timeout=60)
            assert enqueuing.returncode == 0, err
            assert out.strip() == "committed"
            assert "Traceback" not in err and "safe in the outbox" in err
            assert in_outbox() == 1
            time.sleep(3)
            own.start()
            wait_until(lambda: runs(client), timeout=60)
            time.sleep(3)  # a second run would show by now
            done = runs(client)
    finally:
        own.stop()
    assert [r["token"] for r in done] == ["while-redis-down"]
    assert in_outbox() == 0


def test_a_producer_killed_between_commit_and_publish_loses_nothing(
    services: Services, tmp_path: Path
) -> None:
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    client = redis.Redis.from_url(redis_client_url(broker) or "")
    with workers(worker_env(services, broker), tmp_path, 1):
        enqueuing = producer(services, broker, "die", "killed-after-commit")
        enqueuing.communicate(timeout=60)
        assert enqueuing.returncode == -9
        died = time.monotonic()
        assert in_outbox() == 1 and not client.llen("default")
        wait_until(lambda: runs(client), timeout=30)
        relayed = time.monotonic() - died
        time.sleep(2)
    assert [r["token"] for r in runs(client)] == ["killed-after-commit"]
    assert in_outbox() == 0
    assert relayed < 10, f"the relay took {relayed:.1f} s"


@pytest.mark.heavy
def test_two_relays_publish_ten_thousand_committed_jobs_each_effect_once(
    services: Services, tmp_path: Path
) -> None:
    """A producer commits 10,000 inventory changes while its broker is unreachable; two
    workers' relays share the rows. Every change applies exactly once."""
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    products = [make_product(inventory=0) for _ in range(10)]
    count = 10_000
    enqueuing = producer(
        services, DEAD_BROKER, "inventory", ",".join(map(str, products)), str(count)
    )
    out, err = enqueuing.communicate(timeout=120)
    assert enqueuing.returncode == 0 and out.strip() == "committed", err
    assert in_outbox() == count
    shown = run_cli(services, "outbox", "--json")
    assert shown.returncode == 0, shown.stderr
    listed = json.loads(shown.stdout)
    assert listed["pending"] == count and listed["oldest_age_seconds"] > 0
    assert listed["oldest"][0]["job"] == "jobs.update_inventory"
    with workers(worker_env(services, broker), tmp_path, 2) as pair:
        wait_until(lambda: in_outbox() == 0, timeout=120)
        applied = lambda: scalar(select(func.count()).select_from(InventoryAudit))  # noqa: E731
        wait_until(lambda: applied() == count, timeout=300, every=1.0)
        time.sleep(2)
        logs = "".join(w.log.read_text() for w in pair)
    assert applied() == count
    for product in products:
        assert reload(Product, product).inventory == count // len(products)
    assert "outbox relay caught up" in logs
    keys = scalar(select(func.count(func.distinct(InventoryAudit.idempotency_key))))
    assert keys == count


@pytest.mark.redis_only  # the job records its runs in the broker's Redis
def test_a_rollback_publishes_nothing_and_leaves_the_outbox_empty(
    services: Services, worker: Any
) -> None:
    client = redis.Redis.from_url(redis_client_url(services.broker_url) or "")
    client.delete(RUNS_KEY)
    with pytest.raises(Boom), session_scope() as session:
        record_run.delay("rolled-back")
        # The row is in the caller's transaction, and nowhere else yet.
        assert session.scalar(select(func.count()).select_from(OutboxMessage)) == 1
        assert in_outbox() == 0
        raise Boom("roll back")
    assert in_outbox() == 0
    with session_scope():
        result = record_run.delay("committed")
    assert in_outbox() == 0  # the fast path published it and deleted its row
    wait_until(lambda: runs(client), timeout=30)
    time.sleep(1)
    assert [r["id"] for r in runs(client)] == [result.id]


@pytest.mark.redis_only  # the job records its runs in the broker's Redis
def test_outside_a_transaction_delay_publishes_directly(services: Services, worker: Any) -> None:
    client = redis.Redis.from_url(redis_client_url(services.broker_url) or "")
    client.delete(RUNS_KEY)
    result = record_run.delay("direct")
    wait_until(lambda: runs(client), timeout=30)
    assert [r["id"] for r in runs(client)] == [result.id]
    assert in_outbox() == 0

"""Nothing lost, nothing doubled: workers whose processes are killed again and again.

A worker runs as a process group of its own, with the default settings (a six-hour visibility
timeout: only the heartbeat can bring a killed worker's messages back within the test), over
3,000 mixed jobs.

- Pool children SIGKILLed: Celery requeues their job (reject_on_worker_lost); every effect
  happens exactly once.
- Whole workers SIGKILLed, five times, once with a second worker alive throughout and once
  with none: when the killed worker's heartbeat lapses, a live worker (the other one, or the
  replacement started at once) puts what it held back at the head of its queues. Nothing is
  lost and nothing is doubled: app.delivery takes a message and records who holds it in one
  step, so there is no instant at which a killed worker holds a message Redis has forgotten
  (test_atomic_fetch.py places a kill at exactly that instant).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from celery import Celery
from sqlalchemy import func, select

from app.db import session_scope
from app.delivery.records import Keys
from app.devservers.gateway import GatewaySimulator
from app.devservers.smtp import SmtpServer
from app.models import (
    DeadLetter,
    EmailDelivery,
    InventoryAudit,
    Order,
    OutboxMessage,
    Payment,
    Product,
)
from app.settings import redis_client_url
from tests.integration.conftest import (
    ALL_QUEUES,
    HARNESS_WORKER,
    ROOT,
    Services,
    flush_broker,
    isolated_broker,
    worker_env,
)
from tests.integration.factories import (
    make_order,
    make_payment,
    make_product,
    make_user,
    reload,
    scalar,
    wait_until,
)

# Needs a Redis broker (the transport's records, scripts or Redis itself): a pass on
# RabbitMQ would leave it out (`-m "not redis_only"`).
pytestmark = pytest.mark.redis_only

HOT_CHANGES, ORDERS, PAYMENTS, EMAILS = 2710, 60, 80, 150


class CrashingWorker:
    """A worker process group that can be killed outright and started again."""

    def __init__(
        self,
        env: dict[str, str],
        log: Path,
        concurrency: int = 2,
        prefix: Sequence[str] = (),
        name: str = "crash",
        options: Sequence[str] = (),
    ) -> None:
        self.env, self.log, self.concurrency = env, log, concurrency
        self.options = list(options)  # more worker options (`--pool threads`)
        self.prefix, self.name = list(prefix), name  # (prefix: run it elsewhere, see netns.py)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [
                    *self.prefix,
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "app",
                    *HARNESS_WORKER,
                    *ALL_QUEUES,
                    "--concurrency",
                    str(self.concurrency),
                    "--hostname",
                    f"{self.name}-{self.starts}@%h",
                    *self.options,
                ],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def pool_children(self) -> list[int]:
        assert self.process is not None
        with open(f"/proc/{self.process.pid}/task/{self.process.pid}/children") as f:
            return [int(pid) for pid in f.read().split()]

    def kill_a_child(self) -> bool:
        children = self.pool_children()
        if children:
            os.kill(random.choice(children), signal.SIGKILL)
        return bool(children)

    def crash(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)  # the worker and its pool, as a host dies
        self.process.wait()

    def stop(self) -> None:
        """A warm shutdown: SIGTERM to the worker's main process (as an operator sends it; the
        worker lets its pool finish), SIGKILL to the whole group after a minute."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


@dataclass
class Scenario:
    """The jobs a crash test enqueues, and what they should do."""

    hot: list[int]
    changes: list[tuple[int, int]]
    stock: int
    orders: list[int]
    payments: list[int]

    @property
    def expected(self) -> int:
        return HOT_CHANGES + ORDERS + PAYMENTS + EMAILS


def enqueue_mixed_jobs(broker: str) -> Scenario:
    rng = random.Random(11)
    hot = [make_product(inventory=100_000) for _ in range(3)]
    changes = [(rng.choice(hot), rng.randint(-20, 20) or 1) for _ in range(HOT_CHANGES)]
    stock = make_product(inventory=1_000_000)
    orders = [make_order(make_user(), [(stock, 1, "3.00")]) for _ in range(ORDERS)]
    payments = [make_payment() for _ in range(PAYMENTS)]
    recipient = make_user()
    jobs: list[tuple[str, list[object], str]] = (
        [
            ("jobs.update_inventory", [p, c, f"inv-{i}"], "default")
            for i, (p, c) in enumerate(changes)
        ]
        + [("jobs.process_order", [o], "default") for o in orders]
        + [("jobs.process_payment", [p], "urgent") for p in payments]
        + [
            (
                "jobs.send_email",
                [recipient, "order_confirmation", f"mail-{i}", {"order_id": i, "total": "1.00"}],
                "low",
            )
            for i in range(EMAILS)
        ]
    )
    rng.shuffle(jobs)
    producer = Celery("producer", broker=broker)
    producer.conf.update(task_serializer="json", broker_connection_retry_on_startup=True)
    with producer.connection_for_write() as connection:
        for name, args, queue in jobs:
            producer.send_task(name, args=args, queue=queue, connection=connection)
    return Scenario(hot, changes, stock, orders, payments)


def run_with_kills(
    services: Services, broker: str, steps: list[str], log: Path, companion: bool = False
) -> Counter[str]:
    """Run a worker (and a `companion` never killed), apply the kill steps 2.5 s apart, then
    kill the worker once more, start its replacement at once and let it all drain."""
    worker = CrashingWorker(worker_env(services, broker), log)
    other = CrashingWorker(
        worker_env(services, broker), log.with_name("companion.log"), name="companion"
    )
    kills = Counter[str]()
    client = redis.Redis.from_url(redis_client_url(broker) or "")
    _last_progress.clear()
    try:
        worker.start()
        if companion:
            other.start()
        time.sleep(4)
        for step in steps:
            # (a worker started moments ago may not have its pool yet: wait for it)
            if step == "child" and wait_until(worker.pool_children, timeout=60):
                assert worker.kill_a_child()
                kills["pool child"] += 1
            if step == "crash":
                worker.crash()
                kills["whole worker"] += 1
                worker.start()
            time.sleep(2.5)
        if kills["whole worker"]:
            worker.crash()
            kills["whole worker"] += 1
            worker.start()
        wait_until(lambda: settled(client), timeout=180, every=1.0)
    finally:
        worker.stop()
        other.stop()
    return kills


_last_progress: list[tuple[int, ...]] = []


def settled(client: redis.Redis) -> bool:
    """The broker holds nothing (no queued job, none held, no retry waiting in the scheduled
    set), the outbox holds nothing (a job enqueued by a job whose process was killed between
    its commit and its publish waits there for the relay, GRACE seconds), and the effects
    stopped changing for three seconds."""
    queued = sum(int(client.llen(q)) for q in ("urgent", "default", "low"))
    queued += int(client.zcard(Keys().schedule))
    with session_scope() as session:
        queued += int(session.scalar(select(func.count()).select_from(OutboxMessage)) or 0)
    progress = (
        audits("%"),
        count_where(EmailDelivery.status == "sent"),
        count_where(Payment.status != "pending"),
        queued,
        int(client.hlen("unacked")),
    )
    _last_progress.append(progress)
    recent = _last_progress[-4:]
    return queued == 0 and progress[-1] == 0 and len(recent) == 4 and len(set(recent)) == 1


def effects(scenario: Scenario, smtp: SmtpServer, gateway: GatewaySimulator) -> dict[str, int]:
    """How many of each kind of job took effect, checking that none took effect twice."""
    # Inventory: each product's stock is its start plus exactly the changes audited once each.
    with session_scope() as session:
        for product in [*scenario.hot, scenario.stock]:
            applied = session.scalar(
                select(func.coalesce(func.sum(InventoryAudit.change), 0)).where(
                    InventoryAudit.product_id == product
                )
            )
            start = 1_000_000 if product == scenario.stock else 100_000
            assert reload(Product, product).inventory == start + int(applied or 0)
    processed = count_where(Order.id.in_(scenario.orders) & (Order.status == "processed"))
    assert audits("order-item:%") == processed  # each processed order reserved once
    succeeded = count_where(Payment.status == "succeeded")
    assert len(gateway.charges) == succeeded  # each payment charged once at the gateway
    assert len({c.idempotency_key for c in gateway.charges}) == succeeded
    sent = count_where(EmailDelivery.status == "sent")
    message_ids = Counter(str(m.message["Message-ID"]) for m in smtp.messages)
    assert len(message_ids) == sent  # one message per delivery key
    with session_scope() as session:
        dead = [
            (d.reason, d.job_name, d.attempts, d.error_message)
            for d in session.scalars(select(DeadLetter))
        ]
    assert dead == []
    return {
        "inventory": audits("inv-%"),
        "orders": processed,
        "payments": succeeded,
        "emails": sent - processed,
    }


@pytest.mark.heavy
def test_killed_pool_processes_lose_nothing_and_double_nothing(
    services: Services, smtp: SmtpServer, gateway: GatewaySimulator, tmp_path: Path
) -> None:
    broker = isolated_broker(services.broker_url, 7)
    flush_broker(broker)
    scenario = enqueue_mixed_jobs(broker)

    kills = run_with_kills(services, broker, ["child"] * 6, tmp_path / "worker.log")

    assert kills == Counter({"pool child": 6})
    done = effects(scenario, smtp, gateway)
    assert done == {
        "inventory": HOT_CHANGES,
        "orders": ORDERS,
        "payments": PAYMENTS,
        "emails": EMAILS,
    }
    for product in scenario.hot:
        expected = 100_000 + sum(c for p, c in scenario.changes if p == product)
        assert reload(Product, product).inventory == expected


@pytest.mark.heavy
@pytest.mark.parametrize("companion", [True, False], ids=["another-worker-alive", "alone"])
def test_killed_whole_workers_lose_nothing_and_double_nothing(
    services: Services,
    smtp: SmtpServer,
    gateway: GatewaySimulator,
    tmp_path: Path,
    companion: bool,
) -> None:
    broker = isolated_broker(services.broker_url, 7)
    flush_broker(broker)
    scenario = enqueue_mixed_jobs(broker)
    assert scenario.expected >= 3000

    steps = ["child", "crash", "crash", "child", "crash", "crash"]
    kills = run_with_kills(services, broker, steps, tmp_path / "worker.log", companion)

    assert kills == Counter({"pool child": 2, "whole worker": 5})
    logs = [tmp_path / "worker.log", tmp_path / "companion.log"]
    recovered = sum(
        int(line.split("recovered ", 1)[1].split(" ", 1)[0])
        for log in logs
        if log.exists()
        for line in log.read_text().splitlines()
        if "message(s) held by worker" in line
    )
    done = effects(scenario, smtp, gateway)
    lost = scenario.expected - sum(done.values())
    print(
        f"kills: {dict(kills)}; recovered by heartbeat: {recovered}; took effect: {done}; "
        f"lost: {lost}; emails received {len(smtp.messages)}; gateway requests {gateway.requests}"
    )
    assert recovered > 0  # what the killed workers held came back through their heartbeats
    assert lost == 0


def audits(pattern: str) -> int:
    return int(
        scalar(
            select(func.count())
            .select_from(InventoryAudit)
            .where(InventoryAudit.idempotency_key.like(pattern))
        )
    )


def count_where(condition: object) -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).where(condition)) or 0)  # type: ignore[arg-type]

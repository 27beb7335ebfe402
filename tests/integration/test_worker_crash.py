"""Nothing lost, nothing doubled: a worker whose processes are killed again and again.

A worker runs as a process group of its own, with a short visibility timeout so that what a
killed worker held comes back within seconds. Pool children are SIGKILLed (Celery requeues
their job: reject_on_worker_lost) and the whole worker is SIGKILLed (what it held is restored
from Redis's unacked set by the next worker), then the queues drain. Every effect must have
happened exactly once.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import redis
from celery import Celery
from sqlalchemy import func, select

from app.db import session_scope
from app.devservers.gateway import GatewaySimulator
from app.devservers.smtp import SmtpServer
from app.models import DeadLetter, EmailDelivery, InventoryAudit, Order, Payment, Product
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

HOT_CHANGES, ORDERS, PAYMENTS, EMAILS = 2200, 60, 80, 150
VISIBILITY = 8


class CrashingWorker:
    """A worker process group that can be killed outright and started again."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log = env, log
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "app",
                    *HARNESS_WORKER,
                    *ALL_QUEUES,
                    "--concurrency",
                    "2",
                    "--hostname",
                    f"crash-{self.starts}@%h",
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
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


def test_killed_workers_lose_nothing_and_double_nothing(
    services: Services, smtp: SmtpServer, gateway: GatewaySimulator, tmp_path: Path
) -> None:
    broker = isolated_broker(services.broker_url, 7)
    flush_broker(broker)
    rng = random.Random(11)
    hot = [make_product(inventory=100_000) for _ in range(3)]
    changes = [(rng.choice(hot), rng.randint(-20, 20) or 1) for _ in range(HOT_CHANGES)]
    stock = make_product(inventory=1_000_000)
    orders = [make_order(make_user(), [(stock, 1, "3.00")]) for _ in range(ORDERS)]
    payments = [make_payment() for _ in range(PAYMENTS)]
    recipient = make_user()

    producer = Celery("producer", broker=broker)
    producer.conf.update(task_serializer="json", broker_connection_retry_on_startup=True)
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
    with producer.connection_for_write() as connection:
        for name, args, queue in jobs:
            producer.send_task(name, args=args, queue=queue, connection=connection)

    worker = CrashingWorker(
        worker_env(services, broker, BROKER_VISIBILITY_TIMEOUT=str(VISIBILITY)),
        tmp_path / "worker.log",
    )
    kills = Counter[str]()
    try:
        worker.start()
        time.sleep(4)
        for step in ("child", "child", "crash", "child", "child", "crash"):
            if step == "child" and worker.kill_a_child():
                kills["pool child"] += 1
            if step == "crash":
                worker.crash()
                kills["whole worker"] += 1
                worker.start()
            time.sleep(2.5)
        worker.crash()
        kills["whole worker"] += 1
        time.sleep(VISIBILITY + 1)  # what the dead workers held is now due back
        worker.start()
        client = redis.Redis.from_url(redis_client_url(broker) or "")
        wait_until(lambda: drained(client, orders), timeout=180, every=0.5)
    finally:
        worker.stop()

    assert kills == Counter({"pool child": 4, "whole worker": 3})
    # Inventory: every change applied exactly once.
    for product in hot:
        expected = 100_000 + sum(c for p, c in changes if p == product)
        assert reload(Product, product).inventory == expected
    assert audits("inv-%") == HOT_CHANGES
    # Orders: each processed once, its item reserved once.
    assert count_where(Order.status == "processed") == ORDERS
    assert reload(Product, stock).inventory == 1_000_000 - ORDERS
    assert audits("order-item:%") == ORDERS
    # Payments: each charged once at the gateway, however often it was tried.
    assert count_where(Payment.status == "succeeded") == PAYMENTS
    assert len(gateway.charges) == PAYMENTS
    assert len({c.idempotency_key for c in gateway.charges}) == PAYMENTS
    # Emails: one delivery per key; the server saw each message (by Message-ID) once, unless
    # a crash fell between its acceptance and the commit (then the Message-ID repeats).
    sent = count_where(EmailDelivery.status == "sent")
    assert sent == EMAILS + ORDERS
    message_ids = Counter(str(m.message["Message-ID"]) for m in smtp.messages)
    assert len(message_ids) == EMAILS + ORDERS
    duplicates = sum(n - 1 for n in message_ids.values())
    print(
        f"kills: {dict(kills)}; emails received {len(smtp.messages)}, "
        f"{duplicates} repeated Message-IDs; gateway requests {gateway.requests}"
    )
    # Nothing unaccounted for.
    assert scalar(select(func.count()).select_from(DeadLetter)) == 0


def drained(client: redis.Redis, orders: list[int]) -> bool:
    pending = count_where(Order.id.in_(orders) & (Order.status == "pending")) + count_where(
        Payment.status == "pending"
    )
    queued = sum(int(client.llen(q)) for q in ("urgent", "default", "low"))
    return (
        audits("inv-%") == HOT_CHANGES
        and pending == 0
        and queued == 0
        and not client.hlen("unacked")
        and count_where(EmailDelivery.status == "sent") == EMAILS + ORDERS
    )


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

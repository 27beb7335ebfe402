"""The demo: the whole service on one machine, every documented job once, and a summary.

`python -m app.demo` (or `make run`) starts the embedded PostgreSQL and Redis unless
DATABASE_URL / BROKER_URL are set, migrates, starts the SMTP server, the payment-gateway
simulator and a real `celery -A app worker`, seeds sample data, enqueues each job (a premium
order, a declined payment, a 1,000-item batch, ...), waits for them, prints what happened,
and stops everything it started.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlalchemy import func, insert, select

from app import embedded
from app.devservers.gateway import GatewaySimulator
from app.devservers.smtp import SmtpServer
from app.settings import ConfigError, get_endpoints, get_settings, load_settings

#: How long the demo waits for its jobs before it reports what it has.
WAIT_SECONDS = 180
BATCH_ITEMS = 1000
DATASET_RECORDS = 5000


@dataclass
class Seeded:
    """Ids of what this demo run created (other runs' rows are left out of the summary)."""

    tag: str
    users: dict[str, int] = field(default_factory=dict)
    products: list[int] = field(default_factory=list)
    orders: dict[str, int] = field(default_factory=dict)
    payments: dict[str, int] = field(default_factory=dict)
    batch: int = 0
    dataset: int = 0
    import_id: int = 0


def main() -> int:
    """Run the demo; 0 when every job reached its expected end."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    with ExitStack() as stack:
        if settings.database_url is None or settings.broker_url is None:
            say("starting the embedded PostgreSQL and Redis")
            running = embedded.ensure_running(
                settings.state_dir,
                postgres=settings.database_url is None,
                redis=settings.broker_url is None,
            )
            if running.started:
                stack.callback(embedded.stop, settings.state_dir, running.started)
            for name, value in (
                ("DATABASE_URL", running.database_url),
                ("BROKER_URL", running.broker_url),
            ):
                if value:
                    os.environ[name] = value
        smtp = stack.enter_context(SmtpServer())
        gateway = stack.enter_context(GatewaySimulator())
        os.environ.update(
            {
                "SMTP_HOST": smtp.host,
                "SMTP_PORT": str(smtp.port),
                "PAYMENT_GATEWAY_URL": gateway.url,
            }
        )
        get_settings.cache_clear()
        get_endpoints.cache_clear()
        say(f"SMTP server on {smtp.host}:{smtp.port}, payment gateway on {gateway.url}")

        say("migrating the database")
        subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            check=True,
            cwd=Path(__file__).resolve().parent.parent,
            stdout=subprocess.DEVNULL,
        )
        stack.enter_context(celery_worker(settings.state_dir))

        seeded = seed()
        enqueue_everything(seeded)
        finished = wait_for(lambda: all_done(seeded), WAIT_SECONDS)
        time.sleep(1.0)  # let the last follow-up emails land
        print_summary(seeded, smtp, gateway)
        if not finished:
            say(f"not everything finished within {WAIT_SECONDS} s (see above)")
            return 1
        say("done; stopping the worker and the servers")
        return 0


def say(message: str) -> None:
    print(f"demo: {message}", flush=True)


@contextmanager
def celery_worker(state_dir: Path) -> Iterator[None]:
    """A real worker process, as an operator would start it; stopped with a warm shutdown."""
    from app.scratch import start_celery, stop_celery

    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / "demo-worker.log"
    log_path.write_text("")
    say(f"starting `celery -A app worker` (log: {log_path})")
    args = ["worker", "--queues", "urgent,default,low", "--concurrency", "2"]
    hostname = f"demo-{uuid.uuid4().hex[:6]}@%h"
    worker = start_celery([*args, "--loglevel", "INFO", "--hostname", hostname], log_path)
    try:
        yield
    finally:
        stop_celery(worker)


def seed() -> Seeded:
    """Sample users, products, orders, payments, a batch, a dataset and an import file."""
    from app.db import session_scope
    from app.models import (
        Batch,
        BatchItem,
        Dataset,
        Import,
        Order,
        OrderItem,
        Payment,
        Product,
        Record,
        User,
    )

    seeded = Seeded(tag=uuid.uuid4().hex[:6])
    say(f"seeding sample data (run {seeded.tag})")
    with session_scope() as session:
        users = {
            "alice": User(email=f"alice+{seeded.tag}@example.com", premium=True),
            "bob": User(email=f"bob+{seeded.tag}@example.com"),
        }
        session.add_all(users.values())
        products = [
            Product(sku=f"{name}-{seeded.tag}", name=name, inventory=stock, price=Decimal(price))
            for name, stock, price in (
                ("anvil", 10, "49.00"),
                ("rope", 5, "7.50"),
                ("lamp", 1, "19.90"),
            )
        ]
        session.add_all(products)
        session.flush()
        anvil, rope, lamp = products
        orders = {
            "premium": Order(
                user_id=users["alice"].id,
                items=[
                    OrderItem(product_id=anvil.id, quantity=1, unit_price=anvil.price),
                    OrderItem(product_id=rope.id, quantity=2, unit_price=rope.price),
                ],
            ),
            "regular": Order(
                user_id=users["bob"].id,
                items=[OrderItem(product_id=rope.id, quantity=1, unit_price=rope.price)],
            ),
            "too many lamps": Order(
                user_id=users["bob"].id,
                items=[OrderItem(product_id=lamp.id, quantity=3, unit_price=lamp.price)],
            ),
        }
        session.add_all(orders.values())
        session.flush()
        payments = {
            token: Payment(order_id=orders["premium"].id, amount=Decimal("64.00"), card_token=token)
            for token in ("tok_ok", "tok_insufficient_funds", "tok_expired")
        }
        session.add_all(payments.values())
        batch, dataset = Batch(), Dataset(name=f"demo-{seeded.tag}")
        session.add_all([batch, dataset])
        session.flush()
        session.execute(
            insert(BatchItem),
            [{"batch_id": batch.id, "payload": {"value": i}} for i in range(BATCH_ITEMS)],
        )
        session.execute(
            insert(Record),
            [{"dataset_id": dataset.id, "payload": {"n": i}} for i in range(DATASET_RECORDS)],
        )
        csv_path = Path(tempfile.gettempdir()) / f"jobs-demo-{seeded.tag}.csv"
        csv_path.write_text(
            "sku,name,price,inventory\n"
            f"crate-{seeded.tag},Crate,12.00,40\n"
            f"bench-{seeded.tag},Bench,52.00,12\n"
            f",No sku,1.00,1\n"
            f"drum-{seeded.tag},Drum,not-a-price,3\n"
        )
        record = Import(source=str(csv_path))
        session.add(record)
        session.flush()
        seeded.users = {k: u.id for k, u in users.items()}
        seeded.products = [p.id for p in products]
        seeded.orders = {k: o.id for k, o in orders.items()}
        seeded.payments = {k: p.id for k, p in payments.items()}
        seeded.batch, seeded.dataset, seeded.import_id = batch.id, dataset.id, record.id
    return seeded


def enqueue_everything(seeded: Seeded) -> None:
    """Enqueue each documented job, as another service would."""
    from app.jobs import (
        batch_process,
        daily_report,
        import_data,
        large_data_process,
        process_order,
        process_payment,
        update_inventory,
    )
    from app.jobs.process_order import order_queue

    for name, order_id in seeded.orders.items():
        process_order.delay(order_id)
        say(f"enqueued jobs.process_order({order_id}) [{name}] on {order_queue(order_id)}")
    for _ in range(2):  # the same key twice: the stock changes once
        update_inventory.delay(seeded.products[0], 25, f"restock-{seeded.tag}")
    say("enqueued jobs.update_inventory twice with one idempotency key")
    for token, payment_id in seeded.payments.items():
        process_payment.delay(payment_id)
        say(f"enqueued jobs.process_payment({payment_id}) [{token}]")
    batch_process.delay(seeded.batch)
    say(f"enqueued jobs.batch_process({seeded.batch}) [{BATCH_ITEMS} items]")
    large_data_process.delay(seeded.dataset)
    say(f"enqueued jobs.large_data_process({seeded.dataset}) [{DATASET_RECORDS} records]")
    import_data.delay(seeded.import_id)
    say(f"enqueued jobs.import_data({seeded.import_id})")
    today = dt.datetime.now(ZoneInfo(get_settings().app_timezone)).date()
    daily_report.delay(today.isoformat())
    say(f"enqueued jobs.daily_report({today.isoformat()!r})")


def all_done(seeded: Seeded) -> bool:
    """Whether every job the demo enqueued has reached an end state."""
    from app.db import session_scope
    from app.models import Batch, Dataset, Import, Order, Payment, Report

    with session_scope() as session:
        open_orders = session.scalar(
            select(func.count())
            .select_from(Order)
            .where(Order.id.in_(seeded.orders.values()), Order.status == "pending")
        )
        open_payments = session.scalar(
            select(func.count())
            .select_from(Payment)
            .where(Payment.id.in_(seeded.payments.values()), Payment.status == "pending")
        )
        batch = session.get(Batch, seeded.batch)
        dataset = session.get(Dataset, seeded.dataset)
        record = session.get(Import, seeded.import_id)
        reports = session.scalar(select(func.count()).select_from(Report))
        return bool(
            open_orders == 0
            and open_payments == 0
            and batch
            and batch.status == "completed"
            and dataset
            and dataset.status == "completed"
            and record
            and record.status in ("completed", "failed")
            and reports
        )


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


def print_summary(seeded: Seeded, smtp: SmtpServer, gateway: GatewaySimulator) -> None:
    """What happened, from the database, the SMTP server and the gateway."""
    from app.db import session_scope
    from app.models import Batch, Dataset, Import, Order, Payment, Product, Report

    with session_scope() as session:
        orders = [session.get(Order, i) for i in seeded.orders.values()]
        payments = [session.get(Payment, i) for i in seeded.payments.values()]
        anvil = session.get(Product, seeded.products[0])
        batch = session.get(Batch, seeded.batch)
        dataset = session.get(Dataset, seeded.dataset)
        record = session.get(Import, seeded.import_id)
        report = session.scalar(select(Report).order_by(Report.id.desc()))
        print("\n=== what happened ===")
        for name, order in zip(seeded.orders, orders, strict=True):
            assert order is not None
            detail = (
                f"total {order.total}"
                if order.status == "processed"
                else (order.failure_reason or "")
            )
            print(f"order {order.id:>4} [{name}]: {order.status} {detail}")
        if anvil is not None:
            print(
                f"anvil stock: 10, minus 1 ordered, plus a restock of 25 sent twice: "
                f"{anvil.inventory}"
            )
        by_status: dict[str, int] = {}
        for payment in payments:
            assert payment is not None
            by_status[payment.status] = by_status.get(payment.status, 0) + 1
        print(
            "payments: "
            + ", ".join(f"{k} {v}" for k, v in sorted(by_status.items()))
            + f"; gateway charges made: {len(gateway.charges)}"
        )
        print(
            f"emails delivered: {len(smtp.messages)} "
            + "("
            + ", ".join(str(m.message["Subject"]) for m in smtp.messages)
            + ")"
        )
        if batch is not None:
            print(
                f"batch {batch.id}: {batch.processed_count}/{batch.total_count} items, "
                f"{batch.status}"
            )
        if dataset is not None:
            print(
                f"dataset {dataset.id}: {dataset.processed_count} records in keyset batches, "
                f"{dataset.status}"
            )
        if record is not None:
            lines = ", ".join(str(e.get("line")) for e in record.errors)
            print(
                f"import {record.id}: {record.status}; {record.rows_seen} rows, "
                f"{record.rows_imported} imported, {record.rows_rejected} rejected "
                f"(lines {lines})"
            )
        if report is not None:
            data = report.data
            print(
                f"daily report {data['date']} (one per date): {data['orders']} orders, revenue "
                f"{data['revenue']}, {data['new_users']} new users"
            )
        print()


if __name__ == "__main__":
    raise SystemExit(main())

"""The I/O-bound pools benchmark (issue 20): the seed's email and payment jobs, prefork vs
threads.

The development SMTP server and payment gateway run as processes of their own, each answering
after a fixed 20 ms (`--latency 0.02`), as distant servers would. Each side drains the same mix,
`count` `send_email` jobs (order confirmations) and `count` `process_payment` jobs (the
gateway's rate limit raised to 1,000 a second, PAYMENT_GATEWAY_RATE, so that it does not
bite), queued before its workers start; its rate is the jobs done (emails sent and payments
succeeded, read from the database) per second from the first to the last. Sides:

- the baseline: one worker, prefork with concurrency 2 (a process per core, as the service
  runs by default);
- one worker on the threads pool, 16 threads;
- two workers on the threads pool, 8 threads each (a process per core).

Every side's every job is checked to have taken effect once (one message per email key at
the SMTP server is not checked here; the integration tests do that).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

LATENCY = 0.02


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _servers() -> Iterator[dict[str, str]]:
    from bench.run import ROOT, WORKER_LOG

    smtp_port, gateway_port = _free_port(), _free_port()
    commands = [
        [sys.executable, "-m", "app.devservers.smtp", "--port", str(smtp_port)],
        [sys.executable, "-m", "app.devservers.gateway", "--port", str(gateway_port)],
    ]
    processes = []
    with open(WORKER_LOG, "ab") as out:
        for command in commands:
            processes.append(
                subprocess.Popen(
                    [*command, "--latency", str(LATENCY)],
                    cwd=ROOT,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        for port in (smtp_port, gateway_port):
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"development server on port {port} did not start")
                time.sleep(0.05)
        yield {
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(smtp_port),
            "PAYMENT_GATEWAY_URL": f"http://127.0.0.1:{gateway_port}",
            "PAYMENT_GATEWAY_RATE": "1000",
        }
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=30)


def _seed(count: int, tag: str) -> tuple[int, list[int]]:
    """A recipient, and `count` pending payments (each of its own order)."""
    from app.db import session_scope
    from app.models import Order, OrderItem, Payment, Product, User

    with session_scope() as session:
        user = User(email=f"io-{tag}@example.com")
        product = Product(sku=f"io-{tag}", name="Widget", inventory=10**9, price=Decimal("2.50"))
        session.add_all([user, product])
        session.flush()
        orders = [
            Order(
                user_id=user.id,
                items=[OrderItem(product_id=product.id, quantity=1, unit_price=Decimal("2.50"))],
            )
            for _ in range(count)
        ]
        session.add_all(orders)
        session.flush()
        payments = [
            Payment(order_id=order.id, amount=Decimal("2.50"), card_token="tok_ok")
            for order in orders
        ]
        session.add_all(payments)
        session.flush()
        return user.id, [p.id for p in payments]


def _done(user: int, payments: list[int]) -> int:
    """Emails sent to the side's recipient and its payments succeeded: one statement on the
    indexes (the user's deliveries, a range of payment ids), polled every 50 ms from a process
    that shares the cores with the workers, so it is kept cheap."""
    from sqlalchemy import text

    from app.db import get_engine

    lo, hi = min(payments), max(payments)
    assert hi - lo + 1 == len(payments), "the side's payments are seeded as one range of ids"
    with get_engine().connect() as connection:
        done = connection.execute(
            text(
                "SELECT (SELECT count(*) FROM email_deliveries WHERE user_id = :user"
                " AND status = 'sent') + (SELECT count(*) FROM payments"
                " WHERE id BETWEEN :lo AND :hi AND status = 'succeeded')"
            ),
            {"user": user, "lo": lo, "hi": hi},
        ).scalar_one()
    return int(done)


def _side(
    count: int, tag: str, start: Callable[[dict[str, str]], list[subprocess.Popen[bytes]]]
) -> float:
    from celery import Celery

    from bench.peers import stop_group
    from bench.run import redis_client, wait_for

    redis_client().flushdb()
    user, payments = _seed(count, tag)
    producer = Celery("bench", broker=os.environ["BROKER_URL"])
    with producer.producer_or_acquire() as p, p.batch(max_size=1000):
        for i in range(count):
            context = {"order_id": i, "total": "2.50"}
            email = [user, "order_confirmation", f"io-{tag}-{i}", context]
            producer.send_task("jobs.send_email", args=email, queue="low", producer=p)
            producer.send_task(
                "jobs.process_payment", args=[payments[i]], queue="urgent", producer=p
            )
    with _servers() as env:
        processes = start(env)
        try:
            wait_for(lambda: _done(user, payments) > 0, 120, f"{tag}: start", processes[0])
            began, first = time.perf_counter(), _done(user, payments)
            wait_for(
                lambda: _done(user, payments) >= 2 * count,
                120 + count / 5,
                f"{tag}: drain",
                processes[0],
                poll=0.05,
            )
            return (2 * count - first) / (time.perf_counter() - began)
        finally:
            for process in processes:
                stop_group(process)


def bench_io_pools(count: int) -> dict[str, Any]:
    from bench.run import celery_worker

    def workers(concurrency: int, pool: str | None, n: int = 1) -> Any:
        return lambda env: [
            celery_worker(False, concurrency, f"io{i}@%h", env, own_session=True, pool=pool)
            for i in range(n)
        ]

    run = str(int(time.time()))
    rates = {
        "prefork_2": _side(count, f"{run}-p", workers(2, None)),
        "threads_16": _side(count, f"{run}-t", workers(16, "threads")),
        "threads_2x8": _side(count, f"{run}-tt", workers(8, "threads", 2)),
    }
    best = max(rates["threads_16"], rates["threads_2x8"])
    ratio = best / rates["prefork_2"]
    return {
        "name": "I/O-bound jobs: threads pool vs prefork (email and payment, 20 ms servers)",
        "size": 2 * count,
        "baseline": f"prefork 2: {rates['prefork_2']:.0f} jobs/s",
        "measured": (
            f"threads 16: {rates['threads_16']:.0f} jobs/s; two workers of threads 8: "
            f"{rates['threads_2x8']:.0f} jobs/s"
        ),
        "ratio": round(ratio, 2),
        "target": ">= 4x prefork 2 (the better threads side)",
        "met": ratio >= 4,
        "jobs_per_s": {side: round(rate, 1) for side, rate in rates.items()},
        "note": (
            f"{count} send_email and {count} process_payment jobs a side, the SMTP server and "
            f"the gateway each answering after {LATENCY * 1000:.0f} ms, in processes of their "
            "own; rates from the first job done to the last, read from the database."
        ),
    }

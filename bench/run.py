"""`make bench`: each benchmark beside its baseline, measured in the same run.

Prints a table, writes bench/results/latest.json and (on a full run of every benchmark)
BENCHMARKS.md. Runs against the configured DATABASE_URL / BROKER_URL, or the embedded default,
in the database `<db>_bench` and Redis database 14. `--quick` scales sizes down; `--only NAME`
(repeatable) runs some of them. The benchmarks, each against its baseline:

- job-layer overhead: no-op jobs through the job layer vs a bare `@app.task`, drained by a worker
- bulk enqueue: `perform_all_later` vs a loop of `.delay()`
- large dataset paging: keyset vs OFFSET, at three sizes
- daily report: the report service vs the bare aggregate, over a day holding 1,000,000 orders
- hot-row inventory: 20,000 `update_inventory` jobs over 10 products on a worker (concurrency 2),
  vs draining as many no-op jobs; met when every product's stock is exact
- batch of 100,000 items: `batch_process` end to end vs the guide's fan-out (one `process_item`
  per item from a `.delay()` loop; timed on 10,000 items, see NAIVE_FULL), same worker set-up;
  identical item states
- worker memory: peak RSS of the worker and its pool during the 100,000-item batch vs a
  10,000-item one
- urgent latency under backlog: urgent jobs' enqueue-to-start p50/p99 behind 50,000 low jobs,
  for each QUEUE_ORDER (weighted, round_robin, strict), vs a FIFO single queue (estimated)

Workers log to bench/results/worker.log.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORKER_LOG = RESULTS / "worker.log"

#: The benchmarks in the order they run (the names `--only` takes).
BENCHMARKS = ("overhead", "bulk", "paging", "report", "inventory", "batch", "urgent")
#: Items the naive fan-out is timed on; its items/s is compared with ours at the full size.
#: Here it does 130-270 items/s (each process_item commits and updates the one batch row, so
#: the two pool processes take turns), so 100,000 items would take 6-13 minutes on their own,
#: beyond the time budget of `make bench`. Its rate does not improve with more items (the batch
#: row only gathers more dead versions), so timing it on fewer flatters the naive side if at all.
NAIVE_FULL = 10_000
NAIVE_QUICK = 1_000
#: The worker's queue orders (QUEUE_ORDER), and the urgent-latency benchmark's settings.
QUEUE_ORDERS = ("weighted", "round_robin", "strict")
URGENT_SPACING = 0.02  # seconds between urgent enqueues
URGENT_FACTOR = 3.0  # weighted p99 may be this many times strict's


def prepare_environment() -> str:
    """Point the app at a benchmark database and a spare Redis database, before it loads.

    Returns what it runs against, for BENCHMARKS.md (URLs without passwords).
    """
    import psycopg
    from sqlalchemy.engine import make_url

    from app import embedded
    from app.settings import load_settings, redact_url

    settings = load_settings()
    database_url, broker_url = settings.database_url, settings.broker_url
    if database_url is None or broker_url is None:
        running = embedded.ensure_running(
            settings.state_dir, postgres=database_url is None, redis=broker_url is None
        )
        database_url = database_url or running.database_url
        broker_url = broker_url or running.broker_url
    assert database_url and broker_url
    bench_db = f"{make_url(database_url).database}_bench"
    from app.scratch import alembic_config, isolated_broker, recreate_database

    try:
        url = recreate_database(database_url, bench_db)
    except psycopg.OperationalError:  # the configured database may not exist: use the server's
        server = make_url(database_url).set(database="postgres")
        url = recreate_database(server.render_as_string(hide_password=False), bench_db)
    from alembic import command

    command.upgrade(alembic_config(url), "head")
    os.environ["DATABASE_URL"] = url
    os.environ["BROKER_URL"] = isolated_broker(broker_url, 14)
    if settings.database_url is None and settings.broker_url is None:
        return "the embedded PostgreSQL and Redis"
    return f"DATABASE_URL={redact_url(database_url)} BROKER_URL={redact_url(broker_url)}"


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def redis_client() -> Any:
    import redis

    from app.settings import redis_client_url

    return redis.Redis.from_url(redis_client_url(os.environ["BROKER_URL"]) or "")


def wait_for(
    done: Callable[[], bool],
    timeout: float,
    what: str,
    process: subprocess.Popen[bytes] | None = None,
    poll: float = 0.01,
) -> None:
    """Poll `done` until it holds; a clear error if `timeout` passes or the worker exits."""
    deadline = time.monotonic() + timeout
    while not done():
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"{what}: the worker exited with status {process.returncode} (see {WORKER_LOG})"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done within {timeout:.0f} s")
        time.sleep(poll)


def worker(concurrency: int = 1, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`celery -A app worker` with the benchmark jobs, as a child process logging to WORKER_LOG."""
    from app.scratch import start_celery

    RESULTS.mkdir(parents=True, exist_ok=True)
    args = ["worker", "--include", "bench.tasks", "--queues", "urgent,default,low"]
    args += ["--concurrency", str(concurrency), "--without-mingle", "--without-gossip"]
    return start_celery([*args, "--loglevel", "WARNING"], WORKER_LOG, {**os.environ, **(env or {})})


def stop_worker(process: subprocess.Popen[bytes], cold: bool = False) -> None:
    """A warm shutdown (SIGTERM), or a cold one (SIGQUIT); SIGKILL if not ended in a minute.

    Cold is for a worker whose queue still holds work nobody needs (the warm shutdown of a
    worker with a backlog can take half a minute stopping its pool).
    """
    from app.scratch import stop_celery

    stop_celery(process, signal.SIGQUIT if cold else signal.SIGTERM)


@contextmanager
def ready_worker(concurrency: int, what: str) -> Iterator[subprocess.Popen[bytes]]:
    """A worker on empty queues that has already run one job (so its start-up is not timed)."""
    from bench.tasks import bench_noop

    client = redis_client()
    process = worker(concurrency)
    try:
        bench_noop.delay(0)
        wait_for(lambda: queued(client) == 0, 120, f"{what}: worker start-up", process)
        yield process
    finally:
        stop_worker(process)


def queued(client: Any, queue: str = "default") -> int:
    """Messages waiting in `queue` plus those handed out and not yet acknowledged."""
    return int(client.llen(queue)) + int(client.hlen("unacked"))


def drain(count: int, concurrency: int, what: str) -> float:
    """Start a worker on `count` queued messages: seconds from its first take to the last ack."""
    client = redis_client()
    process = worker(concurrency)
    try:
        start: float | None = None

        def done() -> bool:
            nonlocal start
            left = queued(client)
            if start is None and left < count:
                start = time.perf_counter()  # the worker has begun
            return left == 0

        # Start-up, then at least 20 jobs/s (every benchmark job drains far faster).
        wait_for(done, 120 + count / 20, what, process)
        return time.perf_counter() - (start or time.perf_counter())
    finally:
        stop_worker(process)


def drain_seconds(task_name: str, count: int, concurrency: int = 1) -> float:
    """Publish `count` messages of a no-op, then time one worker draining them."""
    from celery import Celery

    client = redis_client()
    client.flushdb()
    producer = Celery("bench", broker=os.environ["BROKER_URL"])
    with producer.producer_or_acquire() as p, p.batch(max_size=1000):
        for i in range(count):
            producer.send_task(task_name, args=[i], queue="default", producer=p, ignore_result=True)
    return drain(count, concurrency, f"draining {count} {task_name}")


def peak_rss_kib(pid: int) -> int:
    """VmHWM (peak resident set) of process `pid` plus that of each of its children, in KiB."""
    pids = [pid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name (2nd field) may hold spaces: the fields after it are plain.
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            pids.append(int(stat.parent.name))
    total = 0
    for each in pids:
        try:
            status = Path(f"/proc/{each}/status").read_text()
        except OSError:  # it ended meanwhile
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total


def bench_overhead(size: int) -> dict[str, Any]:
    bare = drain_seconds("bench.bare_noop", size)
    layered = drain_seconds("jobs.bench_noop", size)
    return {
        "name": "job-layer overhead",
        "size": size,
        "baseline": f"bare @app.task: {size / bare:.0f} jobs/s",
        "measured": f"job layer: {size / layered:.0f} jobs/s",
        "ratio": round(layered / bare, 3),
        "target": "<= 1.10 (time ratio)",
        "met": layered / bare <= 1.10,
    }


def bench_bulk(size: int) -> dict[str, Any]:
    from app.jobs.base import perform_all_later
    from bench.tasks import bench_noop

    client = redis_client()
    client.flushdb()
    loop_count = max(1000, size // 20)
    loop = timed(lambda: [bench_noop.delay(i) for i in range(loop_count)]) / loop_count
    client.flushdb()
    bulk = timed(lambda: perform_all_later(bench_noop.s(i) for i in range(size))) / size
    client.flushdb()
    return {
        "name": "bulk enqueue",
        "size": size,
        "baseline": f".delay() loop: {1 / loop:.0f} jobs/s ({loop_count} jobs)",
        "measured": f"perform_all_later: {1 / bulk:.0f} jobs/s",
        "ratio": round(loop / bulk, 1),
        "target": ">= 20x faster",
        "met": loop / bulk >= 20,
        "note": (
            "What limits it (python -m bench.run --only bulk --profile, pyinstrument): of "
            "perform_all_later's time, kombu's basic_publish (base64 body, delivery-tag uuid4, "
            "envelope JSON) takes about a quarter, the AsyncResult made and freed per job "
            "about a sixth, the argument checks and redaction about a sixth, Celery's "
            "create_task_message and the body's JSON about a tenth. 20x a .delay() loop "
            "leaves about 35 us a job for all of it; this path spends 70-100 us. Going further "
            "would mean building kombu's envelope by hand and returning ids, not results."
        ),
    }


def bench_paging(sizes: list[int]) -> dict[str, Any]:
    from sqlalchemy import insert, select

    from app.db import session_scope
    from app.models import Dataset, Record
    from app.services.datasets import BATCH_SIZE, process_next_batch

    rows = []
    for size in sizes:
        with session_scope() as session:
            dataset = Dataset(name=f"bench-{size}")
            session.add(dataset)
            session.flush()
            dataset_id = dataset.id
            for start in range(0, size, 20_000):
                session.execute(
                    insert(Record),
                    [
                        {"dataset_id": dataset_id, "payload": {}}
                        for _ in range(min(20_000, size - start))
                    ],
                )

        def keyset(dataset_id: int = dataset_id) -> None:
            while True:
                with session_scope() as session:
                    if process_next_batch(session, dataset_id).completed:
                        return

        def offset(dataset_id: int = dataset_id) -> None:  # the guide's OFFSET paging
            offset_at = 0
            while True:
                with session_scope() as session:
                    ids = list(
                        session.scalars(
                            select(Record.id)
                            .where(Record.dataset_id == dataset_id)
                            .order_by(Record.id)
                            .offset(offset_at)
                            .limit(BATCH_SIZE)
                        )
                    )
                if not ids:
                    return
                offset_at += BATCH_SIZE

        rows.append(
            {
                "records": size,
                "keyset_s": round(timed(keyset), 2),
                "offset_s": round(timed(offset), 2),
            }
        )
    first, last = rows[0], rows[-1]
    growth = last["records"] / first["records"]
    return {
        "name": "large dataset paging",
        "size": sizes,
        "baseline": "OFFSET: " + ", ".join(f"{r['records']:,}: {r['offset_s']} s" for r in rows),
        "measured": "keyset: " + ", ".join(f"{r['records']:,}: {r['keyset_s']} s" for r in rows),
        "ratio": round(last["offset_s"] / max(last["keyset_s"], 1e-9), 1),
        "target": f"keyset grows ~linearly (x{growth:.0f} records)",
        "met": last["keyset_s"] / max(first["keyset_s"], 1e-9) <= growth * 1.5,
        "rows": rows,
    }


def bench_report(size: int) -> dict[str, Any]:
    """The daily report over a day that holds `size` orders, beside the bare aggregate."""
    from sqlalchemy import delete, text

    from app.db import session_scope
    from app.models import Report
    from app.services.reports import REPORT_TYPE, create_daily_report, report_data

    day = dt.date(2026, 1, 15)
    midnight = dt.datetime(2026, 1, 15, tzinfo=dt.UTC)
    with session_scope() as session:
        session.execute(
            text(
                "INSERT INTO users (email, created_at) SELECT 'bench' || g || "
                "'@example.com', :noon FROM generate_series(1, 1000) g"
            ),
            {"noon": midnight + dt.timedelta(hours=12)},
        )
        # Every order on the reported day, spread over its 86,400 seconds.
        session.execute(
            text(
                "INSERT INTO orders (user_id, status, total, created_at, processed_at) "
                "SELECT 1 + (g % 1000), 'processed', 9.99, :start + (g % 86400) * interval '1 s',"
                " :start + (g % 86400) * interval '1 s' FROM generate_series(1, :n) g"
            ),
            {"start": midnight, "n": size},
        )
        session.execute(text("ANALYZE orders"))
        session.execute(text("ANALYZE users"))
    with session_scope() as session:
        aggregated = report_data(session, day, "UTC")["orders"]
    if aggregated != size:
        raise RuntimeError(f"daily report: the day holds {aggregated} orders, not {size}")

    def bare() -> None:
        with session_scope() as session:
            report_data(session, day, "UTC")

    def job() -> None:
        with session_scope() as session:
            if not create_daily_report(session, day, "UTC").created:
                raise RuntimeError("daily report: the report existed; the INSERT was not timed")

    # Alternated, the best of five each; the report row is removed (untimed) before each job
    # run, so every run aggregates the same day and stores its report.
    bare_times, job_times = [], []
    for _ in range(5):
        bare_times.append(timed(bare))
        with session_scope() as session:
            session.execute(
                delete(Report).where(Report.date == day, Report.report_type == REPORT_TYPE)
            )
        job_times.append(timed(job))
    bare_s, job_s = min(bare_times), min(job_times)
    return {
        "name": "daily report",
        "size": size,
        "baseline": f"bare aggregate (report_data) over {size:,} orders: {bare_s * 1000:.1f} ms",
        "measured": f"daily_report service (aggregate + stored report): {job_s * 1000:.1f} ms",
        "ratio": round(job_s / bare_s, 2),
        "target": "<= 1.5x",
        "met": job_s / bare_s <= 1.5,
        "orders_in_day": aggregated,
    }


def bench_hot_rows(size: int, products: int = 10, concurrency: int = 2) -> dict[str, Any]:
    """`size` update_inventory jobs over `products` products, drained by one worker."""
    from sqlalchemy import func, select

    from app.db import session_scope
    from app.jobs.base import perform_all_later
    from app.jobs.update_inventory import update_inventory
    from app.models import DeadLetter, InventoryAudit, Product

    start_stock = 1_000_000  # far above what `size` changes of at most 5 could take away
    with session_scope() as session:
        rows = [
            Product(sku=f"bench-hot-{i}", name=f"hot {i}", inventory=start_stock, price=1)
            for i in range(products)
        ]
        session.add_all(rows)
        session.flush()
        ids = [row.id for row in rows]
    rng = random.Random(size)
    changes = [(rng.choice(ids), rng.choice([-5, -3, -1, 1, 2, 4])) for _ in range(size)]
    expected = {product_id: start_stock for product_id in ids}
    for product_id, change in changes:
        expected[product_id] += change

    redis_client().flushdb()
    # No idempotency key given: each job's key is its task id, as for a producer that has none.
    perform_all_later(update_inventory.s(product_id, change) for product_id, change in changes)
    hot = drain(size, concurrency, f"hot-row inventory: draining {size} update_inventory jobs")
    with session_scope() as session:
        stock = {
            product_id: inventory
            for product_id, inventory in session.execute(
                select(Product.id, Product.inventory).where(Product.id.in_(ids))
            )
        }
        audits = session.scalar(
            select(func.count())
            .select_from(InventoryAudit)
            .where(InventoryAudit.product_id.in_(ids))
        )
        dead = session.scalar(select(func.count()).select_from(DeadLetter))
    exact = stock == expected and audits == size and dead == 0
    # Baseline: no-op jobs drained at the same concurrency, so the ratio (time per job) is what
    # the row locks, the audit insert and the commit cost on top of the job machinery. The
    # rate hardly depends on the count, so at most 5,000 no-ops are drained to save time.
    noop_count = min(size, 5_000)
    noop_rate = noop_count / drain_seconds("jobs.bench_noop", noop_count, concurrency)
    hot_rate = size / hot
    return {
        "name": "hot-row inventory",
        "size": size,
        "baseline": (
            f"bench_noop drain ({noop_count:,} jobs), concurrency {concurrency}: "
            f"{noop_rate:.0f} jobs/s"
        ),
        "measured": (
            f"update_inventory over {products} products: {hot_rate:.0f} jobs/s, final stock "
            + ("exact" if exact else "WRONG")
        ),
        "ratio": round(noop_rate / hot_rate, 2),
        "target": "every product = start + sum of its changes (ratio: time vs no-op)",
        "met": exact,
        "products": products,
        "audit_rows": audits,
        "dead_letters": dead,
        "wrong_products": {
            str(p): {"expected": expected[p], "actual": stock.get(p)}
            for p in ids
            if stock.get(p) != expected[p]
        },
    }


def seed_batch(size: int) -> int:
    """A pending batch of `size` items; one in 1,000 has a payload without a value (fails)."""
    from sqlalchemy import text

    from app.db import session_scope
    from app.models import Batch

    with session_scope() as session:
        batch = Batch()
        session.add(batch)
        session.flush()
        session.execute(
            text(
                "INSERT INTO batch_items (batch_id, payload) SELECT :batch_id, CASE WHEN g % 1000 "
                "= 0 THEN '{}'::jsonb ELSE jsonb_build_object('value', g) END "
                "FROM generate_series(1, :n) g ORDER BY g"
            ),
            {"batch_id": batch.id, "n": size},
        )
        session.execute(text("ANALYZE batch_items"))
        return batch.id


def run_batch(size: int, naive: bool) -> tuple[float, int, int]:
    """Seed a batch and process it end to end on a fresh worker (concurrency 2).

    Ours: one `batch_process` job. Naive (the guide's): one `process_item` job per item, from
    a single loop of `.delay()`. Returns the seconds from the first enqueue until the batch is
    completed, the worker's peak resident memory (KiB) and the batch id.
    """
    from sqlalchemy import select

    from app.db import session_scope
    from app.jobs.batch_process import batch_process, process_item
    from app.models import Batch, BatchItem

    batch_id = seed_batch(size)
    with session_scope() as session:
        item_ids = list(
            session.scalars(
                select(BatchItem.id).where(BatchItem.batch_id == batch_id).order_by(BatchItem.id)
            )
        )
    redis_client().flushdb()
    what = f"batch of {size} items ({'naive process_item' if naive else 'batch_process'})"
    with ready_worker(2, what) as process:
        peak = peak_rss_kib(process.pid)
        sampled = time.monotonic()

        def completed() -> bool:
            nonlocal peak, sampled
            if time.monotonic() - sampled >= 0.2:
                peak, sampled = max(peak, peak_rss_kib(process.pid)), time.monotonic()
            with session_scope() as session:
                status = session.scalar(select(Batch.status).where(Batch.id == batch_id))
            return status == "completed"

        started = time.perf_counter()
        if naive:
            for item_id in item_ids:
                process_item.delay(item_id)
        else:
            batch_process.delay(batch_id)
        # Start-up, then at least 20 items/s naive, 200 ours (both run far faster here).
        wait_for(completed, 120 + size / (20 if naive else 200), what, process, poll=0.05)
        elapsed = time.perf_counter() - started
        peak = max(peak, peak_rss_kib(process.pid))
    return elapsed, peak, batch_id


def batch_outcome(batch_id: int) -> tuple[tuple[Any, ...], list[tuple[Any, ...]]]:
    """The batch's (status, processed, total) and each item's (value, status, error, done)."""
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import Batch, BatchItem

    with session_scope() as session:
        batch = session.execute(
            select(Batch.status, Batch.processed_count, Batch.total_count).where(
                Batch.id == batch_id
            )
        ).one()
        items = session.execute(
            select(
                BatchItem.payload["value"].as_integer(),
                BatchItem.status,
                BatchItem.error,
                BatchItem.processed_at.is_not(None),
            )
            .where(BatchItem.batch_id == batch_id)
            .order_by(BatchItem.id)
        ).all()
    return tuple(batch), [tuple(item) for item in items]


def bench_batch(size: int, naive_size: int, memory_size: int) -> list[dict[str, Any]]:
    """Batch throughput (ours vs the naive fan-out) and the worker's memory at two sizes."""
    ours_s, ours_peak, ours_id = run_batch(size, naive=False)
    naive_s, _, naive_id = run_batch(naive_size, naive=True)
    small_s, small_peak, _ = run_batch(memory_size, naive=False)

    ours_batch, ours_items = batch_outcome(ours_id)
    naive_batch, naive_items = batch_outcome(naive_id)
    failed = sum(1 for item in ours_items if item[1] == "failed")
    # Every item moved out of pending once (the counter grows by exactly the rows moved and
    # the batch completes only when it reaches the total), with the same outcome either way.
    ours_ok = ours_batch == ("completed", size, size) and all(i[1] != "pending" for i in ours_items)
    naive_ok = naive_batch == ("completed", naive_size, naive_size) and all(
        i[1] != "pending" for i in naive_items
    )
    identical = ours_ok and naive_ok and ours_items[:naive_size] == naive_items
    ours_rate, naive_rate = size / ours_s, naive_size / naive_s
    scaled = "" if naive_size == size else f", timed on {naive_size:,} items"
    growth = ours_peak / small_peak
    return [
        {
            "name": f"batch of {size:,} items",
            "size": size,
            "baseline": (
                f"naive process_item per item (.delay loop): {naive_rate:.0f} items/s "
                f"({naive_s:.1f} s{scaled})"
            ),
            "measured": f"batch_process: {ours_rate:.0f} items/s ({ours_s:.1f} s)",
            "ratio": round(ours_rate / naive_rate, 1),
            "target": ">= 10x faster, identical item states",
            "met": identical and ours_rate / naive_rate >= 10,
            "identical": identical,
            "naive_items": naive_size,
            "note": (
                f"The naive fan-out is timed on {naive_size:,} items and its items/s compared "
                "(at ~150 items/s it would take 10+ minutes at the full size); its rate does "
                "not improve with more items."
            ),
            "failed_items": failed,
        },
        {
            "name": "worker memory",
            "size": [memory_size, size],
            "baseline": (
                f"{memory_size:,}-item batch: {small_peak / 1024:.0f} MiB ({small_s:.1f} s)"
            ),
            "measured": f"{size:,}-item batch: {ours_peak / 1024:.0f} MiB",
            "ratio": round(growth, 2),
            "target": "<= 1.2 (peak RSS, worker + pool)",
            "met": growth <= 1.2,
            "peak_kib": {str(memory_size): small_peak, str(size): ours_peak},
        },
    ]


def urgent_latencies(order: str, backlog: int, urgent: int) -> dict[str, Any]:
    """Urgent jobs' enqueue-to-start seconds while one worker drains a low backlog."""
    from app.jobs.base import perform_all_later
    from bench.tasks import URGENT_STARTS, bench_low, bench_urgent

    client = redis_client()
    client.flushdb()
    perform_all_later(bench_low.s(i) for i in range(backlog))
    what = f"urgent latency ({order})"
    process = worker(2, env={"QUEUE_ORDER": order})
    try:
        wait_for(
            lambda: int(client.llen("low")) < backlog - 20,
            120,
            f"{what}: the worker draining the low backlog",
            process,
        )
        first, depth_first = time.perf_counter(), int(client.llen("low"))
        ahead = []  # low jobs queued when each urgent job was enqueued
        due = time.perf_counter()
        for n in range(urgent):
            ahead.append(int(client.llen("low")))
            bench_urgent.delay(n, time.time())
            due += URGENT_SPACING
            time.sleep(max(0.0, due - time.perf_counter()))
        wait_for(
            lambda: int(client.llen(URGENT_STARTS)) >= urgent,
            60,
            f"{what}: {urgent} urgent jobs started",
            process,
        )
        last, depth_last = time.perf_counter(), int(client.llen("low"))
    finally:
        stop_worker(process, cold=True)  # the rest of the backlog is thrown away
    if depth_last == 0:
        raise RuntimeError(f"{what}: the low backlog ran out; the measurement needs a backlog")
    starts = [json.loads(raw) for raw in client.lrange(URGENT_STARTS, 0, -1)]
    latencies = [started - enqueued for _, enqueued, started in starts]
    drain_rate = (depth_first - depth_last) / (last - first)
    fifo = [queued_ahead / drain_rate for queued_ahead in ahead]
    return {
        "p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1),
        "low_jobs_per_s": round(drain_rate),
        "fifo_p50_s": round(percentile(fifo, 50), 1),
        "fifo_p99_s": round(percentile(fifo, 99), 1),
    }


def percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def bench_urgent_latency(backlog: int, urgent: int) -> dict[str, Any]:
    """Urgent latency under a low backlog, for each queue order of the worker."""
    orders = {order: urgent_latencies(order, backlog, urgent) for order in QUEUE_ORDERS}
    weighted, strict = orders["weighted"], orders["strict"]
    # A FIFO single queue would put each urgent job behind every low job queued before it:
    # estimated as those low jobs divided by the low-job drain rate measured in the same run.
    fifo_s = weighted["fifo_p50_s"]
    factor = weighted["p99_ms"] / max(strict["p99_ms"], 1.0)  # (1 ms floor: timer noise)
    met = factor <= URGENT_FACTOR and weighted["p99_ms"] / 1000 <= fifo_s / 10
    return {
        "name": "urgent latency under backlog",
        "size": backlog,
        "baseline": (
            f"strict p50/p99: {strict['p50_ms']}/{strict['p99_ms']} ms; round_robin: "
            f"{orders['round_robin']['p50_ms']}/{orders['round_robin']['p99_ms']} ms; "
            f"FIFO single queue (est. {weighted['low_jobs_per_s']} low jobs/s): p50 {fifo_s} s"
        ),
        "measured": f"weighted p50/p99: {weighted['p50_ms']}/{weighted['p99_ms']} ms",
        "ratio": round(factor, 2),
        "target": f"weighted p99 <= {URGENT_FACTOR}x strict and <= FIFO / 10",
        "met": met,
        "urgent_jobs": urgent,
        "worker_concurrency": 2,
        "spacing_ms": URGENT_SPACING * 1000,
        "orders": orders,
        "note": (
            "The FIFO single-queue figure is estimated (low jobs queued ahead of each urgent "
            "job / the measured low drain rate), not measured."
        ),
    }


def table_of(results: list[dict[str, Any]]) -> str:
    """The results as a markdown table, with each result's note below it."""
    lines = [
        f"| {r['name']} | {r['baseline']} | {r['measured']} | {r['ratio']} | "
        f"{r['target']} | {'yes' if r['met'] else 'NO'} |"
        for r in results
    ]
    table = "\n".join(
        [
            "| benchmark | baseline | measured | ratio | target | met |",
            "| --- | --- | --- | --- | --- | --- |",
            *lines,
        ]
    )
    notes = [f"- {r['name']}: {r['note']}" for r in results if r.get("note")]
    return table + ("\n\nNotes:\n\n" + "\n".join(notes) if notes else "")


def markdown(summary: dict[str, Any]) -> str:
    """BENCHMARKS.md for a run's summary (what latest.json holds)."""
    return (
        "# Benchmarks\n\nProduced by `make bench` (`python -m bench.run`) against "
        f"{summary['servers']}, on {summary['machine']}, {summary['date']}, in "
        f"{summary['seconds']} s. Ratios compare against a baseline measured in the same run; "
        "`bench/results/latest.json` (not committed) holds every figure.\n\n"
        + table_of(summary["results"])
        + "\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a quick look")
    parser.add_argument(
        "--only",
        action="append",
        choices=BENCHMARKS,
        help="run only this benchmark (repeatable; 'batch' includes worker memory); "
        "BENCHMARKS.md is then left alone",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile this process (enqueueing, checks; not the workers) with pyinstrument, "
        "into bench/results/profile.txt",
    )
    parser.add_argument(
        "--markdown-from",
        metavar="JSON",
        help="only write BENCHMARKS.md again from a full run's saved latest.json",
    )
    args = parser.parse_args()
    if args.markdown_from:
        (ROOT / "BENCHMARKS.md").write_text(
            markdown(json.loads(Path(args.markdown_from).read_text()))
        )
        return 0
    servers = prepare_environment()
    quick = args.quick
    chosen = args.only or list(BENCHMARKS)
    RESULTS.mkdir(parents=True, exist_ok=True)
    WORKER_LOG.write_bytes(b"")
    from app.devservers.smtp import SmtpServer

    # The batches' completion emails go to a real SMTP server (nothing left retrying).
    smtp = SmtpServer()
    smtp.start()
    os.environ["SMTP_HOST"], os.environ["SMTP_PORT"] = smtp.host, str(smtp.port)
    started = time.perf_counter()
    runs: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "overhead": lambda: [bench_overhead(2_000 if quick else 20_000)],
        "bulk": lambda: [bench_bulk(10_000 if quick else 100_000)],
        "paging": lambda: [
            bench_paging([10_000, 30_000] if quick else [100_000, 300_000, 1_000_000])
        ],
        "report": lambda: [bench_report(100_000 if quick else 1_000_000)],
        "inventory": lambda: [bench_hot_rows(2_000 if quick else 20_000)],
        "batch": lambda: bench_batch(
            10_000 if quick else 100_000,
            naive_size=NAIVE_QUICK if quick else NAIVE_FULL,
            memory_size=1_000 if quick else 10_000,
        ),
        "urgent": lambda: [
            bench_urgent_latency(10_000 if quick else 50_000, urgent=50 if quick else 150)
        ],
    }
    results: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    profiler = None
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005)
        profiler.start()
    try:
        for name in BENCHMARKS:
            if name in chosen:
                began = time.perf_counter()
                results.extend(runs[name]())
                timings[name] = round(time.perf_counter() - began, 1)
    finally:
        smtp.stop()
        if profiler is not None:
            profiler.stop()
            (RESULTS / "profile.txt").write_text(profiler.output_text(unicode=False, color=False))
            print(f"profile: {RESULTS / 'profile.txt'}")
    elapsed = time.perf_counter() - started
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    summary = {
        "machine": machine,
        "servers": servers,
        "date": dt.date.today().isoformat(),
        "quick": quick,
        "seconds": round(elapsed),
        "benchmark_seconds": timings,
        "results": results,
    }
    (RESULTS / "latest.json").write_text(json.dumps(summary, indent=2, default=str))
    print(table_of(results))
    print(f"({elapsed:.0f} s on {machine}; per benchmark: {timings})")
    if not quick and args.only is None:
        (ROOT / "BENCHMARKS.md").write_text(markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
